"""Shared test setup.

Without a GPU the Triton kernels are tested in the Triton interpreter, which must be switched on
before triton is imported (kernels are wrapped at decoration time), so this runs first.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from kepler import _backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# Property tests (Hypothesis) draw from a fixed seed and keep no example database, so every run
# tries the same examples and a failure reproduces (its @reproduce_failure blob is printed).
settings.register_profile(
    "kepler",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("kepler")


def property_examples(device: str, backend: str) -> int:
    """Examples a property test of an op tries on ``backend``: fewer in the Triton interpreter,
    which runs a kernel thousands of times slower than compiled code."""
    return 15 if backend == "triton" and device == "cpu" else 60


def backend_params(device: str = "cpu"):
    """pytest params for every backend, skipped with the reason where it cannot run on ``device``."""
    params = []
    for backend in _backend.BACKENDS:
        reason = _backend._unavailable_reason(backend, torch.device(device).type)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(backend, marks=marks, id=backend))
    return params


def device_params():
    """CPU always; CUDA when present (marked ``gpu``)."""
    return [
        pytest.param("cpu", id="cpu"),
        pytest.param(
            "cuda",
            id="cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")],
        ),
    ]


def device_backend_params():
    """pytest params ``(device, backend)`` for every pair that makes sense together (no 'cpu' backend
    on CUDA tensors and vice versa), skipped with the reason where the pair cannot run here."""
    params = []
    for device_param in device_params():
        device = device_param.values[0]
        for backend_param in backend_params(device):
            backend = backend_param.values[0]
            if (backend, device) in (("cpu", "cuda"), ("cuda", "cpu")):
                continue
            marks = list(device_param.marks) + list(backend_param.marks)
            params.append(pytest.param(device, backend, marks=marks, id=f"{device}-{backend}"))
    return params


@pytest.fixture(params=["avx2", "portable"])
def cpu_kernel(request, monkeypatch):
    """Runs a C++ CPU kernel's test with the AVX2 code paths (where the CPU has them) and with the
    portable ones (``KEPLER_DISABLE_AVX2=1``)."""
    if request.param == "portable":
        monkeypatch.setenv("KEPLER_DISABLE_AVX2", "1")
    else:
        monkeypatch.delenv("KEPLER_DISABLE_AVX2", raising=False)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _highest_float32_matmul_precision():
    """Full float32 matmuls (no TF32) in every test, so that backend comparisons and the error
    bounds below hold on a GPU too; the previous setting comes back afterwards."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


# Unit roundoff of float32 (every kernel accumulates in float32).
F32_UNIT = 2.0**-24
# Relative error of the GPU's approximate exp2/log2 (PTX ex2.approx.f32 / lg2.approx.f32, which
# Triton's tl.exp/tl.exp2/tl.log2 and CUDA's fast paths use): at most 2**-22 each, per the PTX ISA.
# CUDA's expf/logf (no --use_fast_math) are within 2 ulp, which this also covers.
GPU_APPROX_FN_REL_ERROR = 2.0**-22


def float32_sum_error_bound(num_terms, abs_sum):
    """Worst-case error of a float32 sum (or dot product) of ``num_terms`` terms whose absolute
    values sum to ``abs_sum``: gamma_n * abs_sum with gamma_n = n u / (1 - n u) (Higham, Accuracy and
    Stability of Numerical Algorithms, 3.1). It holds for any summation order, blocking, tree
    reduction or FMA, so it covers the CPU, the interpreter and a GPU alike. ``abs_sum`` may be a
    tensor."""
    n_unit = num_terms * F32_UNIT
    return n_unit / (1.0 - n_unit) * abs_sum


@pytest.fixture
def poisoned_empty():
    """New tensors start as NaN (floats) / the largest int64, so an output a kernel never writes fails.

    ``torch.utils.deterministic.fill_uninitialized_memory`` fills every ``empty`` (also the C++
    ``at::empty``) while deterministic algorithms are on.
    """
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = was_filling
    torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)


# Column stride of :func:`huge_column_stride_view`: the offset of column 2 is 2**31 elements.
HUGE_COLUMN_STRIDE = 2**30


def huge_column_stride_view(values: torch.Tensor) -> torch.Tensor:
    """``values`` (rows, 3) copied into a view with column stride 2**30 at storage offset 2**31.

    Column d sits ``d * 2**30`` elements after column 0, so the offset of column 2 is ``2**31``:
    an int32 offset product wraps to ``-2**31`` and reads the buffer's first elements (zeros, not
    column 2) instead of crashing. The float16 buffer is 8 GiB of address space but only the pages
    of the few values written or read are ever touched; a machine that refuses the mapping skips.
    """
    rows, dim = values.shape
    assert dim == 3 and values.dtype == torch.float16
    start = 2 * HUGE_COLUMN_STRIDE
    try:
        buffer = torch.empty(start + (dim - 1) * HUGE_COLUMN_STRIDE + rows, dtype=values.dtype)
    except RuntimeError as error:
        pytest.skip(f"cannot map an 8 GiB buffer here: {error}")
    buffer[:rows].zero_()  # what a wrapped int32 offset would read
    view = buffer.as_strided((rows, dim), (1, HUGE_COLUMN_STRIDE), start)
    view.copy_(values)
    return view


@pytest.fixture(scope="session")
def dino_weights(tmp_path_factory):
    """A DINOv2 ViT-S/14 weights file with random weights in the release's layout (518-pixel
    position embedding, the ``mask_token`` timm drops), as ``torch.hub`` caches it."""
    import timm

    torch.manual_seed(0)
    state = timm.create_model("vit_small_patch14_dinov2", pretrained=False).state_dict()
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    path = tmp_path_factory.mktemp("dino") / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    return path


def random_inception_weights() -> dict:
    """The state dict of torch-fidelity's FID Inception network with its random initialization (the
    real weights are a local file this machine may not have)."""
    import io

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state):  # keep the random initialization
            pass

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    return Unloaded("inception", ["2048"], feature_extractor_weights_path=empty).state_dict()
