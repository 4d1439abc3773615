"""The prior's code extraction with 1 and 2 processes (images/s), and the peak memory of extraction
and of prior training, at a few data-set sizes: it should be flat, not proportional (#26).

    python benchmarks/code_extraction.py --images 2000 20000 --json bench_results/code_extraction.json

Every figure comes from a fresh process (``--worker``), launched by this script: extraction through
``torch.distributed.run`` with 1 or 2 CPU processes (gloo, one thread each), prior training through
``kepler prior train`` reading the cache the 1-process extraction wrote. The data are synthetic JPEGs
(40x40 smooth noise, center-cropped to 32x32, no flips: one map an image) in a folder, and 64
held-out ones; the tokenizer is a tiny one trained for 2 steps (f2, K=16 codes, P=2 sub-codes:
16x16x2 maps, 512 uint8 codes a map, 4 KiB as int64). Memory is read from ``/proc/self/status``:
``VmHWM`` (the peak resident set, which counts the touched pages of mapped files) and the peaks of
``RssAnon`` (the process's own memory: a copy of the data set in memory would be here) and
``RssFile`` (mapped files' pages: the kernel may drop them at will), sampled every 10 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SIZE = 32
VAL_IMAGES = 64
PRIOR_STEPS = 20

TOKENIZER = f"""
name: tok
model: {{ch: 8, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [], z_channels: 8, resolution: {SIZE},
        norm_groups: 4, embed_dim: 8, quantizer: {{num_codes: 16, partitions: 2}}}}
loss: {{perceptual_weight: 0.0, disc_start: 100, disc_ndf: 8, disc_num_layers: 2}}
data: {{size: {SIZE}, batch_size: 2, samples_per_epoch: 16, val_batch_size: 8, val_max_images: 8}}
train: {{max_steps: 2, eval_every: 2, ckpt_every: 2, log_every: 1, grid_images: 0, progress: false, threads: 1}}
"""

PRIOR = """
name: prior
tokenizer: {{checkpoint: {tokenizer}}}
model: {{d_model: 32, num_layers: 2, num_heads: 2}}
data: {{size: {size}, resize: {size}, flip: false, batch_size: 16, val_batch_size: 64, val_max_images: null,
       train: {train}, val: {val}}}
optim: {{name: adamw, base_lr: 1.0e-3, scale_lr: false}}
train: {{max_steps: {steps}, eval_every: {steps}, ckpt_every: {steps}, log_every: 10, grid_images: 0,
        progress: false, threads: 1}}
"""


class MemorySampler:
    """The peaks of ``RssAnon`` and ``RssFile`` of this process, sampled every 10 ms until
    :meth:`stop`; with ``VmHWM``, all in MiB."""

    def __init__(self):
        self.peaks = {"RssAnon": 0, "RssFile": 0}
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    @staticmethod
    def _read() -> dict[str, int]:
        with open("/proc/self/status") as status:
            return {line.split(":")[0]: int(line.split()[1]) for line in status if line.split(":")[0] in
                    ("VmHWM", "RssAnon", "RssFile")}

    def _sample(self) -> None:
        while self.running:
            now = self._read()
            for field in self.peaks:
                self.peaks[field] = max(self.peaks[field], now[field])
            time.sleep(0.01)

    def stop(self) -> dict[str, float]:
        self.running = False
        self.thread.join()
        now = self._read()
        return {"peak_rss_mib": now["VmHWM"] / 1024, "peak_anon_mib": max(self.peaks["RssAnon"], now["RssAnon"]) / 1024,
                "peak_file_mib": max(self.peaks["RssFile"], now["RssFile"]) / 1024}


def write_images(folder: Path, count: int, seed: int) -> Path:
    """``count`` 40x40 JPEGs of smooth noise (a 5x5 random grid upsampled), so that they compress and
    decode like photos rather than like white noise."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        small = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8))
        small.resize((40, 40), Image.BILINEAR).save(folder / f"img{i:06d}.jpg", quality=90)
    return folder


def prior_config(work: Path, tokenizer: Path, images: int) -> Path:
    path = work / f"prior{images}.yaml"
    path.write_text(PRIOR.format(tokenizer=tokenizer, size=SIZE, steps=PRIOR_STEPS, train=work / f"images{images}",
                                 val=work / "val"))
    return path


# ------------------------------------------------------------------ workers (one process each)


def extract_worker(config: Path, run_dir: Path, out: Path) -> None:
    """This rank's part of an extraction into ``run_dir``: seconds and memory to ``out``-rank<r>.json."""
    import torch

    from kepler.distributed import barrier, cleanup_distributed, init_distributed
    from kepler.io.config import load_prior_config
    from kepler.io.files import file_sha256
    from kepler.models.load import load_model, tokenizer_layout
    from kepler.train.codes import extract_codes

    torch.set_num_threads(1)
    cfg = load_prior_config(config)
    info = init_distributed("cpu")
    tokenizer = load_model(cfg.tokenizer.checkpoint, "cpu", kind="tokenizer").model.requires_grad_(False)
    layout = tokenizer_layout(tokenizer, cfg.data.size)
    sha256 = file_sha256(cfg.tokenizer.checkpoint)
    barrier()
    sampler = MemorySampler()
    start = time.perf_counter()
    stored = extract_codes(tokenizer, sha256, cfg.data, 0, layout, run_dir, info.device, info.rank, info.world_size)
    seconds = time.perf_counter() - start
    result = {"rank": info.rank, "seconds": seconds, "maps": len(stored.train) + len(stored.val), **sampler.stop()}
    Path(f"{out}-rank{info.rank}.json").write_text(json.dumps(result))
    cleanup_distributed()


def train_worker(config: Path, run_dir: Path, out: Path) -> None:
    """``kepler prior train`` in this process (reading the cache in ``run_dir``): its memory to ``out``."""
    from kepler.cli import main

    sampler = MemorySampler()
    start = time.perf_counter()
    status = main(["prior", "train", str(config), f"run_dir={run_dir}", "device=cpu", "--overwrite"])
    seconds = time.perf_counter() - start
    out.write_text(json.dumps({"status": status, "seconds": seconds, **sampler.stop()}))


# ------------------------------------------------------------------ the benchmark


def run_worker(args: list[str], processes: int | None = None) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [sys.executable]
    if processes is not None:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    subprocess.run([*launcher, __file__, *args], env=env, check=True, stdout=subprocess.DEVNULL)


def benchmark(sizes: list[int], work: Path) -> list[dict]:
    from kepler.cli import main

    (work / "tok.yaml").write_text(TOKENIZER)
    assert main(["train", str(work / "tok.yaml"), f"run_dir={work / 'tok'}", "device=cpu"]) == 0
    tokenizer = work / "tok" / "checkpoints" / "last.pt"
    write_images(work / "val", VAL_IMAGES, seed=1)
    rows = []
    for images in sizes:
        write_images(work / f"images{images}", images, seed=0)
        config = prior_config(work, tokenizer, images)
        for processes in (1, 2):
            run, out = work / f"run{images}_{processes}", work / f"extract{images}_{processes}"
            run_worker(["--worker", "extract", str(config), str(run), str(out)], processes)
            ranks = [json.loads(Path(f"{out}-rank{rank}.json").read_text()) for rank in range(processes)]
            seconds = max(rank["seconds"] for rank in ranks)
            rows.append({"what": "extraction", "images": images, "processes": processes, "seconds": seconds,
                         "images_per_s": (images + VAL_IMAGES) / seconds,
                         **{key: max(rank[key] for rank in ranks) for key in ("peak_rss_mib", "peak_anon_mib",
                                                                               "peak_file_mib")}})
            print(json.dumps(rows[-1]), flush=True)
        out = work / f"train{images}.json"
        run_worker(["--worker", "train", str(config), str(work / f"run{images}_1"), str(out)])
        rows.append({"what": "prior training", "images": images, "processes": 1, **json.loads(out.read_text())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[2000, 20000], help="training set sizes")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--work", type=Path, help="a folder for the images and runs (default: a temporary one)")
    parser.add_argument("--worker", nargs=4, metavar=("KIND", "CONFIG", "RUN_DIR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, config, run_dir, out = args.worker
        {"extract": extract_worker, "train": train_worker}[kind](Path(config), Path(run_dir), Path(out))
        return
    with tempfile.TemporaryDirectory() as temporary:
        rows = benchmark(args.images, args.work or Path(temporary))
    print(f"{'':16} {'images':>7} {'procs':>5} {'images/s':>9} {'peak RSS':>9} {'anon':>7} {'file':>7}  (MiB)")
    for row in rows:
        rate = f"{row['images_per_s']:9.0f}" if "images_per_s" in row else f"{'':9}"
        print(f"{row['what']:16} {row['images']:7d} {row['processes']:5d} {rate} {row['peak_rss_mib']:9.0f} "
              f"{row['peak_anon_mib']:7.0f} {row['peak_file_mib']:7.0f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
