"""``kepler`` command line: train, eval, reconstruct, encode, decode, export, convert, study, doctor,
prior (train, eval), sample.

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
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from kepler import __version__


class CLIError(Exception):
    """A user error: printed as ``kepler <command>: error: <message>``, exit status 2."""


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _output_folder(path: str, option: str = "--out") -> Path:
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


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a tokenizer from a YAML config",
                       description="Train a Kepler image tokenizer. Runs under torchrun for DDP.")
    p.add_argument("config", nargs="?", default=None,
                   help="a YAML config file or a built-in config name (see --list-configs); unknown keys are an error")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides in dot notation, e.g. optim.base_lr=1e-5 data.batch_size=8")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT, or (no value) from the run's checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run folder that holds a previous run (deletes its checkpoint, "
                        "log.jsonl, metrics.json and tb/)")
    p.add_argument("--list-configs", action="store_true",
                   help="list the built-in configs (kepler train NAME, kepler study NAME) and exit")
    p.set_defaults(func=_cmd_train)


def _add_checkpoint_args(p) -> None:
    p.add_argument("checkpoint", help="a checkpoint written by kepler train (e.g. runs/NAME/checkpoints/last.pt) "
                                      "or a pretrained model folder (from kepler export or VQModel.save_pretrained)")
    p.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, cuda:1 ...")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (PSNR, SSIM, L1, utilization, LPIPS, rFID)",
                       description="Evaluate a checkpoint on the validation split of a data set.")
    _add_checkpoint_args(p)
    p.add_argument("--data", default="sample", help="sample, faces, a folder of images or a list file")
    p.add_argument("--resolution", type=int, nargs="+", default=None,
                   help="crop sides to evaluate at (default: the training size)")
    p.add_argument("--out", default=None, help="folder for eval.json")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--max-images", type=_positive_int, default=None)
    p.add_argument("--lpips-vgg", default=None, help="local VGG16 weights (torchvision layout) for LPIPS")
    p.add_argument("--lpips-lin", default=None, help="local LPIPS linear-layer weights (lpips v0.1 vgg.pth)")
    p.add_argument("--inception", default=None, help="local FID Inception weights (pt_inception-2015-12-05)")
    p.set_defaults(func=_cmd_eval)


def _add_prior(sub) -> None:
    p = sub.add_parser("prior", help="train or evaluate a prior over a tokenizer's codes",
                       description="The second stage: an autoregressive CodeTransformer over the index maps "
                                   "of a frozen tokenizer (config key tokenizer.checkpoint).")
    prior_sub = p.add_subparsers(dest="prior_command", metavar="PRIOR_COMMAND", required=True)
    t = prior_sub.add_parser("train", help="train a prior from a YAML config")
    t.add_argument("config", help="a YAML config file or a built-in config name (e.g. prior_sample)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides in dot notation")
    t.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT, or (no value) from the run's checkpoints/last.pt")
    t.add_argument("--overwrite", action="store_true", help="start over in a run folder that holds a previous run")
    t.set_defaults(func=_cmd_prior_train)
    e = prior_sub.add_parser("eval", help="held-out bits per token and per position, their baselines, and the "
                                          "FID and Inception Score of samples")
    e.add_argument("checkpoint", help="a checkpoint written by kepler prior train")
    e.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, cuda:1 ...")
    e.add_argument("--out", default=None, help="folder for metrics.json (default: eval/ in the checkpoint's run folder)")
    e.add_argument("--batch-size", type=_positive_int, default=16)
    e.add_argument("--inception", default=None,
                   help="local FID Inception weights (pt_inception-2015-12-05) for the samples' FID and Inception "
                        "Score (default: torch hub's checkpoints folder; never downloaded: off without them)")
    e.add_argument("--num-samples", type=int, default=256,
                   help="samples for FID and Inception Score (0: none; both are biased at small counts, so "
                        "compare priors at equal counts)")
    e.add_argument("--seed", type=int, default=0, help="seed of the samples")
    e.set_defaults(func=_cmd_prior_eval)


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample images from a prior (PNG grid, PNGs and .npy code maps)",
                       description="Sample index maps from a prior and decode them with its tokenizer.")
    p.add_argument("checkpoint", help="a checkpoint written by kepler prior train")
    p.add_argument("--num", type=_positive_int, default=16, help="samples to draw")
    p.add_argument("--class", dest="class_label", type=int, default=None, help="class of a class-conditional prior")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=_positive_int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same samples on one device")
    p.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_cmd_sample)


def _add_image_io(sub) -> None:
    for name, helptext in (
        ("reconstruct", "write original | reconstruction PNGs side by side"),
        ("encode", "turn images into .npy code-index maps (H/f, W/f, P)"),
    ):
        p = sub.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        _add_checkpoint_args(p)
        p.add_argument("images", nargs="+", help="image files")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--size", type=int, default=None,
                       help="resize the shorter side to SIZE and centre-crop SIZE x SIZE "
                            "(default: keep the image, cropped to a multiple of the downsampling factor)")
        p.set_defaults(func=_cmd_reconstruct if name == "reconstruct" else _cmd_encode)
    p = sub.add_parser("decode", help="turn .npy code-index maps back into PNG images",
                       description="Turn .npy code-index maps (from kepler encode) back into PNG images.")
    _add_checkpoint_args(p)
    p.add_argument("codes", nargs="+", help=".npy files of (H, W, P) int code indices")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_cmd_decode)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint's model as a folder to share (safetensors, config, card)",
                       description="Write the model of a training checkpoint as a pretrained folder: "
                                   "model.safetensors, config.yaml (with the weights' SHA-256) and a README.md model "
                                   "card (metrics from the run's metrics.json). Every command that takes a checkpoint "
                                   "takes the folder; in Python, VQModel.from_pretrained(folder).")
    p.add_argument("checkpoint", help="a checkpoint written by kepler train (e.g. runs/NAME/checkpoints/last.pt)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_cmd_export)


def _add_convert(sub) -> None:
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
    p.set_defaults(func=_cmd_convert)


def _add_study(sub) -> None:
    p = sub.add_parser("study", help="run a codebook study (see kepler.study)",
                       description="Run a codebook study.")
    p.add_argument("config", help="study config: a YAML file or a built-in name, e.g. study_sample")
    p.add_argument("--quick", action="store_true",
                   help="the config's quick block: tiny model, a few steps per variant (a smoke test)")
    p.add_argument("--out", default=None, help="output folder (default: the config's 'out')")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the config's 'jobs')")
    p.add_argument("--sweep-only", action="store_true",
                   help="run only the weight sweep; writes sweep.json and sweep.md (the study reuses its runs)")
    p.add_argument("--variants", default=None, metavar="NAME[,NAME...]",
                   help="run only these variants (and the ones they are compared to); their runs are the "
                        "study's, so the full study reuses them; the report goes to OUT/variants_<names>/")
    p.add_argument("--readme", default=None, metavar="README",
                   help="also write the results between the kepler-study markers of this README "
                        "(finished runs are reused, so this is quick after a study)")
    p.set_defaults(func=_cmd_study)


def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="versions, devices and every backend checked against the reference",
                       description="List torch/triton/CUDA versions, the devices and kepler._C's backends; check "
                                   "every op on every available backend against the float64 reference (forward and "
                                   "backward, float32 and bfloat16) and time it against plain PyTorch. Exits 1 when "
                                   "a backend disagrees with the reference.")
    p.add_argument("--triton-interpret", action="store_true",
                   help="run the Triton kernels in the Triton interpreter (TRITON_INTERPRET=1), so the triton "
                        "backend is checked on the CPU too; for machines without a GPU")
    p.add_argument("--device", action="append", default=None, metavar="DEVICE",
                   help="check on DEVICE (repeatable; default: cpu and every CUDA device)")
    p.add_argument("--backend", action="append", default=None, metavar="BACKEND",
                   help="check only BACKEND (repeatable; default: every backend available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per speed figure (the median is shown)")
    p.add_argument("--quick", action="store_true", help="time the tiny check inputs (a smoke run; figures say little)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the full report as JSON")
    p.set_defaults(func=_cmd_doctor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kepler", description="Train, evaluate and use Kepler image tokenizers.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Examples::", 1)[1],
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-V", "--version", action="version", version=f"kepler {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_image_io(sub)
    _add_export(sub)
    _add_convert(sub)
    _add_study(sub)
    _add_doctor(sub)
    _add_prior(sub)
    _add_sample(sub)
    return parser


# ---------------------------------------------------------------------------------- commands


def _cmd_train(args) -> int:
    from kepler.train.config import builtin_configs, load_config

    if args.list_configs:
        configs = builtin_configs().values()
        width = max(len(c.name) for c in configs)
        for c in configs:
            print(f"{c.name:<{width}}  kepler {c.kind:<5}  {c.description}")
        return 0
    if args.config is None:
        raise CLIError("give a config file or a built-in config name (kepler train --list-configs shows them)")
    return _run_training(args, load_config(args.config, args.overrides), "kepler train", _train_summary)


def _run_training(args, cfg, command: str, summary, **train_options) -> int:
    """What ``kepler train`` and ``kepler prior train`` share: the --resume checks, the trainer,
    a signal's exit code, the summary printed by rank 0."""
    from kepler.train.trainer import TrainingInterrupted, train

    resume = args.resume
    if isinstance(resume, str) and Path(resume).is_dir():
        raise CLIError(f"--resume: {resume} is a folder; training resumes from a checkpoint file "
                       "(an exported model holds no optimizer state)")
    if isinstance(resume, str) and not Path(resume).is_file():
        raise CLIError(f"--resume: checkpoint {resume} does not exist")
    try:
        metrics = train(cfg, resume=resume, overwrite=args.overwrite, **train_options)
    except TrainingInterrupted as stop:
        print(f"{command}: {stop}; continue with --resume", file=sys.stderr)
        return 128 + stop.signum
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary(metrics))
    return 0


def _cmd_prior_train(args) -> int:
    from kepler.train.config import load_prior_config
    from kepler.train.prior_task import PriorTask

    cfg = load_prior_config(args.config, args.overrides)
    return _run_training(args, cfg, "kepler prior train", _prior_train_summary, task_class=PriorTask)


def _prior_train_summary(m: dict) -> str:
    return (f"kepler prior train: {m['run']}: {m['step']} steps, {m['images_seen']} maps in "
            f"{m['train_seconds'] / 60:.1f} min\n{_prior_summary(m)}\n"
            f"  wrote {Path(m['run']) / 'metrics.json'}, {m['checkpoint']}")


def _prior_summary(m: dict) -> str:
    return (f"  validation ({m['val_maps']} held-out maps): {m['bits_per_token']:.4f} bits/token, "
            f"{m['bits_per_position']:.4f} bits/position\n"
            f"  baselines: unigram {m['unigram_bits_per_token']:.4f} bits/token, "
            f"per-position unigram {m['position_unigram_bits_per_token']:.4f} bits/token")


def _cmd_prior_eval(args) -> int:
    import json

    from kepler.distributed import resolve_device
    from kepler.train.prior_task import evaluate_prior

    if args.num_samples < 0:
        raise CLIError(f"--num-samples must be >= 0, got {args.num_samples}")
    # Not the run folder itself: its metrics.json is the training's summary.
    out = _output_folder(args.out or str(Path(args.checkpoint).resolve().parent.parent / "eval"))
    metrics = evaluate_prior(args.checkpoint, resolve_device(args.device), args.batch_size,
                             num_samples=args.num_samples, inception_path=args.inception, seed=args.seed)
    path = out / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"kepler prior eval: {args.checkpoint} (step {metrics['step']})\n{_prior_summary(metrics)}\n"
          f"{_sample_metrics_summary(metrics)}\n  wrote {path}")
    return 0


def _sample_metrics_summary(m: dict) -> str:
    """The FID and Inception Score lines of ``kepler prior eval``, or why each is off."""
    samples = f"{m['num_samples']} samples (seed {m['seed']})"
    fid = (f"FID {m['fid']:.2f} of {samples} against the {m['val_maps']} held-out images" if "fid" in m
           else f"FID: off: {m['fid_off_reason']}")
    score = (f"Inception Score {m['inception_score'][0]:.3f} +- {m['inception_score'][1]:.3f} of {samples}"
             if "inception_score" in m else f"Inception Score: off: {m['is_off_reason']}")
    return f"  {fid}\n  {score}"


def _cmd_sample(args) -> int:
    import numpy as np

    from kepler.data import to_uint8
    from kepler.distributed import resolve_device
    from kepler.train.evaluate import save_image_grid
    from kepler.train.prior_task import load_prior, prior_tokenizer, sample_images

    out = _output_folder(args.out)
    device = resolve_device(args.device)
    prior, state = load_prior(args.checkpoint, device)
    tokenizer = prior_tokenizer(prior, state, device)
    codes, images = sample_images(prior, tokenizer, args.num, args.class_label, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for i, (code_map, image) in enumerate(zip(codes.cpu().numpy(), images.cpu())):
        np.save(out / f"sample{i:04d}.npy", code_map)
        _save_png(to_uint8(image), out / f"sample{i:04d}.png")
    grid = save_image_grid(images.cpu(), out / "grid.png")
    print(f"kepler sample: {args.num} samples (seed {args.seed}) in {out}: {grid.name}, sample*.png, sample*.npy")
    return 0


def _train_summary(m: dict) -> str:
    """What ``kepler train`` prints at the end: the run's metrics.json in a few lines."""
    run = Path(m["run"])
    return (
        f"kepler train: {run}: {m['step']} steps, {m['images_seen']} images in "
        f"{m['train_seconds'] / 60:.1f} min ({m['train_images_per_s']:.1f} img/s)\n"
        f"  validation ({m['images']} held-out images): PSNR {m['psnr']:.2f} dB "
        f"(mean-colour baseline {m['baseline_psnr']:.2f} dB), SSIM {m['ssim']:.3f}, L1 {m['l1']:.4f}\n"
        f"  codebook: utilization {100 * m['utilization']:.1f}% of {m['codebook_entries']} entries, "
        f"perplexity {m['perplexity']:.1f}\n"
        f"  wrote {run / 'metrics.json'}, {run / 'reconstructions.png'}, {m['checkpoint']}, {run / 'tb'}"
    )


def _cmd_eval(args) -> int:
    from kepler.train.evaluate import evaluate, format_table

    if args.out is not None:
        _output_folder(args.out)
    resolutions = args.resolution if args.resolution else [None]
    results = evaluate(
        args.checkpoint, data=args.data, resolutions=resolutions, out=args.out, batch_size=args.batch_size,
        device=args.device, lpips_vgg_path=args.lpips_vgg, lpips_lin_path=args.lpips_lin,
        inception_path=args.inception, max_images=args.max_images,
    )
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


def _load_images(paths, size: int | None, factor: int):
    """Image files -> list of (name, (1, 3, H, W) tensor in [-1, 1]); H, W multiples of ``factor``."""
    from PIL import Image

    from kepler.data import UNREADABLE_IMAGE_ERRORS, ImageTransform, to_rgb, to_tensor

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
            import numpy as np

            array = np.asarray(image, dtype=np.float32)
            h, w = (array.shape[0] // factor) * factor, (array.shape[1] // factor) * factor
            if h == 0 or w == 0:
                raise CLIError(f"image {path} is smaller than the downsampling factor {factor}")
            x = to_tensor(array[:h, :w])
        out.append((Path(path).stem, x[None]))
    return out


def _model(args):
    from kepler.distributed import resolve_device
    from kepler.train.evaluate import load_model

    device = resolve_device(args.device)
    model, _ = load_model(args.checkpoint, device)
    return model, device


def _save_png(array, path: Path) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


def _cmd_reconstruct(args) -> int:
    import numpy as np
    import torch

    from kepler.data import to_uint8

    out = _output_folder(args.out)
    model, device = _model(args)
    with torch.no_grad():
        for name, x in _load_images(args.images, args.size, model.downsample_factor):
            x_rec = model(x.to(device))[0].cpu()
            pair = np.concatenate([to_uint8(x[0]), to_uint8(x_rec[0])], axis=1)
            _save_png(pair, out / f"{name}_recon.png")
            print(out / f"{name}_recon.png")
    return 0


def _cmd_encode(args) -> int:
    import numpy as np

    out = _output_folder(args.out)
    model, device = _model(args)
    for name, x in _load_images(args.images, args.size, model.downsample_factor):
        indices = model.encode_to_indices(x.to(device))[0].cpu().numpy()
        np.save(out / f"{name}.npy", indices.astype(np.int64))
        print(f"{out / f'{name}.npy'}: codes {indices.shape}")
    return 0


def _cmd_decode(args) -> int:
    import numpy as np
    import torch

    from kepler.data import to_uint8

    out = _output_folder(args.out)
    model, device = _model(args)
    q = model.quantize
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
        image = model.decode_indices(torch.from_numpy(codes.astype(np.int64))[None].to(device))[0].cpu()
        target = out / f"{Path(path).stem}.png"
        _save_png(to_uint8(image), target)
        print(target)
    return 0


def _cmd_export(args) -> int:
    from kepler.models.pretrained import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, export_checkpoint

    out = _output_folder(args.out)
    _, metrics = export_checkpoint(args.checkpoint, out)
    print(f"kepler export: wrote {out / WEIGHTS_FILE}, {out / CONFIG_FILE}, {out / CARD_FILE} "
          + (f"(metrics from {metrics})" if metrics else "(no metrics.json of this step found: the card has none)"))
    return 0


def _cmd_convert(args) -> int:
    from kepler.train.convert import convert

    out = _output_folder(args.out)
    written = convert(args.checkpoint, args.config, out, trusted_globals=args.trust_global,
                      stubbed_globals=args.stub_global)
    q = written["model"].quantize
    print(f"kepler convert: {q.tokens_per_position} partition(s) {q.partition.name!r}, {q.codebook_size} codes, "
          f"f={written['model'].downsample_factor}; wrote {written['checkpoint']}, {written['config']}")
    return 0


def _study_command(args) -> str:
    """The command line recorded in the study's report: what decides the results (config, quick
    mode, output folder, parallel runs), not where the report is copied (--readme)."""
    words = ["kepler study", str(args.config)] + (["--quick"] if args.quick else [])
    words += ([f"--out {args.out}"] if args.out else []) + ([f"--jobs {args.jobs}"] if args.jobs is not None else [])
    words += [f"--variants {args.variants}"] if args.variants else []
    return " ".join(words)


def _print_study_run(result: dict) -> None:
    """One line per finished run of a study, as the study collects them."""
    m, prior = result["metrics"], result.get("prior")
    if result.get("reused"):
        note = " (reused)"
    elif result.get("tokenizer_reused"):
        note = f" (tokenizer reused; prior in {prior['wall_s'] / 60:.1f} min)"
    else:
        note = f" in {(result['wall_s'] + (prior['wall_s'] if prior else 0.0)) / 60:.1f} min"
    bits = f", prior {m['prior_bits_per_image']:.1f} bits/image" if prior else ""
    print(f"kepler study: {result['variant']} seed {result['seed']}: PSNR {m['psnr']:.2f} dB, "
          f"utilization {m['utilization']:.3f}{bits}{note}", flush=True)


def _cmd_study(args) -> int:
    from kepler.study.config import load_study_config, select_variants
    from kepler.study.report import attribute_to_training_study, update_readme, write_outputs, write_sweep_outputs
    from kepler.study.runner import run_study, run_sweep_only

    study = load_study_config(args.config, quick=args.quick)
    report_dir = None
    if args.variants is not None:
        if args.readme or args.sweep_only:
            raise CLIError(f"--variants runs part of a study: {'--readme' if args.readme else '--sweep-only'} "
                           "reports a whole one")
        names = [n.strip() for n in args.variants.split(",") if n.strip()]
        try:
            study = select_variants(study, names)
        except ValueError as error:
            raise CLIError(str(error)) from error
        report_dir = f"variants_{'_'.join(names)}"
    if args.jobs is not None:
        if args.jobs < 1:
            raise CLIError(f"--jobs must be >= 1, got {args.jobs}")
        study["jobs"] = args.jobs
    out = _output_folder(args.out or study["out"], "--out" if args.out else f"{args.config}: out")
    command = _study_command(args)
    print(f"kepler study: {len(study['variants'])} variants x {len(study['seeds'])} seeds"
          + (" + a weight sweep" if study["sweep"] else "") + (" + a prior per run" if study["prior"] else "")
          + f", {study['jobs']} run(s) at a time -> {out}",
          flush=True)
    if args.sweep_only:
        summary = run_sweep_only(study, out, on_result=_print_study_run)
        written = write_sweep_outputs(summary, study["name"], out, f"{command} --sweep-only")
        for key, param in summary["params"].items():
            print(f"kepler study: {key} = {param['weight']:g} ({param['rule']})")
        print("kepler study: wrote " + ", ".join(str(p) for p in written))
        return 0
    result = run_study(study, out, on_result=_print_study_run)
    if report_dir is None:
        command = attribute_to_training_study(result, out, command)
    written = write_outputs(result, out / report_dir if report_dir else out, command)
    if args.readme:
        written.append(update_readme(Path(args.readme), result, command, out))
    print(f"kepler study: done in {result['wall_minutes']:.1f} min; wrote " + ", ".join(str(p) for p in written))
    return 0


def _cmd_doctor(args) -> int:
    import json

    from kepler.kernels._common import triton_interpreter_on

    if args.triton_interpret and not triton_interpreter_on():
        # Triton decides whether a kernel is interpreted when it is decorated, and some Triton
        # versions read TRITON_INTERPRET once when triton is imported, which `import torch` (hence
        # `import kepler`, already done to get here) does. Only a process that starts with the
        # variable set is sure to interpret, so re-run this command in one.
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "kepler", *args.argv],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    if args.repeats < 1:
        raise CLIError(f"--repeats must be >= 1, got {args.repeats}")
    from kepler.doctor import doctor, format_report

    report = doctor(args.device, backends=args.backend, seed=args.seed, repeats=args.repeats, quick=args.quick)
    print(format_report(report))
    if args.json is not None:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if report.passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # kepler doctor --triton-interpret re-runs the same command line
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except (CLIError, FileNotFoundError, ValueError) as exc:
        if args.verbose:
            raise
        print(f"kepler {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
