"""Codebook regularizers: the released Kepler KL and the Gaussian-potential packing energy.

Both are fused ops (see ``kepler/ops/``); this module is their public home.
"""

from kepler.ops.kepler_kl import kepler_kl
from kepler.ops.packing_energy import packing_energy

__all__ = ["kepler_kl", "packing_energy"]
