"""The fused ops: registration, autograd and the checked functional of each (``kepler/ops/<op>.py``).

How to add an op: copy one op's files and rename (``packing_energy`` has a forward and a
backward op, ``nearest_codeword`` a forward op and a PyTorch backward). Each of DESIGN.md's six
layers has one place:

1. kernel: ``_<op>_kernel`` in ``kernels/<op>.py`` (Triton; shared ``@triton.jit`` helpers beside
   it), a templated ``__global__`` in ``csrc/<op>/<op>_cuda.cu``, a blocked loop in
   ``csrc/<op>/<op>_cpu.cpp``.
2. launcher: ``<op>_triton`` in ``kernels/<op>.py``: the shared checks of ``kernels/_common.py``
   (``check_launchable``, ``check_groups``) plus the shapes the kernel needs, an ``<Op>Config``
   chosen by ``pick_config`` from ``CONFIGS``, and ``launch(...)`` with keyword arguments (it holds
   the CUDA device guard). The compiled launchers are in ``csrc/<op>/``; the schema in
   ``csrc/kepler.cpp``. List the kernels' signatures and variants in
   ``tests/test_<op>_triton_aot.py`` and a sample call in ``tests/test_kernels_common.py``.
3. registration: in ``kepler/ops/<op>.py``, ``_<op>_fake`` and one
   ``kepler.ops._common.register_op("<op>", schema, fake, "kepler.kernels.<op>")`` per op
   (``<op>_backward`` too where the backward is a kernel).
4. ``<Op>Function``: calls ``registered_op("<op>", backend)``, the one backend switch.
5. functional ``<op>(...)``: ``_check_inputs`` (starting with ``check_input``), then
   ``kepler._backend.choose_backend``; ``reference`` runs ``kepler/reference/<op>.py`` (``<op>_ref``,
   the spec, accumulating in ``accumulation_dtype``) under plain autograd, the kernel backends
   run ``<Op>Function``.
6. module: ``kepler/nn/`` (or ``kepler/losses.py`` for a loss) calls the functional.

Tests: ``tests/test_<op>.py`` parametrizes over ``conftest.device_backend_params()``.
"""
