"""Every configuration the kepler_kl Triton launchers can pick compiles for sm_80 and sm_90.

Both kernels, every ``(BLOCK, num_warps)`` in ``BLOCK_CONFIGS`` and every input dtype. Without a
GPU the session runs with ``TRITON_INTERPRET=1``, which turns triton.language's own ``@jit``
helpers (``tl.sum``'s combine function, ...) into interpreter objects the compiler cannot lower;
the compiles then run in one child process started with ``TRITON_INTERPRET=0``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kepler._backend import triton_interpreter_on
from triton_aot import GPU_CAPABILITIES, as_jit_function

kernels = pytest.importorskip("kepler.kernels.kepler_kl")
triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402

TRITON_DTYPES = ("fp32", "bf16", "fp16")
KERNEL_NAMES = ("fwd", "bwd")
# Sizes and strides as the launchers pass them: Python ints that fit int32 (larger ones become
# int64, which the kernels' int64 offsets already cover).
SCALARS = {
    "num_cols": "i32", "stride_xb": "i32", "stride_xm": "i32", "stride_qb": "i32", "stride_qm": "i32",
    "log_eps": "fp32", "has_eps": "i32", "use_std": "i32", "BLOCK": "constexpr",
}  # fmt: skip
VARIANTS = [
    (name, block, num_warps, dtype, capability)
    for name in KERNEL_NAMES
    for block, num_warps in kernels.BLOCK_CONFIGS
    for dtype in TRITON_DTYPES
    for capability in GPU_CAPABILITIES
]


def _variant_id(name, block, num_warps, dtype, capability) -> str:
    return f"{name}-B{block}-w{num_warps}-{dtype}-sm{capability}"


def _compile(name, block, num_warps, dtype, capability) -> None:
    if name == "fwd":
        kernel = kernels._kepler_kl_fwd_kernel
        pointers = {"x_ptr": f"*{dtype}", "logq_ptr": "*fp32", "loss_ptr": "*fp32", "stats_ptr": "*fp32"}
    else:
        kernel = kernels._kepler_kl_bwd_kernel
        pointers = {
            "grad_loss_ptr": "*fp32", "x_ptr": f"*{dtype}", "logq_ptr": "*fp32", "stats_ptr": "*fp32",
            "grad_ptr": f"*{dtype}",
        }  # fmt: skip
    source = triton.compiler.ASTSource(
        fn=as_jit_function(kernel), signature={**pointers, **SCALARS}, constexprs={"BLOCK": block}
    )
    # As triton_aot.aot_compile, plus the launcher's num_warps.
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})
    assert compiled.asm["cubin"], f"no cubin for sm_{capability}"


def compile_every_variant() -> dict:
    """{variant id: "ok" or the error}; what the child process prints."""
    results = {}
    for variant in VARIANTS:
        try:
            _compile(*variant)
            results[_variant_id(*variant)] = "ok"
        except Exception as exc:  # reported by the test of that variant
            results[_variant_id(*variant)] = f"{type(exc).__name__}: {exc}"
    return results


@pytest.fixture(scope="module")
def compile_outcome():
    if not triton_interpreter_on():

        def compile_here(variant):
            _compile(*variant)
            return "ok"

        return compile_here
    child = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        f"import {Path(__file__).stem} as aot\n"
        "print(json.dumps(aot.compile_every_variant()))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    return lambda variant: results[_variant_id(*variant)]


def test_block_configs_cover_every_row_length():
    picked = {kernels.block_config(num_cols) for num_cols in (1, 255, 256, 257, 1024, 1025, 4096, 4097, 2**20)}
    assert picked == set(kernels.BLOCK_CONFIGS)


@pytest.mark.parametrize("variant", VARIANTS, ids=[_variant_id(*v) for v in VARIANTS])
def test_kernel_compiles_for_gpu(variant, compile_outcome):
    outcome = compile_outcome(variant)
    assert outcome == "ok", outcome
