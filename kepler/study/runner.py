"""Running a study: one run (train, evaluate, summarize), the job lists of the variants and the
sweep, a process pool for them, and :func:`run_study` / :func:`run_sweep_only` that put them
together.

Each run lives in ``<out>/runs/<variant>/seed<seed>`` (sweep runs under ``<out>/runs/sweep/``) and
is reused when its ``result.json`` matches its configuration. Nothing here prints: finished runs
are handed to an ``on_result`` callback (the command line prints a line for each), and a run's own
log records go to its ``console.log``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import platform
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from kepler.study.config import (
    PRIOR_DATA_FROM_TOKENIZER,
    SWEEP_MARKER,
    override_string,
    quantizer_layout,
    sweep_references,
)
from kepler.study.report import table_metrics
from kepler.study.stats import aggregate, summarize_sweep

# What a run's prior adds to its result's metrics (see _train_prior).
PRIOR_RESULT_METRICS = ("prior_bits_per_token", "prior_bits_per_image", "unigram_bits_per_image")

OnResult = Callable[[dict], None]
"""Called with each run's result (see :func:`run_one`; ``"reused": True`` when it was not trained
again) as the study collects it: the sweep's runs first, then the variants' in submission order."""


def _normalized(codebook):
    """Centred, unit-RMS-radius copy of each (sub-)codebook ``(..., K, d)``: distances comparable
    across models whose latents have different scales."""
    centred = codebook - codebook.mean(dim=-2, keepdim=True)
    radius = centred.square().sum(dim=-1).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)
    return centred / radius.unsqueeze(-1)


@contextlib.contextmanager
def _logged_to(path: Path):
    """While the block runs, the ``kepler`` logger's records at INFO and above also go to ``path``
    (a run's ``console.log``). In a pool worker nothing has configured logging, so the logger is let
    through INFO for that time; the records still reach the terminal only as configured there."""
    logger = logging.getLogger("kepler")
    handler = logging.FileHandler(path, mode="w")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def _curves(log_path: Path) -> dict:
    curves = {"step": [], "psnr": [], "utilization": []}
    for line in log_path.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "eval":
            for key in curves:
                curves[key].append(record[key])
    return curves


def run_one(job: Mapping) -> dict:
    """Train, evaluate and summarize one run (its tokenizer, then its prior when the job has one);
    writes and returns its ``result.json``.

    ``job``: ``{"variant", "seed", "base", "overrides", "runtime", "run_dir", "prior"}`` (plain values:
    it crosses a process boundary; ``prior``: None or ``{"config", "overrides"}``). A ``result.json``
    already in ``run_dir`` with the same base config path and overrides is reused; anything else there
    is deleted and the run starts from scratch. Of a reused tokenizer run, the prior is reused when
    its config and overrides match too; else only the prior is trained again (or removed, when the
    job has none). ``"reused": True`` when nothing was trained; ``"tokenizer_reused": True`` when
    only the prior was trained.
    """
    run_dir = Path(job["run_dir"])
    result_path = run_dir / "result.json"
    result = None
    if result_path.is_file():
        cached = json.loads(result_path.read_text())
        if cached.get("overrides") == list(job["overrides"]) and cached.get("base") == job["base"]:
            result = cached
    trained = result is None
    if trained:
        if run_dir.exists():  # a stale or interrupted run: start it again from scratch
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        result = {**_train_tokenizer(job, run_dir), "prior": None}
        result_path.write_text(json.dumps(result))  # an interrupted prior then trains again alone
    if _prior_spec(result.get("prior")) == job.get("prior"):
        return result if trained else {**result, "reused": True}
    # The prior of another config, an interrupted one, or one the job no longer asks for.
    prior_dir = run_dir / "prior"
    if prior_dir.exists():
        shutil.rmtree(prior_dir)
    for key in PRIOR_RESULT_METRICS:
        result["metrics"].pop(key, None)
    result["prior"] = None
    if job.get("prior") is not None:
        result["prior"] = _train_prior(job, run_dir, prior_dir)
        result["metrics"].update(result["prior"].pop("metrics"))
    result_path.write_text(json.dumps(result))
    if trained:
        return result
    return {**result, "tokenizer_reused": True} if result["prior"] else {**result, "reused": True}


def _prior_spec(prior: Mapping | None) -> dict | None:
    """What a run's prior was trained from (``{"config", "overrides"}``, as a job gives it): the
    reuse check's part of a result's ``prior`` entry."""
    return None if prior is None else {"config": prior["config"], "overrides": prior["overrides"]}


def _train_prior(job: Mapping, run_dir: Path, prior_dir: Path) -> dict:
    """Train the job's prior on the run's tokenizer (``run_dir``'s last checkpoint), in ``prior_dir``,
    with the run's seed, and the data keys of :data:`~kepler.study.config.PRIOR_DATA_FROM_TOKENIZER`
    taken from the tokenizer run's config. Returns the result's ``prior`` entry: its spec, folder,
    ``tokens_per_map``, the final held-out figures and ``wall_s``; under ``"metrics"`` the run's
    ``prior_bits_per_token``, ``prior_bits_per_image`` (bits per token x tokens per map: the
    held-out negative log-likelihood of a whole image's code map) and ``unigram_bits_per_image``
    (the unigram baseline's, the same way)."""
    from kepler.io.config import load_config, load_prior_config
    from kepler.train.prior_task import PriorTask
    from kepler.train.trainer import train

    prior = job["prior"]
    tokenizer_cfg = load_config(job["base"], list(job["overrides"]))
    overrides = list(prior["overrides"])
    overrides += [override_string(f"data.{key}", tokenizer_cfg.data[key]) for key in PRIOR_DATA_FROM_TOKENIZER]
    overrides += list(job.get("runtime", ())) + [
        f"tokenizer.checkpoint={run_dir / 'checkpoints' / 'last.pt'}", f"run_dir={prior_dir}",
        f"seed={job['seed']}", f"name={job['variant']}_prior",
    ]
    prior_dir.mkdir(parents=True)
    started = time.perf_counter()
    with _logged_to(prior_dir / "console.log"):
        metrics = train(load_prior_config(prior["config"], overrides), task_class=PriorTask)
    tokens = int(metrics["tokens_per_map"])
    return {
        **_prior_spec(prior),
        "run_dir": str(prior_dir),
        "steps": int(metrics["step"]),
        "tokens_per_map": tokens,
        "bits_per_position": metrics["bits_per_position"],
        "unigram_bits_per_token": metrics["unigram_bits_per_token"],
        "position_unigram_bits_per_token": metrics["position_unigram_bits_per_token"],
        "wall_s": time.perf_counter() - started,
        "metrics": {
            "prior_bits_per_token": metrics["bits_per_token"],
            "prior_bits_per_image": metrics["bits_per_token"] * tokens,
            "unigram_bits_per_image": metrics["unigram_bits_per_token"] * tokens,
        },
    }


def _train_tokenizer(job: Mapping, run_dir: Path) -> dict:
    """Train and evaluate the job's tokenizer in ``run_dir``; the result's tokenizer part."""
    from kepler.distributed import resolve_device
    from kepler.metrics import effective_bits, packing_report
    from kepler.io.config import load_config, to_dict
    from kepler.models.load import load_model
    from kepler.train.evaluate import evaluate_model, save_evaluation
    from kepler.train.trainer import train

    overrides = list(job["overrides"]) + list(job.get("runtime", ())) + [f"run_dir={run_dir}", f"seed={job['seed']}"]
    cfg = load_config(job["base"], overrides)
    started = time.perf_counter()
    with _logged_to(run_dir / "console.log"):
        train_metrics = train(cfg)
        device = resolve_device(str(cfg.device))
        loaded = load_model(train_metrics["checkpoint"], device, kind="tokenizer")
        model = loaded.model
        evaluation = evaluate_model(loaded, str(cfg.data.val), device=device,
                                    batch_size=int(cfg.data.val_batch_size), max_images=cfg.data.val_max_images)
        save_evaluation({"checkpoint": train_metrics["checkpoint"], **evaluation}, run_dir)
    held_out = next(iter(evaluation["resolutions"].values()))
    quantizer = model.quantize
    codewords = quantizer.codewords()
    codewords = None if codewords is None else codewords.detach().double().cpu()
    packing = packing_report(_normalized(codewords)).to_dict() if codewords is not None else None
    nn_distances = {"min_nn": None, "mean_nn": None}
    if packing is not None:
        nn_distances = {"min_nn": min(_as_list(packing["min_nn_distance"])),
                        "mean_nn": sum(_as_list(packing["mean_nn_distance"])) / len(_as_list(packing["mean_nn_distance"]))}
    layout = quantizer_layout(quantizer, to_dict(cfg.model.quantizer))
    return {
        "variant": job["variant"],
        "seed": int(job["seed"]),
        "run_dir": str(run_dir),
        "base": job["base"],
        "overrides": list(job["overrides"]),
        "layout": layout,
        "metrics": {
            "psnr": held_out["psnr"],
            "ssim": held_out["ssim"],
            "l1": held_out["l1"],
            "baseline_psnr": held_out["baseline_psnr"],
            "utilization": held_out["utilization"],
            "perplexity": held_out["perplexity"],
            "effective_bits": effective_bits(held_out["code_counts"]),
            **nn_distances,
            "images_per_s": train_metrics["train_images_per_s"],
        },
        "held_out_images": held_out["images"],
        "packing_raw": evaluation["packing"],
        "packing_normalized": packing,
        "curves": _curves(run_dir / "log.jsonl"),
        "code_counts": held_out["code_counts"],
        "codewords": codewords.float().tolist() if codewords is not None and layout["sub_dim"] == 3 else None,
        "wall_s": time.perf_counter() - started,
    }


def _as_list(value) -> list[float]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def threads_per_run(study: Mapping) -> int:
    """The config's ``threads``, else the cores shared out over the runs at a time."""
    return study.get("threads") or max(1, (os.cpu_count() or 1) // study["jobs"])


def _jobs_for(study: dict, variant: str, settings: Mapping, seeds: Iterable[int], run_root: Path,
              extra: Sequence[str] = (), prior: bool = False) -> list[dict]:
    """The jobs of ``variant``'s runs, one per seed; with ``prior``, each also trains the study's
    prior (where the study has one; the sweep's runs train none)."""
    overrides = [override_string(k, v) for k, v in study["common"].items()]
    overrides += [override_string(k, v) for k, v in settings.items()]
    overrides += list(extra) + [f"name={variant}"]
    # How the run is executed, not what it computes: not part of the reuse check.
    runtime = [f"train.threads={threads_per_run(study)}", "train.progress=false"]
    prior_job = None
    if prior and study.get("prior") is not None:
        prior_job = {"config": study["prior"]["config"],
                     "overrides": [override_string(k, v) for k, v in study["prior"]["set"].items()]}
    return [
        {"variant": variant, "seed": seed, "base": study["base"], "overrides": overrides, "runtime": runtime,
         "run_dir": str(run_root / variant / f"seed{seed}"), "prior": prior_job}
        for seed in seeds
    ]


# A pool worker's study process (set by _stop_with_parent), and how long a run may take to save and
# stop once that process is gone before the worker ends anyway.
_STUDY_PID: int | None = None
ORPHAN_GRACE_S = 120.0


def _stop_with_parent(parent_pid: int) -> None:
    """Pool worker initializer: on Linux the worker stops with the study process, however it dies
    (SIGKILL included), instead of training on as an orphan. Elsewhere a no-op.

    The kernel's death signal (``PR_SET_PDEATHSIG``) comes when the *thread* that started the worker
    ends, and again as each other thread of the study ends, while ``getppid()`` still names the study:
    a worker could finish its run on the first signal and start the job the executor had already
    queued for it, which then trained to the end (a killed study's two workers trained on for half
    an hour), or wait idle for a job that never comes. So a watcher thread also polls the study
    process itself (:func:`_watch_study`), and :func:`_run_pooled` starts no job once it is gone."""
    global _STUDY_PID
    _STUDY_PID = parent_pid
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() != parent_pid:  # the study died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=_watch_study, name="kepler-study-watch", daemon=True).start()


def _study_alive() -> bool:
    """Whether the study process of this pool worker still runs (Linux: once its last thread has ended
    it is a zombie, then gone); True outside a pool worker and off Linux."""
    if _STUDY_PID is None or not sys.platform.startswith("linux"):
        return True
    try:
        state = Path(f"/proc/{_STUDY_PID}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _watch_study() -> None:
    """Worker thread: once the study process is gone, SIGTERM this worker (a run under way saves after
    its step and stops; an idle worker ends), then end it after :data:`ORPHAN_GRACE_S` whatever it does."""
    while _study_alive():
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(ORPHAN_GRACE_S)
    os._exit(1)


def _run_pooled(work: Callable[[dict], dict], job: dict) -> dict:
    """``work(job)`` in a pool worker, unless the study process is gone (then the worker ends: nobody
    collects its results any more)."""
    if not _study_alive():
        os._exit(1)
    return work(job)


class _Runner:
    """Runs jobs in-process (``jobs == 1``) or in a spawn pool; hands each finished run to ``on_result``.

    A context manager: leaving it waits for the runs under way; leaving it on an exception (Ctrl-C:
    the workers' trainers got the SIGINT too and stop after their step) also cancels the runs not
    yet started, which would otherwise all still run. Workers die with the study process."""

    def __init__(self, jobs: int, on_result: OnResult | None = None, work: Callable[[dict], dict] | None = None):
        self.work = run_one if work is None else work  # what a job runs (tests give a stand-in)
        self.pool = None
        if jobs > 1:
            self.pool = ProcessPoolExecutor(jobs, mp_context=get_context("spawn"),
                                            initializer=_stop_with_parent, initargs=(os.getpid(),))
        self.on_result = on_result

    def __enter__(self) -> _Runner:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=exc_type is not None)

    def submit(self, job: dict):
        if self.pool is not None:
            return self.pool.submit(_run_pooled, self.work, job)
        done = Future()
        done.set_result(self.work(job))
        # In-process, a run is collected as it ends (the order is the same: submission's), not with
        # the runs after it: the study's lines and their ETA come when the runs finish.
        self._hand_over(done.result())
        return done

    def result(self, future: Future) -> dict:
        result = future.result()
        if self.pool is not None:
            self._hand_over(result)
        return result

    def _hand_over(self, result: dict) -> None:
        if self.on_result is not None:
            self.on_result(result)


def sweep_jobs(study: dict, run_root: Path) -> list[tuple[str, float, dict]]:
    """``(swept key, weight, job)`` per sweep run: each key's candidate weights and its reference
    weight (one shared run, key ``""``, for the keys judged against weight 0)."""
    sweep = study["sweep"]
    base_settings = {k: v for k, v in study["variants"][sweep["variant"]]["set"].items() if v != SWEEP_MARKER}
    extra = [f"train.max_steps={sweep['max_steps']}"] if "max_steps" in sweep else []
    if "eval_every" in sweep:
        extra.append(f"train.eval_every={sweep['eval_every']}")
    seeds = sweep.get("seeds", [study["seeds"][0]])
    references = sweep_references(sweep)
    jobs = []
    if 0.0 in references.values():
        jobs += [("", 0.0, job) for job in _jobs_for(study, "weight0", base_settings, seeds, run_root / "sweep", extra)]
    for key, weights in sweep["weights"].items():
        short = key.rsplit(".", 1)[-1]
        for weight in weights + ([references[key]] if references[key] else []):
            settings = {**base_settings, key: weight}
            name = f"{short}={weight:g}"
            jobs += [(key, float(weight), job) for job in _jobs_for(study, name, settings, seeds, run_root / "sweep", extra)]
    return jobs


def planned_runs(study: dict, sweep_only: bool = False) -> int:
    """How many results :func:`run_study` (:func:`run_sweep_only` with ``sweep_only``) hands to
    ``on_result``: the sweep's runs, then one per variant and seed."""
    sweep = len(sweep_jobs(study, Path("runs"))) if study["sweep"] is not None else 0
    return sweep if sweep_only else sweep + len(study["variants"]) * len(study["seeds"])


def run_sweep_only(study: dict, out: Path, on_result: OnResult | None = None) -> dict:
    """Only the weight sweep (``--sweep-only``): its summary, as
    :func:`kepler.study.stats.summarize_sweep` gives it. A later full study reuses these runs."""
    if study["sweep"] is None:
        raise ValueError("the study config has no 'sweep' section")
    with _Runner(study["jobs"], on_result) as runner:
        pending = [(k, w, runner.submit(job)) for k, w, job in sweep_jobs(study, out / "runs")]
        results = [(k, w, runner.result(f)) for k, w, f in pending]
    return summarize_sweep(study, results)


def run_study(study: dict, out: Path, on_result: OnResult | None = None) -> dict:
    """Run the sweep and every variant x seed (see :mod:`kepler.study`); returns ``study.json``'s content."""
    started = time.perf_counter()
    run_root = out / "runs"
    with _Runner(study["jobs"], on_result) as runner:
        pending_sweep = []
        if study["sweep"] is not None:
            pending_sweep = [(k, w, runner.submit(job)) for k, w, job in sweep_jobs(study, run_root)]
        independent, dependent = [], []
        for name, variant in study["variants"].items():
            (dependent if SWEEP_MARKER in variant["set"].values() else independent).append(name)
        pending = []
        for name in independent:
            for job in _jobs_for(study, name, study["variants"][name]["set"], study["seeds"], run_root, prior=True):
                pending.append(runner.submit(job))
        sweep_summary = None
        if pending_sweep:
            sweep_results = [(k, w, runner.result(f)) for k, w, f in pending_sweep]
            sweep_summary = summarize_sweep(study, sweep_results)
        for name in dependent:
            settings = {
                k: (sweep_summary["params"][k]["weight"] if v == SWEEP_MARKER else v)
                for k, v in study["variants"][name]["set"].items()
            }
            for job in _jobs_for(study, name, settings, study["seeds"], run_root, prior=True):
                pending.append(runner.submit(job))
        runs = [runner.result(f) for f in pending]
    order = list(study["variants"])
    runs.sort(key=lambda r: (order.index(r["variant"]), r["seed"]))
    return {
        "name": study["name"],
        "quick": study["quick"],
        "config": study,
        "machine": machine_info(study),
        "wall_minutes": (time.perf_counter() - started) / 60,
        "sweep": sweep_summary,
        "variants": {
            name: {"label": v.get("label", name), "compare_to": v.get("compare_to"),
                   "note": v.get("note", ""), "layout": next(r["layout"] for r in runs if r["variant"] == name)}
            for name, v in study["variants"].items()
        },
        "summary": aggregate(runs, [m for m, _, _ in table_metrics(study)] + ["baseline_psnr"]),
        "runs": runs,
    }


def machine_info(study: Mapping) -> dict:
    """The machine and how the runs shared it, for the report's header."""
    import torch

    return {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "parallel_runs": study["jobs"],
        "threads_per_run": threads_per_run(study),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"

