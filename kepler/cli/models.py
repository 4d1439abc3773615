"""The commands that use a model, each loading it through :func:`kepler.load`: ``kepler eval``,
``reconstruct``, ``encode``, ``decode``, ``export``, ``convert`` (a released checkpoint in) and
``sample`` (a prior and its tokenizer)."""

from __future__ import annotations

import os
from pathlib import Path

from kepler.cli import (
    CLIError,
    add_device,
    add_inception,
    add_raw_weights,
    add_seed,
    add_tokenizer,
    output_folder,
    positive_int,
    weights_name,
)

# kepler.models.logits.CFG_SCHEDULES, written out: the parser is built without importing torch.
CFG_SCHEDULES = ("constant", "linear")
TOKENIZER_HELP = ("a tokenizer: a checkpoint written by kepler train (e.g. runs/NAME/checkpoints/last.pt), an "
                  "exported folder (kepler export) or kepler convert's output")


def _add_tokenizer_command(sub, name: str, help: str, description: str | None = None):
    """A command that takes a tokenizer and ``--device``."""
    p = sub.add_parser(name, help=help, description=description or help[0].upper() + help[1:] + ".")
    p.add_argument("checkpoint", help=TOKENIZER_HELP)
    add_device(p)
    add_raw_weights(p)
    return p


def _add_max_memory(parser) -> None:
    parser.add_argument("--max-memory", type=float, default=None, metavar="GIB",
                        help="refuse an image whose estimated peak memory is over GIB (default: the device's "
                             "available memory)")


def add_commands(sub) -> None:
    p = _add_tokenizer_command(sub, "eval", "evaluate a tokenizer (PSNR, SSIM, L1, utilization, LPIPS, rFID)",
                               "Evaluate a tokenizer on the validation split of a data set.")
    p.add_argument("--data", default="sample", help="sample, faces, a folder of images or a list file")
    p.add_argument("--resolution", type=int, nargs="+", default=None,
                   help="crop sides to evaluate at (default: the training size)")
    p.add_argument("--out", default=None, help="folder for eval.json")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-images", type=positive_int, default=None)
    p.add_argument("--lpips-vgg", default=None, help="local VGG16 weights (torchvision layout) for LPIPS")
    p.add_argument("--lpips-lin", default=None, help="local LPIPS linear-layer weights (lpips v0.1 vgg.pth)")
    p.add_argument("--stages", type=positive_int, default=None, metavar="S",
                   help="a residual tokenizer (type: residual): reconstruct from its first S stages only")
    add_inception(p, "rFID")
    p.set_defaults(func=_cmd_eval)

    for name, helptext, command in (
        ("reconstruct", "write original | reconstruction PNGs side by side", _cmd_reconstruct),
        ("encode", "turn images into .npy code-index maps (H/f, W/f, P)", _cmd_encode),
    ):
        p = _add_tokenizer_command(sub, name, helptext)
        p.add_argument("images", nargs="+", help="image files")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--size", type=positive_int, default=None,
                       help="resize the shorter side to SIZE and centre-crop SIZE x SIZE "
                            "(default: keep the image, cropped to a multiple of the downsampling factor)")
        _add_max_memory(p)
        p.set_defaults(func=command)
    p = _add_tokenizer_command(sub, "decode", "turn .npy code-index maps back into PNG images",
                               "Turn .npy code-index maps (from kepler encode) back into PNG images.")
    p.add_argument("codes", nargs="+", help=".npy files of (H, W, P) int code indices")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--stages", type=int, default=None, metavar="S",
                   help="a residual tokenizer (type: residual): decode from its first S stages only")
    _add_max_memory(p)
    p.set_defaults(func=_cmd_decode)

    p = sub.add_parser("export", help="write a checkpoint's model as a folder to share (safetensors, config, card)",
                       description="Write the model of a training checkpoint as a pretrained folder: "
                                   "model.safetensors, config.yaml (with the weights' SHA-256) and a README.md model "
                                   "card (metrics from the run's metrics.json); a prior's folder also holds its "
                                   "tokenizer, in tokenizer/. Every command that takes a checkpoint takes the "
                                   "folder; in Python, kepler.load(folder).")
    p.add_argument("checkpoint", help="a checkpoint written by kepler train or kepler prior train (e.g. "
                                      "runs/NAME/checkpoints/last.pt)")
    p.add_argument("--out", required=True, help="output folder")
    add_raw_weights(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("convert", help="convert a released Kepler Codebook / taming VQGAN checkpoint",
                       description="Convert a Lightning checkpoint of the released Kepler Codebook or taming-"
                                   "transformers VQModel, with its YAML config, into OUT/model.pt (for eval, "
                                   "reconstruct, encode, decode) and OUT/config.yaml (for kepler train: it starts "
                                   "from the converted weights).")
    p.add_argument("checkpoint", help="the released .ckpt file")
    p.add_argument("--config", required=True, help="its YAML config (model.params: ddconfig, n_embed, ...)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--stub-global", action="append", default=[], metavar="NAME",
                   help="read the global NAME (module.name) that the error names as an inert placeholder: "
                        "nothing of it runs (Lightning's callbacks, hyper-parameters; repeatable)")
    p.add_argument("--trust-global", action="append", default=[], metavar="NAME",
                   help="import the global NAME and let it run while unpickling; only for a file you trust "
                        "(repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in OUT")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("sample", help="sample images from a prior (PNGs and .npy code maps, or one .npz)",
                       description="Sample index maps from a prior and decode them with its tokenizer: PNGs, .npy "
                                   "code maps and a grid into a folder (--out), or one .npz of every image in the "
                                   "layout of guided-diffusion's evaluator (--npz; under torchrun every process draws "
                                   "its share; an interrupted run resumes from its finished chunks).")
    p.add_argument("checkpoint", help="a checkpoint written by kepler prior train, or a prior exported by kepler export")
    # --num-samples too: torchrun (torch 2.14) reads a --num anywhere on its command line as its own
    # --numa-binding and stops ("ambiguous option").
    p.add_argument("--num", "--num-samples", dest="num", type=positive_int, default=16,
                   help="samples to draw (under torchrun: --num-samples)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="samples drawn at a time (memory; the same --seed and --batch-size give the same samples)")
    classes = p.add_mutually_exclusive_group()
    classes.add_argument("--class", dest="class_label", type=int, default=None,
                         help="class of every sample of a class-conditional prior")
    classes.add_argument("--class-balanced", action="store_true",
                         help="classes in turn, each equally often (to one); with --npz and neither option: "
                              "uniform random classes")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--cfg-scale", type=float, default=None, metavar="S",
                   help="classifier-free guidance: logits uncond + S * (cond - uncond) (1: the conditional "
                        "samples, 0: the null class's); needs a prior trained with model.class_dropout > 0")
    p.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default=None,
                   help="the guidance scale throughout (constant, the default) or rising linearly to S over the "
                        "sequence (linear)")
    add_seed(p, "the same seed and --batch-size give the same samples on one kind of device, in any number of "
                "processes")
    add_device(p)
    add_tokenizer(p)
    add_raw_weights(p, " of the prior; its tokenizer's are those the prior was trained on")
    outputs = p.add_mutually_exclusive_group(required=True)
    outputs.add_argument("--out", help="output folder (PNGs, .npy code maps, grid.png)")
    outputs.add_argument("--npz", help="output .npz: arr_0 the images (N, H, W, 3) uint8, arr_1 their classes "
                                       "(class-conditional priors)")
    p.set_defaults(func=_cmd_sample)


def _tokenizer(args):
    """The tokenizer ``args.checkpoint`` names, on ``args.device``: ``(model, device)``; says which
    weights it has (``--raw-weights``)."""
    from kepler.distributed import resolve_device
    from kepler.models.load import load_model

    device = resolve_device(args.device)
    loaded = load_model(args.checkpoint, device, kind="tokenizer", raw_weights=args.raw_weights)
    print(f"kepler {args.command}: {args.checkpoint} (step {loaded.step}, {weights_name(loaded.weights)})")
    return loaded.model, device


def _cmd_eval(args) -> int:
    from kepler.train.evaluate import evaluate, format_table

    if args.out is not None:
        output_folder(args.out)
    resolutions = args.resolution if args.resolution else [None]
    results = evaluate(
        args.checkpoint, data=args.data, resolutions=resolutions, out=args.out, batch_size=args.batch_size,
        device=args.device, lpips_vgg_path=args.lpips_vgg, lpips_lin_path=args.lpips_lin,
        inception_path=args.inception, max_images=args.max_images, raw_weights=args.raw_weights, stages=args.stages,
    )
    prefix = "" if args.stages is None else f", first {args.stages} stage(s)"
    print(f"kepler eval: {args.checkpoint} (step {results['step']}, {weights_name(results['weights'])}{prefix})")
    print(format_table(results))
    print(f"LPIPS {results['lpips']}; rFID {results['rfid']}")
    packing = results["packing"]
    if isinstance(packing, dict):
        keys = ("min_nn_distance", "mean_nn_distance", "nn_distance_cv", "covering_radius", "mean_quantization_error")
        print("codebook packing: " + ", ".join(f"{k} {packing[k]}" for k in keys if packing.get(k) is not None))
    else:
        print(f"codebook packing: {packing}")
    if args.out is not None:
        print(f"wrote {Path(args.out) / 'eval.json'}")
    return 0


def memory_budget(max_memory: float | None, device) -> int:
    """Bytes an image may need: ``--max-memory`` GiB, else what the device has available."""
    from kepler.distributed import available_memory

    if max_memory is None:
        return available_memory(device)
    if not max_memory > 0:
        raise CLIError(f"--max-memory must be a number of GiB > 0, got {max_memory}")
    return int(max_memory * 2**30)


def check_memory(model, height: int, width: int, budget: int, what: str) -> None:
    """CLIError, before anything runs, when ``model`` on a ``height x width`` image would need more
    than ``budget`` bytes (:meth:`kepler.models.VQModel.inference_bytes`), suggesting a ``--size``
    that fits."""
    need = model.inference_bytes(height, width)
    if need <= budget:
        return
    factor = model.downsample_factor
    largest = min(height, width) // factor * factor
    fits = next((s for s in range(largest, 0, -factor) if model.inference_bytes(s, s) <= budget), None)
    advice = f"resize it with --size {fits}" if fits else "it does not fit at any size"
    raise CLIError(f"{what} ({width}x{height}) needs about {memory_size(need)} at full size, more than the "
                   f"{memory_size(budget)} budget (--max-memory): {advice}, or raise --max-memory")


def memory_size(size: int) -> str:
    """Bytes in GiB (MiB below one GiB), as a person reads them."""
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def load_images(paths, size: int | None, model, budget: int):
    """Image files -> list of (name, (1, 3, H, W) tensor in [-1, 1]); H, W multiples of the model's
    downsampling factor; each checked to fit ``budget`` bytes (:func:`check_memory`)."""
    import numpy as np
    from PIL import Image

    from kepler.data import UNREADABLE_IMAGE_ERRORS, ImageTransform, to_rgb, to_tensor

    factor = model.downsample_factor
    out = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = to_rgb(image)
        except UNREADABLE_IMAGE_ERRORS as exc:
            raise CLIError(f"cannot read image {path}: {exc}") from None
        if size is not None:
            if size % factor:
                raise CLIError(f"--size {size} must be a multiple of the downsampling factor {factor}")
            x = ImageTransform(size, random_crop=False, flip=False)(image)
        else:
            array = np.asarray(image, dtype=np.float32)
            h, w = (array.shape[0] // factor) * factor, (array.shape[1] // factor) * factor
            if h == 0 or w == 0:
                raise CLIError(f"image {path} is smaller than the downsampling factor {factor}")
            x = to_tensor(array[:h, :w])
        check_memory(model, x.shape[-2], x.shape[-1], budget, f"image {path}")
        out.append((Path(path).stem, x[None]))
    return out


def _cmd_reconstruct(args) -> int:
    import numpy as np
    import torch

    from kepler.data import to_uint8
    from kepler.io.images import save_png

    out = output_folder(args.out)
    model, device = _tokenizer(args)
    with torch.no_grad():
        for name, x in load_images(args.images, args.size, model, memory_budget(args.max_memory, device)):
            x_rec = model(x.to(device))[0].cpu()
            path = save_png(np.concatenate([to_uint8(x[0]), to_uint8(x_rec[0])], axis=1), out / f"{name}_recon.png")
            print(path)
    return 0


def _cmd_encode(args) -> int:
    import numpy as np

    out = output_folder(args.out)
    model, device = _tokenizer(args)
    for name, x in load_images(args.images, args.size, model, memory_budget(args.max_memory, device)):
        indices = model.encode_to_indices(x.to(device))[0].cpu().numpy()
        np.save(out / f"{name}.npy", indices.astype(np.int64))
        print(f"{out / f'{name}.npy'}: codes {indices.shape}")
    return 0


def _cmd_decode(args) -> int:
    import numpy as np
    import torch

    from kepler.io.images import save_image

    out = output_folder(args.out)
    model, device = _tokenizer(args)
    budget = memory_budget(args.max_memory, device)
    q = model.quantize
    stages = getattr(q, "num_quantizers", None)
    if args.stages is not None and stages is None:
        raise CLIError(f"--stages needs a residual tokenizer (type: residual); this one's quantizer is {q.type_name!r}")
    if args.stages is not None and not 1 <= args.stages <= stages:
        raise CLIError(f"--stages must be in [1, {stages}] (the tokenizer's stages), got {args.stages}")
    decoding = {} if args.stages is None else {"num_stages": args.stages}
    for path in args.codes:
        try:
            codes = np.load(path)
        except (OSError, ValueError) as exc:
            raise CLIError(f"cannot read code map {path}: {exc}") from None
        tokens = q.tokens_per_position
        if codes.size == 0:
            raise CLIError(f"{path}: the code map is empty ({codes.dtype} {codes.shape})")
        if codes.ndim != 3 or codes.shape[-1] != tokens or not np.issubdtype(codes.dtype, np.integer):
            raise CLIError(f"{path}: expected an integer (H, W, {tokens}) code map, got {codes.dtype} {codes.shape}")
        if codes.min() < 0 or codes.max() >= q.codebook_size:
            raise CLIError(f"{path}: code indices must be in [0, {q.codebook_size}), got [{codes.min()}, {codes.max()}]")
        factor = model.downsample_factor
        check_memory(model, codes.shape[0] * factor, codes.shape[1] * factor, budget, f"code map {path}")
        indices = torch.from_numpy(codes.astype(np.int64))[None].to(device)
        image = model.decode_indices(indices, **decoding)[0].cpu()
        print(save_image(image, out / f"{Path(path).stem}.png"))
    return 0


def _cmd_export(args) -> int:
    from kepler.io.pretrained import CARD_FILE, CONFIG_FILE, PRIOR_TOKENIZER, WEIGHTS_FILE
    from kepler.models.pretrained import export_checkpoint

    out = output_folder(args.out)
    exported = export_checkpoint(args.checkpoint, out, raw_weights=args.raw_weights)
    tokenizer = f", {out / PRIOR_TOKENIZER}/ (its tokenizer)" if exported.kind == "prior" else ""
    print(f"kepler export: {weights_name(exported.weights)}; wrote {out / WEIGHTS_FILE}, {out / CONFIG_FILE}, "
          f"{out / CARD_FILE}{tokenizer} " + (f"(metrics from {exported.metrics})" if exported.metrics
                                              else "(no metrics.json of this step found: the card has none)"))
    return 0


def _cmd_convert(args) -> int:
    from kepler.train.convert import convert

    out = output_folder(args.out)
    written = convert(args.checkpoint, args.config, out, trusted_globals=args.trust_global,
                      stubbed_globals=args.stub_global, overwrite=args.overwrite)
    q = written["model"].quantize
    print(f"kepler convert: {q.tokens_per_position} partition(s) {q.partition.name!r}, {q.codebook_size} codes, "
          f"f={written['model'].downsample_factor}; wrote {written['checkpoint']}, {written['config']}")
    return 0


# Samples in kepler sample's grid.png (the first ones: a grid of thousands says nothing).
GRID_SAMPLES = 64


def _cmd_sample(args) -> int:
    import numpy as np
    import torch

    from kepler.distributed import cleanup_distributed, init_distributed, resolve_device
    from kepler.io.images import save_image, save_image_grid
    from kepler.models.load import load_model, load_prior_tokenizer
    from kepler.models.sampling import sample_batches
    from kepler.progress import Progress

    if args.cfg_schedule is not None and args.cfg_scale is None:
        raise CLIError("--cfg-schedule needs --cfg-scale")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if args.out is not None and processes > 1:
        raise CLIError(f"{processes} processes would write the same files into --out: sample into one .npz with --npz")
    out = output_folder(args.out) if args.out is not None else _npz_path(args.npz)
    ranks = init_distributed(args.device) if args.npz is not None else None
    device = ranks.device if ranks is not None else resolve_device(args.device)
    try:
        prior = load_model(args.checkpoint, device, kind="prior", raw_weights=args.raw_weights)
        tokenizer = load_prior_tokenizer(prior, device, args.tokenizer)
        classes = "balanced" if args.class_balanced else args.class_label
        sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg_scale,
                        cfg_schedule=args.cfg_schedule or "constant")
        if ranks is not None:
            return _sample_npz(args, prior, tokenizer, out, classes, sampling, ranks.is_main)
        digits = max(4, len(str(args.num - 1)))
        grid, index = [], 0
        batches = sample_batches(prior.model, tokenizer, args.num, classes, batch_size=args.batch_size,
                                 seed=args.seed, **sampling)
        # One batch needs no progress; more get a bar, or about ten lines in a log file.
        progress = Progress(args.num, "kepler sample", "sample", lines=10, enabled=args.num > args.batch_size)
        for codes, images in batches:
            images = images.cpu()
            if index < GRID_SAMPLES:
                grid.append(images[: GRID_SAMPLES - index])
            for code_map, image in zip(codes.cpu().numpy(), images):
                np.save(out / f"sample{index:0{digits}d}.npy", code_map)
                save_image(image, out / f"sample{index:0{digits}d}.png")
                index += 1
            progress.update(len(codes))
        progress.close()
    finally:
        cleanup_distributed()
    path = save_image_grid(torch.cat(grid), out / "grid.png")
    print(f"kepler sample: {args.num} samples (seed {args.seed}{_guidance(args)}) in {out}: {path.name} (the first "
          f"{min(args.num, GRID_SAMPLES)}), sample*.png, sample*.npy; prior's {weights_name(prior.weights)}, "
          f"tokenizer's {weights_name(_tokenizer_weights(prior))}")
    return 0


def _guidance(args) -> str:
    """How the summary line names the guidance of ``args``."""
    if args.cfg_scale is None:
        return ""
    return f", guidance scale {args.cfg_scale:g}" + (" linear" if args.cfg_schedule == "linear" else "")


def _tokenizer_weights(prior) -> str:
    return prior.checkpoint["tokenizer"].get("weights", "trained")


def _npz_path(path: str) -> Path:
    """``--npz PATH``: a ``.npz`` file whose folder can be made, checked before any work is done."""
    path = Path(path)
    if path.suffix != ".npz":
        raise CLIError(f"--npz {path}: the file name must end in .npz")
    if path.is_dir():
        raise CLIError(f"--npz {path} is a folder, not a file")
    output_folder(str(path.parent), "--npz")
    return path


def _sample_npz(args, prior, tokenizer, out: Path, classes, sampling: dict, is_main: bool) -> int:
    """``kepler sample --npz``: :func:`kepler.models.sampling.sample_npz`, with a progress bar (and its
    ETA) on rank 0."""
    from kepler.io.files import file_sha256
    from kepler.models.sampling import sample_npz
    from kepler.progress import Progress

    if classes is None and prior.model.num_classes:
        classes = "random"
    # What else decides the samples: a resumed run must draw from the same prior and tokenizer.
    run = {"prior_sha256": file_sha256(args.checkpoint), "prior_weights": prior.weights,
           "tokenizer_sha256": prior.checkpoint["tokenizer"]["sha256"]}
    bars = []

    def progress(done: int, share: int) -> None:
        if not bars:  # the first call: the chunks found start the bar, and stay out of its rate
            bars.append(Progress(share, "kepler sample", "sample", initial=done, lines=10, enabled=is_main))
        bars[0].update(done - bars[0].done)

    try:
        written = sample_npz(prior.model, tokenizer, out, args.num, classes, batch_size=args.batch_size,
                             seed=args.seed, run=run, progress=progress, **sampling)
    finally:
        for bar in bars:
            bar.close()
    if written is not None:
        labels = {None: "", "random": ", random classes", "balanced": ", classes balanced"}.get(
            classes, f", class {classes}")
        print(f"kepler sample: {args.num} samples (seed {args.seed}{_guidance(args)}{labels}) in {written}; prior's "
              f"{weights_name(prior.weights)}, tokenizer's {weights_name(_tokenizer_weights(prior))}")
    return 0
