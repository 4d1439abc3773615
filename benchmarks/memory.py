"""Peak memory of one benchmark step, the same way in every suite.

CUDA: the caching allocator's peak above what was allocated before the step. CPU (Linux, glibc):
the resident-set high-water mark (``VmHWM``), which Linux resets to the current resident set on
writing 5 to ``/proc/self/clear_refs``. ``ru_maxrss`` would not do: it cannot be reset, and a forked
child inherits its parent's.
"""

import ctypes

import torch


def process_memory_kib(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its high-water mark) of this process, in KiB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> int:
    """Hand freed heap pages back, reset ``VmHWM`` and return the resident set now, in KiB."""
    # Without malloc_trim the step could reuse freed pages without raising the resident set.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline = process_memory_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return baseline


def peak_step_memory_mb(step, device: str) -> float:
    """Peak memory of one ``step()`` above what is held before it, in MiB (after a warm-up step)."""
    step()  # lazy initializations, allocator warm-up, gradients allocated
    if device == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - baseline) / 2**20
    baseline = reset_peak_rss()
    step()
    return max(process_memory_kib("VmHWM") - baseline, 0) / 1024
