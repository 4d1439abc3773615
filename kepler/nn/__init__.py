"""Quantizers: nn.Modules behind one protocol (:mod:`kepler.nn.protocol`), chosen in YAML by ``type``.

* :class:`Quantizer`: the protocol's base class (attributes, code statistics, decoding entry points).
* :class:`KeplerQuantizer` (``type: kepler``): the Kepler Codebook quantizer; its codebook upkeep
  (initialization, EMA, dead codes) lives in :mod:`kepler.nn.codebook`.
* :func:`register_quantizer`, :func:`build_quantizer`: the registry behind ``model.quantizer.type``.
"""

from kepler.nn.kepler_quantizer import KeplerQuantizer
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
    "KeplerQuantizer",
    "Quantizer",
    "QuantizerInfo",
    "QuantizerOutput",
    "build_quantizer",
    "quantizer_class",
    "register_quantizer",
    "straight_through",
]
