"""``kepler doctor``: what this machine runs, and whether every backend agrees with the reference."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from kepler.cli import CLIError, add_seed, positive_int


def add_commands(sub) -> None:
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
    add_seed(p, "seed of the random inputs")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per speed figure (the median is shown)")
    p.add_argument("--quick", action="store_true", help="time the tiny check inputs (a smoke run; figures say little)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the full report as JSON")
    p.set_defaults(func=_cmd_doctor)


def _check_writable_file(path: Path) -> None:
    """CLIError unless ``path`` can be written: not a folder, and a folder (made now) for its parent."""
    if path.is_dir():
        raise CLIError(f"--json {path} is a folder, not a file")
    blocking = next((parent for parent in path.parents if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise CLIError(f"--json {path}: {blocking} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"--json {path}: cannot create its folder: {exc.strerror or exc}") from None
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CLIError(f"--json {path}: not writable")


def _cmd_doctor(args) -> int:
    from kepler.kernels._common import triton_interpreter_on

    if args.triton_interpret and not triton_interpreter_on():
        # Triton decides whether a kernel is interpreted when it is decorated, and some Triton
        # versions read TRITON_INTERPRET once when triton is imported, which `import torch` (hence
        # `import kepler`, already done to get here) does. Only a process that starts with the
        # variable set is sure to interpret, so re-run this command in one.
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "kepler", *args.argv],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    from kepler.distributed import resolve_device
    from kepler.doctor import doctor, format_report

    # Checked before the run, which takes minutes: a bad device or an unwritable --json fails at once.
    for device in args.device or ():
        try:
            resolve_device(device)
        except ValueError as exc:
            raise CLIError(f"--device {device}: {exc}") from None
    if args.json is not None:
        _check_writable_file(Path(args.json))

    report = doctor(args.device, backends=args.backend, seed=args.seed, repeats=args.repeats, quick=args.quick)
    print(format_report(report))
    if args.json is not None:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if report.passed else 1
