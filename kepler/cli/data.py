"""The commands that prepare training data: ``kepler data shard``."""

from __future__ import annotations

from kepler.cli import non_negative_int, positive_int


def add_commands(sub) -> None:
    p = sub.add_parser("data", help="prepare training data (webdataset shards)",
                       description="Prepare training data: write a data source as webdataset shards.")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    s = data_sub.add_parser(
        "shard", help="write a data source as webdataset tar shards (data.train: DIR streams them)",
        description="Write every image of a data source (and its class, when labelled) into webdataset tar "
                    "shards and an index.json; a config's data.train: DIR then streams them.")
    s.add_argument("source", metavar="SRC",
                   help="a data source: a folder (labelled by its class folders), a list file (path<TAB>label "
                        "lines for labels), sample or faces")
    s.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder for the shards")
    s.add_argument("--shard-size", type=positive_int, default=1000, metavar="N", help="images a shard (default 1000)")
    s.add_argument("--resize", type=positive_int, default=None, metavar="S",
                   help="resize each image's shorter side to S (re-encoded; default: files copied as they are)")
    s.add_argument("--split", choices=("train", "val"), default="train",
                   help="which part of the embedded sets (sample, faces) to write; a folder or list is whole")
    s.add_argument("--no-labels", action="store_true", help="leave the classes out (data.labels: none)")
    s.add_argument("--num-workers", type=non_negative_int, default=0, metavar="N",
                   help="processes that read and encode the images (default 0: this one)")
    s.set_defaults(func=_cmd_data_shard)


def _cmd_data_shard(args) -> int:
    from kepler.data import build_dataset
    from kepler.data.shard_writer import write_shards

    labels = "none" if args.no_labels else "auto"
    # The size and resize the embedded sets are built at; a file source's images are read whole.
    data = {"train": args.source, "val": args.source, "labels": labels,
            **({"size": args.resize, "resize": args.resize} if args.resize else {})}
    dataset = build_dataset(data, args.split)
    settings = {"source": args.source, "split": args.split, "resize": args.resize, "shard_size": args.shard_size,
                "labels": labels}
    index = write_shards(dataset, args.out, args.shard_size, args.resize, settings, args.num_workers)
    classes = f", {len(index['classes'])} classes" if index["classes"] else ""
    skipped = f"; left out {len(index['skipped'])} unreadable files (listed in the index)" if index["skipped"] else ""
    print(f"kepler data shard: wrote {index['count']} images{classes} in {len(index['shards'])} shards to "
          f"{args.out}{skipped}")
    return 0
