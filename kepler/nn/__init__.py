"""nn.Modules of kepler: parameters and buffers around the functional ops."""

from kepler.nn.quantizer import KeplerQuantizer, QuantizerInfo, QuantizerOutput

__all__ = ["KeplerQuantizer", "QuantizerInfo", "QuantizerOutput"]
