"""kepler: Triton- and CUDA-accelerated vector quantization with Kepler codebooks.

Importing kepler never fails because the compiled extension ``kepler._C`` is missing; the
reference and Triton backends work without it (see :func:`available_backends`). A trained model,
in any form it is saved in, is one call away: :func:`load`.
"""

from kepler._backend import BACKENDS, available_backends
from kepler._ext import HAS_CPU_EXT, HAS_CUDA_EXT
from kepler.ops.closest_lattice_point import closest_lattice_point
from kepler.ops.nearest_codeword import nearest_codeword
from kepler import lattice, metrics
from kepler.nn import KeplerQuantizer, LatticeQuantizer, ResidualQuantizer
from kepler.models.load import load
# The function shadows its module as the attribute kepler.doctor; `from kepler.doctor import ...`
# still reaches the module (format_report, DoctorReport).
from kepler.doctor import doctor

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "KeplerQuantizer",
    "LatticeQuantizer",
    "ResidualQuantizer",
    "HAS_CPU_EXT",
    "HAS_CUDA_EXT",
    "available_backends",
    "closest_lattice_point",
    "doctor",
    "nearest_codeword",
    "lattice",
    "load",
    "metrics",
]
