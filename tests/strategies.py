"""Hypothesis strategies shared by the op property tests (tests/test_<op>.py, "Properties" sections).

The strategies draw the *description* of an input (shape, dtype, magnitude, value kind, layout,
where NaN/inf go, a seed) and build it with a seeded ``torch.Generator``: whole tensors of values
drawn element by element would make every example slow and shrink no better. The profile (fixed
seed, no database, no deadline) is loaded in conftest.py, so a failure reproduces on every run and
prints the ``@reproduce_failure`` blob of the failing example.
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st

from kepler.kernels._common import KERNEL_DTYPES

# Largest |value| is 2**exponent times a number in [0.5, 4): from ~1e-20 to ~1e19 for float32 and
# bfloat16 (float32's range), within float16's normal range for float16.
EXPONENTS = {
    torch.float32: (-66, 62),
    torch.bfloat16: (-66, 62),
    torch.float16: (-12, 12),
}
# Value kinds: Gaussian values, small integers (exact float arithmetic, so exact ties), and
# integers with repeated rows (duplicate codewords / constant rows).
KINDS = ("gaussian", "integers", "repeated")
LAYOUTS = ("contiguous", "column_major", "strided_offset")
NON_FINITE = (float("nan"), float("inf"), float("-inf"))


@dataclasses.dataclass(frozen=True)
class ValueSpec:
    """How to fill one tensor: dtype, 2**exponent magnitude, value kind, layout and NaN/inf spots."""

    dtype: torch.dtype
    exponent: int
    kind: str
    layout: str
    seed: int
    # (fraction of the way through the flat tensor, value) for each NaN/inf placed
    non_finite: tuple[tuple[float, float], ...] = ()

    def build(self, shape: tuple[int, ...], device: str = "cpu") -> torch.Tensor:
        """A tensor of ``shape`` and this spec's dtype, laid out as ``layout`` says."""
        generator = torch.Generator().manual_seed(self.seed)
        if self.kind == "gaussian":
            values = torch.randn(shape, generator=generator, dtype=torch.float64)
        else:
            values = torch.randint(-3, 4, shape, generator=generator).to(torch.float64)
            if self.kind == "repeated" and len(shape) >= 2 and shape[-2] >= 2:
                # every other row a copy of the row before it: exact ties between rows
                values[..., 1::2, :] = values[..., 0 : shape[-2] - 1 : 2, :]
        values = values * 2.0**self.exponent
        flat = values.view(-1)
        for fraction, value in self.non_finite:
            if flat.numel():
                flat[min(int(fraction * flat.numel()), flat.numel() - 1)] = value
        return lay_out(values.to(self.dtype), self.layout).to(device)


def lay_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout: contiguous, column-major (the last two dims'
    strides swapped) or a strided view at a storage offset inside a larger buffer."""
    if layout == "contiguous" or values.dim() < 2:
        return values.contiguous()
    if layout == "column_major":
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    buffer = torch.full((*values.shape[:-1], 2 * values.shape[-1] + 3), float("nan"), dtype=values.dtype)
    view = buffer[..., 3::2]
    view.copy_(values)
    return view


@st.composite
def value_specs(draw, dtypes=KERNEL_DTYPES, non_finite: bool = True, kinds=KINDS) -> ValueSpec:
    """A :class:`ValueSpec`; with ``non_finite`` about one example in four holds NaN/inf."""
    dtype = draw(st.sampled_from(dtypes))
    low, high = EXPONENTS[dtype]
    placed = ()
    if non_finite and draw(st.integers(0, 3)) == 3:
        placed = tuple(draw(st.lists(st.tuples(st.floats(0, 1), st.sampled_from(NON_FINITE)), min_size=1, max_size=3)))
    return ValueSpec(
        dtype=dtype,
        # the ends of the range on purpose: that is where float32 under- and overflows
        exponent=draw(st.one_of(st.sampled_from((low, high)), st.integers(low, high))),
        kind=draw(st.sampled_from(kinds)),
        layout=draw(st.sampled_from(LAYOUTS)),
        seed=draw(st.integers(0, 2**31 - 1)),
        non_finite=placed,
    )
