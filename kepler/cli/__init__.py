"""``kepler`` command line: train, eval, reconstruct, encode, decode, export, convert, study, doctor,
prior (train, eval), sample, fid, data (shard). The only place in kepler that prints.

Examples::

    kepler train sample optim.base_lr=2e-5 train.max_steps=500   # a built-in config, or a YAML path
    kepler train sample --resume                       # continue runs/sample/checkpoints/last.pt
    kepler train --list-configs                        # the built-in configs
    torchrun --nproc_per_node 4 -m kepler train celebahq_f16
    kepler eval runs/sample/checkpoints/last.pt --data sample --resolution 64 128
    kepler reconstruct runs/sample/checkpoints/last.pt photo.jpg --out recon/
    kepler encode runs/sample/checkpoints/last.pt photo.jpg --out codes/   # codes/photo.npy
    kepler decode runs/sample/checkpoints/last.pt codes/photo.npy --out decoded/
    kepler export runs/sample/checkpoints/last.pt --out sample_model/   # to share; works wherever a checkpoint does
    kepler convert last.ckpt --config released.yaml --out converted/   # a released Kepler/taming VQGAN
    kepler doctor --triton-interpret                   # versions, devices, every backend vs the reference
    kepler prior train prior_sample                    # a prior over the demo tokenizer's codes
    kepler prior eval runs/prior_sample/checkpoints/last.pt
    kepler sample runs/prior_sample/checkpoints/last.pt --num 16 --seed 0 --out samples/
    kepler fid samples.npz reference.npz --save-stats reference_stats.npz   # ADM's FID, sFID, IS, precision, recall
    kepler fid more_samples.npz reference_stats.npz   # the reference's statistics, saved
    kepler data shard imagenet/train --out shards/train --resize 288   # then data.train=shards/train

One module a group of commands (:mod:`kepler.cli.training`: train, prior train and eval, study, fid;
:mod:`kepler.cli.models`: the commands that use a model; :mod:`kepler.cli.data`: data shard;
:mod:`kepler.cli.doctor`), each with an
``add_commands(subparsers)``; the arguments several commands share are written once here.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from kepler import __version__
from kepler.io.config import MAX_SEED


class CLIError(Exception):
    """A user error: printed as ``kepler <command>: error: <message>``, exit status 2."""


def _int_type(low: int, high: int | None, expected: str):
    """An argparse type: an integer in ``[low, high]`` (no upper bound for None), else an error saying
    what was ``expected``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


positive_int = _int_type(1, None, "a positive integer")
non_negative_int = _int_type(0, None, "an integer >= 0")
seed = _int_type(0, MAX_SEED, "an integer from 0 to 2**63 - 1")


def add_seed(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--seed", type=seed, default=0, help=help)


def output_folder(path: str, option: str = "--out") -> Path:
    """Create the output folder ``path`` and check it is writable, before any work is done."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise CLIError(f"{option} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"{option} {folder}: cannot create the folder: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"{option} {folder}: the folder is not writable")
    return folder


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, cuda:1 ...")


def add_inception(parser: argparse.ArgumentParser, what: str, without: str = "off without them") -> None:
    parser.add_argument("--inception", default=None,
                        help=f"local FID Inception weights (pt_inception-2015-12-05) for {what} (default: torch "
                             f"hub's checkpoints folder; never downloaded: {without})")


def add_raw_weights(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--raw-weights``: a checkpoint's trained weights instead of its EMA weights (train.ema_decay)."""
    parser.add_argument("--raw-weights", action="store_true",
                        help="use the trained weights of a checkpoint that has EMA weights (train.ema_decay; "
                             f"default: the EMA weights){note}")


def weights_name(weights: str) -> str:
    """How the commands print which weights they used (``LoadedModel.weights``)."""
    return {"ema": "EMA weights", "trained": "trained weights"}[weights]


def add_tokenizer(parser: argparse.ArgumentParser) -> None:
    """``--tokenizer``: a prior's tokenizer at another path than the one the prior recorded."""
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="the prior's tokenizer, moved or copied to PATH (its SHA-256 must be the one the "
                             "prior recorded)")


def add_run(parser: argparse.ArgumentParser, config_help: str, optional_config: bool = False) -> None:
    """A training command's config, ``key=value`` overrides, ``--resume`` and ``--overwrite``."""
    parser.add_argument("config", nargs="?" if optional_config else None, default=None, help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides in dot notation, e.g. optim.base_lr=1e-5 data.batch_size=8")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue from CHECKPOINT, or (no value) from the run's checkpoints/last.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a run folder that holds a previous run (deletes its checkpoint, "
                             "log.jsonl, metrics.json and tb/)")


def build_parser() -> argparse.ArgumentParser:
    from kepler.cli import data, doctor, models, training

    parser = argparse.ArgumentParser(
        prog="kepler", description="Train, evaluate and use Kepler image tokenizers and their priors.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Examples::", 1)[1].split("\n\n")[0],
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks for errors")
    parser.add_argument("-V", "--version", action="version", version=f"kepler {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    training.add_commands(sub)
    models.add_commands(sub)
    data.add_commands(sub)
    doctor.add_commands(sub)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, except that a training command's ``key=value`` overrides may also
    come after its flags (``kepler train sample --overwrite optim.base_lr=1e-4``): argparse reads
    the positional overrides only before the first flag."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(parser, argv)
    args.argv = argv  # kepler doctor --triton-interpret re-runs the same command line
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except (CLIError, FileNotFoundError, ValueError) as exc:
        if args.verbose:
            raise
        print(f"kepler {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was finished is kept (a training saves and says so itself)
        if args.verbose:
            raise
        print(f"kepler {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
