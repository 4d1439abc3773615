"""Quantizers: nn.Modules behind one protocol (:mod:`kepler.nn.protocol`), chosen in YAML by ``type``.

* :class:`Quantizer`: the protocol's base class (attributes, code statistics, decoding entry points).
* :class:`KeplerQuantizer` (``type: kepler``): the Kepler Codebook quantizer; its codebook upkeep
  (initialization, EMA, dead codes) lives in :mod:`kepler.nn.codebook`.
* :class:`LatticeQuantizer` (``type: lattice``): a fixed lattice code per sub-vector (E8, D4, A2,
  ``Z^n`` Voronoi codes, the Leech shell); the closest-point math is in :mod:`kepler.lattice_codes`.
* :class:`ResidualQuantizer` (``type: residual``): stages of Kepler quantizers, each on the residual
  the stages before it left (:mod:`kepler.nn.residual_quantizer`).
* :class:`FSQQuantizer` (``type: fsq``), :class:`LFQQuantizer` (``type: lfq``): vector-quantize-pytorch's
  FSQ and LFQ adapted to the protocol (:mod:`kepler.nn.adapters`).
* ``rotation_trick: true`` (both quantizers): :mod:`kepler.nn.rotation_trick`.
* :func:`register_quantizer`, :func:`build_quantizer`: the registry behind ``model.quantizer.type``.
"""

from kepler.nn.adapters import FSQQuantizer, LFQQuantizer
from kepler.nn.kepler_quantizer import KeplerQuantizer
from kepler.nn.lattice_quantizer import LatticeQuantizer
from kepler.nn.residual_quantizer import ResidualQuantizer
from kepler.nn.protocol import (
    QUANTIZERS,
    Quantizer,
    QuantizerInfo,
    QuantizerOutput,
    build_quantizer,
    quantizer_class,
    register_quantizer,
    straight_through,
)

__all__ = [
    "QUANTIZERS",
    "FSQQuantizer",
    "KeplerQuantizer",
    "LFQQuantizer",
    "LatticeQuantizer",
    "Quantizer",
    "QuantizerInfo",
    "QuantizerOutput",
    "ResidualQuantizer",
    "build_quantizer",
    "quantizer_class",
    "register_quantizer",
    "straight_through",
]
