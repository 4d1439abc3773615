"""The fused ops: registration, autograd and the checked functional of each (``kepler/ops/<op>.py``).

:data:`OPS` is the op inventory, the one list of the ops: ``kepler.ops._common.register_op``
registers only the kernel ops it names (and finds their Triton launchers from it), ``kepler
doctor`` checks every op in it, the op-contract tests (``tests/test_ops_common.py``,
``tests/test_kernels_common.py``, ``tests/test_build.py``) run over it and
``benchmarks/gpu_check.sh`` runs its test files under compute-sanitizer. It is data (names and
paths, no imports), so importing this package imports no op module and no triton.

How to add an op: one :class:`OpRecord` in :data:`OPS`, then the op's own files; copy one op's and
rename (``packing_energy`` has a forward and a backward kernel, ``nearest_codeword`` a forward
kernel and a PyTorch backward, ``closest_lattice_point`` a forward kernel and no backward). The
tests that read the inventory then name what else the op needs: its inputs for ``kepler doctor``
(``kepler/doctor.py``) and a sample call of each launcher (``tests/test_kernels_common.py``).
Each layer of section "One op, six layers" of ``docs/DESIGN.md`` has one place:

1. kernel: ``_<op>_kernel`` in ``kernels/<op>.py`` (Triton; shared ``@triton.jit`` helpers beside
   it), a templated ``__global__`` in ``csrc/<op>/<op>_cuda.cu``, a blocked loop in
   ``csrc/<op>/<op>_cpu.cpp``.
2. launcher: ``<op>_triton`` in ``kernels/<op>.py``: the shared checks of ``kernels/_common.py``
   (``check_launchable``, ``check_groups``) plus the shapes the kernel needs, an ``<Op>Config``
   chosen by ``pick_config`` from ``CONFIGS``, and ``launch(...)`` with keyword arguments (it holds
   the CUDA device guard). The compiled launchers are in ``csrc/<op>/``; the schema in
   ``csrc/kepler.cpp``. List the kernels' signatures and variants in
   ``tests/test_<op>_triton_aot.py``.
3. registration: in ``kepler/ops/<op>.py``, ``_<op>_fake`` and one
   ``kepler.ops._common.register_op("<op>", schema, fake)`` per kernel op of the record
   (``<op>_backward`` too where the backward is a kernel).
4. ``<Op>Function``: calls ``registered_op("<op>", backend)``, the one backend switch.
5. functional ``<op>(...)``: ``_check_inputs`` (starting with ``check_input``), then
   ``kepler._backend.choose_backend``; ``reference`` runs ``kepler/reference/<op>.py`` (``<op>_ref``,
   the spec, accumulating in ``kepler._numerics.accumulation_dtype``) under plain autograd, the
   kernel backends run ``<Op>Function``.
6. module: ``kepler/nn/`` (or ``kepler/losses.py`` for a loss) calls the functional.

Tests: ``tests/test_<op>.py`` parametrizes over ``conftest.device_backend_params()``.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKWARDS = ("kernel", "pytorch", None)


@dataclass(frozen=True)
class OpRecord:
    """One op of the inventory.

    Attributes:
        name: the op's name: its functional, ``kepler/ops/<name>.py``, ``kepler/reference/<name>.py``,
            ``kernels/<name>.py`` and the kernel op ``kepler::<name>``.
        backward: how gradients are computed, one of :data:`BACKWARDS`: ``"kernel"`` (a second
            kernel op, ``kepler::<name>_backward``), ``"pytorch"`` (the ``<Op>Function``'s backward
            in plain PyTorch) or None (not differentiable: the op's result does not require grad).
        tests: the op's test files (paths from the repository root), which ``benchmarks/gpu_check.sh``
            runs under compute-sanitizer.
    """

    name: str
    backward: str | None
    tests: tuple[str, ...]

    def __post_init__(self):
        if self.backward not in BACKWARDS:
            raise ValueError(f"op {self.name}: backward must be one of {BACKWARDS}, got {self.backward!r}")

    @property
    def registered_ops(self) -> tuple[str, ...]:
        """The kernel ops: ``kepler::<op>`` for ``cpu``/``cuda`` and ``kepler::<op>_triton`` for ``triton``, each."""
        return (self.name, f"{self.name}_backward") if self.backward == "kernel" else (self.name,)

    @property
    def launcher_module(self) -> str:
        """The module of the Triton launchers ``<registered op>_triton``, imported on their first call."""
        return f"kepler.kernels.{self.name}"


OPS = (
    OpRecord("nearest_codeword", backward="pytorch", tests=("tests/test_nearest_codeword.py",)),
    OpRecord("kepler_kl", backward="kernel", tests=("tests/test_kepler_kl.py",)),
    OpRecord("packing_energy", backward="kernel", tests=("tests/test_packing_energy.py",)),
    OpRecord("closest_lattice_point", backward=None, tests=("tests/test_closest_lattice_point.py",)),
    OpRecord("code_entropy", backward="kernel", tests=("tests/test_code_entropy.py",)),
)
"""The op inventory (see the module docstring)."""
