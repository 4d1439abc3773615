"""The devices every suite benchmarks on, marked the same way: CUDA points carry the ``gpu`` marker
(``benchmarks/gpu_check.sh`` selects them) and skip where there is no CUDA device."""

import pytest
import torch

DEVICES = ("cpu", "cuda")
GPU_MARKS = (pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))


def device_marks(device: str) -> list:
    """The marks of a benchmark point on ``device``: :data:`GPU_MARKS` for ``"cuda"``, none for the CPU."""
    return list(GPU_MARKS) if device == "cuda" else []
