"""Loads the compiled extension ``kepler._C`` when it was built.

``import kepler`` never fails because the extension is missing: the reference and Triton backends
work without it. ``kepler._backend`` refuses the compiled backends without it, with
:data:`INSTALL_HINT` in the message.
"""

from __future__ import annotations

import logging

log = logging.getLogger("kepler")

try:
    from kepler import _C  # noqa: F401  (registers torch.ops.kepler.* on import)

    HAS_CPU_EXT = True
    HAS_CUDA_EXT = bool(_C.cuda_built())
    EXT_IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    HAS_CPU_EXT = False
    HAS_CUDA_EXT = False
    EXT_IMPORT_ERROR = exc
    log.debug("kepler._C not available: %s", exc)

INSTALL_HINT = (
    "build it with `pip install --no-build-isolation -e .` (or `make build`) in the kepler checkout; "
    "the CUDA kernels need a CUDA toolkit and a CUDA build of torch"
)

