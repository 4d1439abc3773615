"""The commands that train and judge runs: ``kepler train``, ``kepler prior train | eval``, ``kepler study``,
``kepler fid``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from kepler.cli import (
    CLIError,
    add_device,
    add_inception,
    add_raw_weights,
    add_run,
    add_seed,
    add_tokenizer,
    output_folder,
    positive_int,
    weights_name,
)


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train a tokenizer from a YAML config",
                       description="Train a Kepler image tokenizer. Runs under torchrun for DDP.")
    add_run(p, "a YAML config file or a built-in config name (see --list-configs); unknown keys are an error",
            optional_config=True)
    p.add_argument("--list-configs", action="store_true",
                   help="list the built-in configs (kepler train NAME, kepler prior train NAME, kepler study NAME) "
                        "and exit")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("prior", help="train or evaluate a prior over a tokenizer's codes",
                       description="The second stage: an autoregressive CodeTransformer over the index maps "
                                   "of a frozen tokenizer (config key tokenizer.checkpoint).")
    prior_sub = p.add_subparsers(dest="prior_command", metavar="PRIOR_COMMAND", required=True)
    t = prior_sub.add_parser("train", help="train a prior from a YAML config")
    add_run(t, "a YAML config file or a built-in config name (e.g. prior_sample)")
    t.set_defaults(func=_cmd_prior_train)
    e = prior_sub.add_parser("eval", help="held-out bits per token and per position, their baselines, and the "
                                          "FID and Inception Score of samples")
    e.add_argument("checkpoint", help="a checkpoint written by kepler prior train")
    add_device(e)
    e.add_argument("--out", default=None, help="folder for metrics.json (default: eval/ in the checkpoint's run folder)")
    e.add_argument("--batch-size", type=positive_int, default=16)
    add_inception(e, "the samples' FID and Inception Score")
    e.add_argument("--num-samples", type=int, default=256,
                   help="samples for FID and Inception Score (0: none; both are biased at small counts, so "
                        "compare priors at equal counts)")
    add_seed(e, "seed of the samples")
    add_tokenizer(e)
    add_raw_weights(e, " of the prior; its tokenizer's are those the prior was trained on")
    e.set_defaults(func=_cmd_prior_eval)

    p = sub.add_parser("study", help="run a codebook study (see kepler.study)", description="Run a codebook study.")
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

    p = sub.add_parser("fid", help="FID, sFID, Inception Score, precision and recall of samples against "
                                   "reference images",
                       description="Score generated images against reference images as guided-diffusion's ADM "
                                   "evaluator does (FID and sFID, Inception Score in 10 splits, precision and recall "
                                   "with k = 3), on the FID Inception network from a local weights file.")
    image_set = ("an ADM-layout .npz (arr_0: uint8 N x H x W x 3), a folder of images (taken as they are) or a data "
                 "spec (sample, faces, a list file: its held-out images, cropped to --size)")
    p.add_argument("samples", help=f"the generated images: {image_set}")
    p.add_argument("reference",
                   help="the reference images, given as the samples are, or their statistics (--save-stats)")
    p.add_argument("--save-stats", default=None, metavar="PATH",
                   help="write the reference's statistics to the .npz PATH, to give as REFERENCE next time")
    p.add_argument("--out", default=None, help="folder for fid.json")
    p.add_argument("--size", type=positive_int, default=256, help="crop side of a data spec's images")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images through the network at a time")
    add_device(p)
    add_inception(p, "every metric", without="kepler fid stops without them")
    p.set_defaults(func=_cmd_fid)


def _cmd_train(args) -> int:
    from kepler.io.config import load_config
    from kepler.io.config_files import builtin_configs

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
    a signal's exit code, the one line of a lost rank or an unwritable checkpoint, the summary
    printed by rank 0.

    A scheduler's stop signal (SIGTERM, SIGUSR1) exits 0 once the checkpoint is saved: the job
    ended as planned, so torchrun reports success and a job script goes on to requeue it. Ctrl-C
    (SIGINT) exits 130, as the shell's convention for an interrupted command, so ``kepler train
    && kepler eval`` does not evaluate a run that a person stopped."""
    from kepler.distributed import RankLostError
    from kepler.train.trainer import CheckpointWriteError, TrainingInterrupted, train

    resume = args.resume
    if isinstance(resume, str) and Path(resume).is_dir():
        raise CLIError(f"--resume: {resume} is a folder; training resumes from a checkpoint file "
                       "(an exported model holds no optimizer state)")
    if isinstance(resume, str) and not Path(resume).is_file():
        raise CLIError(f"--resume: checkpoint {resume} does not exist")
    is_rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        metrics = train(cfg, resume=resume, overwrite=args.overwrite, **train_options)
    except TrainingInterrupted as stop:
        if is_rank0:  # every rank stopped at the same step; one line says so
            print(f"{command}: {stop}; continue with --resume", file=sys.stderr)
        return 0 if stop.preempted else 128 + stop.signum
    except (RankLostError, CheckpointWriteError) as error:  # the run failed, not the user (2)
        if args.verbose:
            raise
        # Each rank that lost another says so (its line names it); rank 0's failed write, once for all.
        if is_rank0 or isinstance(error, RankLostError):
            print(f"{command}: error: {error}", file=sys.stderr)
        return 1
    if is_rank0:
        print(summary(metrics))
    return 0


def _train_summary(m: dict) -> str:
    """What ``kepler train`` prints at the end: the run's metrics.json in a few lines."""
    run = Path(m["run"])
    return (
        f"kepler train: {run}: {m['step']} steps, {m['images_seen']} images in "
        f"{m['train_seconds'] / 60:.1f} min ({m['train_images_per_s']:.1f} img/s)\n"
        f"  validation ({m['images']} held-out images, {weights_name(m.get('weights', 'trained'))}): PSNR {m['psnr']:.2f} dB "
        f"(mean-colour baseline {m['baseline_psnr']:.2f} dB), SSIM {m['ssim']:.3f}, L1 {m['l1']:.4f}\n"
        f"  codebook: utilization {100 * m['utilization']:.1f}% of {m['codebook_entries']} entries, "
        f"perplexity {m['perplexity']:.1f}\n"
        f"  wrote {run / 'metrics.json'}, {run / 'reconstructions.png'}, {m['checkpoint']}, {run / 'tb'}"
    )


def _cmd_prior_train(args) -> int:
    from kepler.io.config import load_prior_config
    from kepler.train.prior_task import PriorTask

    cfg = load_prior_config(args.config, args.overrides)
    return _run_training(args, cfg, "kepler prior train", _prior_train_summary, task_class=PriorTask)


def _prior_train_summary(m: dict) -> str:
    return (f"kepler prior train: {m['run']}: {m['step']} steps, {m['images_seen']} maps in "
            f"{m['train_seconds'] / 60:.1f} min\n{_prior_summary(m)}\n"
            f"  wrote {Path(m['run']) / 'metrics.json'}, {m['checkpoint']}")


def _prior_summary(m: dict) -> str:
    return (f"  validation ({m['val_maps']} held-out maps, {weights_name(m.get('weights', 'trained'))}): {m['bits_per_token']:.4f} bits/token, "
            f"{m['bits_per_position']:.4f} bits/position\n"
            f"  baselines: unigram {m['unigram_bits_per_token']:.4f} bits/token, "
            f"per-position unigram {m['position_unigram_bits_per_token']:.4f} bits/token")


def _cmd_prior_eval(args) -> int:
    from kepler.distributed import resolve_device
    from kepler.train.prior_eval import evaluate_prior

    if args.num_samples < 0:
        raise CLIError(f"--num-samples must be >= 0, got {args.num_samples}")
    # Not the run folder itself: its metrics.json is the training's summary.
    out = output_folder(args.out or str(Path(args.checkpoint).resolve().parent.parent / "eval"))
    metrics = evaluate_prior(args.checkpoint, resolve_device(args.device), args.batch_size,
                             num_samples=args.num_samples, inception_path=args.inception, seed=args.seed,
                             tokenizer_path=args.tokenizer, raw_weights=args.raw_weights)
    path = out / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"kepler prior eval: {args.checkpoint} (step {metrics['step']}, prior's "
          f"{weights_name(metrics['weights'])}, tokenizer's {weights_name(metrics['tokenizer_weights'])})\n{_prior_summary(metrics)}\n"
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


def _study_command(args) -> str:
    """The command line recorded in the study's report: what decides the results (config, quick
    mode, output folder, parallel runs), not where the report is copied (--readme)."""
    words = ["kepler study", str(args.config)] + (["--quick"] if args.quick else [])
    words += ([f"--out {args.out}"] if args.out else []) + ([f"--jobs {args.jobs}"] if args.jobs is not None else [])
    words += [f"--variants {args.variants}"] if args.variants else []
    return " ".join(words)


def _print_study_run(result: dict, progress: str) -> None:
    """One line per finished run of a study, as the study collects them, ending with ``progress``
    (:meth:`kepler.progress.Progress.status`: runs done, time per run, ETA)."""
    m, prior = result["metrics"], result.get("prior")
    if result.get("reused"):
        note = " (reused)"
    elif result.get("tokenizer_reused"):
        note = f" (tokenizer reused; prior in {prior['wall_s'] / 60:.1f} min)"
    else:
        note = f" in {(result['wall_s'] + (prior['wall_s'] if prior else 0.0)) / 60:.1f} min"
    bits = f", prior {m['prior_bits_per_image']:.1f} bits/image" if prior else ""
    print(f"kepler study: {result['variant']} seed {result['seed']}: PSNR {m['psnr']:.2f} dB, "
          f"utilization {m['utilization']:.3f}{bits}{note}; {progress}", flush=True)


def _cmd_study(args) -> int:
    from kepler.progress import Progress
    from kepler.study.config import load_study_config, select_variants
    from kepler.study.report import attribute_to_training_study, update_readme, write_outputs, write_sweep_outputs
    from kepler.study.runner import planned_runs, run_study, run_sweep_only

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
    out = output_folder(args.out or study["out"], "--out" if args.out else f"{args.config}: out")
    command = _study_command(args)
    print(f"kepler study: {len(study['variants'])} variants x {len(study['seeds'])} seeds"
          + (" + a weight sweep" if study["sweep"] else "") + (" + a prior per run" if study["prior"] else "")
          + f", {study['jobs']} run(s) at a time -> {out}",
          flush=True)
    # Runs end minutes apart: a line each, on a terminal as in a log file, with the count and the
    # ETA (Progress draws nothing itself). A reused run took no time: counted, not in the rate.
    progress = Progress(planned_runs(study, args.sweep_only), "kepler study", "run", enabled=False)

    def on_result(result: dict) -> None:
        (progress.skip if result.get("reused") else progress.update)()
        _print_study_run(result, progress.status())

    if args.sweep_only:
        summary = run_sweep_only(study, out, on_result=on_result)
        written = write_sweep_outputs(summary, study["name"], out, f"{command} --sweep-only")
        for key, param in summary["params"].items():
            print(f"kepler study: {key} = {param['weight']:g} ({param['rule']})")
        print("kepler study: wrote " + ", ".join(str(p) for p in written))
        return 0
    result = run_study(study, out, on_result=on_result)
    if report_dir is None:
        command = attribute_to_training_study(result, out, command)
    written = write_outputs(result, out / report_dir if report_dir else out, command)
    if args.readme:
        written.append(update_readme(Path(args.readme), result, command, out))
    print(f"kepler study: done in {result['wall_minutes']:.1f} min; wrote " + ", ".join(str(p) for p in written))
    return 0


def _cmd_fid(args) -> int:
    from kepler.distributed import resolve_device
    from kepler.metrics.inception import load_inception_network
    from kepler.progress import Progress
    from kepler.train.fid import evaluate_samples, open_image_set

    out = output_folder(args.out) if args.out is not None else None
    if args.save_stats is not None and not Path(args.save_stats).resolve().parent.is_dir():
        raise CLIError(f"--save-stats {args.save_stats}: its folder does not exist")
    samples, reference = open_image_set(args.samples, args.size), open_image_set(args.reference, args.size)
    network, reason = load_inception_network(args.inception)
    if network is None:
        raise CLIError(f"the FID Inception network is needed: {reason} (give its weights with --inception; they are "
                       "never downloaded)")

    def progress(batches, total: int, what: str):  # a bar, or about ten lines in a log file
        return Progress(total, f"kepler fid: {what}", "batch", lines=10, enabled=total > 1).track(batches)

    metrics = evaluate_samples(samples, reference, network, batch_size=args.batch_size,
                               device=resolve_device(args.device), save_stats=args.save_stats, progress=progress)
    metrics = {"samples": args.samples, "reference": args.reference, **metrics}
    print(_fid_summary(metrics))
    if args.save_stats is not None:
        print(f"  wrote the reference's statistics to {args.save_stats}")
    if out is not None:
        path = out / "fid.json"
        path.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"  wrote {path}")
    return 0


def _fid_summary(m: dict) -> str:
    """What ``kepler fid`` prints: each metric, or why it is off."""
    score = (f"Inception Score {m['inception_score']:.4f}" if "inception_score" in m
             else f"Inception Score: off: {m['inception_score_off_reason']}")
    precision_recall = (f"precision {m['precision']:.4f}, recall {m['recall']:.4f}" if "precision" in m
                        else f"precision and recall: off: {m['precision_recall_off_reason']}")
    return (f"kepler fid: {m['num_samples']} samples ({m['samples']}) against {m['num_reference']} reference images "
            f"({m['reference']})\n  FID {m['fid']:.4f}, sFID {m['sfid']:.4f}\n  {score}\n  {precision_recall}")
