"""Triton kernels and their launchers, installed as ``kepler.kernels``."""
