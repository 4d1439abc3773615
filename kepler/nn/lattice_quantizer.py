"""``LatticeQuantizer`` (``type: lattice``): the densest packings themselves as the codebook.

Each latent is cut into ``P = dim / n`` sub-vectors of the lattice's dimension ``n`` (as
:class:`~kepler.nn.KeplerQuantizer`'s partitions cut it, :mod:`kepler.partition`), each divided by
its partition's scale and replaced by a codeword of a fixed finite code of the lattice
(:mod:`kepler.lattice_codes`):

* ``Z<n>``, ``A2``, ``D3`` (FCC), ``D4``, ``E8``: the Voronoi code of ``q**n`` lattice points, found by
  the lattice's exact closest-point algorithm; a sub-vector outside the code's region would take the
  codeword of its closest point's coset (it wraps around), so sub-vectors are first bounded
  (``bound=True``): ``v -> v * R tanh(|v| / R) / |v|`` with ``R`` the largest codeword norm (times
  the scale), FSQ's ``tanh`` bound made radial. ``Z<n>`` with ``q`` levels is FSQ's grid.
* ``Leech``: the 196560 minimal vectors of the Leech lattice at unit norm, a spherical code; the
  nearest is the one of largest inner product, found by :func:`kepler.nearest_codeword`.

Nothing is learned but the scales: there is no codebook to collapse, and every code stays reachable.
The scales start from the data (``scale=None``, the default): at the first training step each
partition's scale is set so that its sub-vectors' RMS norm, divided by it, is the code's RMS codeword
norm, so the latents spread over the code. Why both: with a fixed start (``scale=1.0``) and no
bound, the equal-bits study's first D4 and E8 runs collapsed (one code per partition, perplexity 1,
held-out PSNR 12.6-14.5 dB, below the 17.4 dB of the mean colour). 300 steps of the demo tokenizer
with D4, q=2 (``kepler train sample model.embed_dim=12 model.quantizer.type=lattice
model.quantizer.lattice=D4 model.quantizer.q=2 train.max_steps=300``): data start alone, perplexity
1.0 and 13.0 dB; data start without the commitment loss, all 16 codes used but 13.0 dB (the
wrapped codes carry no usable signal); data start and bound, 15.9 dB (plain VQ: 15.4 dB at step 200,
16.8 at 400).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kepler.distributed import all_reduce_sum
from kepler.lattice import get_lattice
from kepler.lattice_codes import VoronoiCode, leech_shell
from kepler.nn.protocol import (
    Quantizer,
    QuantizerInfo,
    QuantizerOutput,
    check_backend,
    check_bool,
    check_first_batch_finite,
    check_int,
    check_number,
    register_quantizer,
    straight_through,
)
from kepler.nn.rotation_trick import rotation_trick as rotated_codewords
from kepler.ops.nearest_codeword import nearest_codeword
from kepler.partition import make_partition

# The packing report's nearest-neighbour search is O(K^2 d): codewords() gives None above this.
MAX_EXPLICIT_CODES = 2**16


@register_quantizer("lattice")
class LatticeQuantizer(Quantizer):
    """Lattice quantizer of a latent map ``(B, C, H, W)``: a fixed lattice code per sub-vector.

    Args:
        dim: latent channels ``C``; a multiple of the lattice's dimension ``n``.
        lattice: ``"E8"``, ``"D4"``, ``"D3"`` (or ``"fcc"``), ``"A2"``, ``"Z<n>"`` (Voronoi codes) or
            ``"Leech"`` (the minimal-vector shell); names as :func:`kepler.lattice.get_lattice`.
        q: the Voronoi code's codes per basis direction, >= 2: ``K = q**n`` codes per sub-vector
            (``n log2 q`` bits). None: 2. The Leech shell has ``K = 196560`` and takes no ``q``.
        partition: how a latent is cut into sub-vectors, ``"group"``, ``"custom"`` or ``"layer"``
            (:func:`kepler.partition.make_partition`).
        scale: every partition's initial scale (> 0): a sub-vector ``v`` is coded as
            ``scale * codeword(v / scale)``, codewords at the lattice's natural scale (minimal norm
            2 for ``D_n`` and ``E8``, 1 for ``Z<n>`` and ``A2``, unit norm for the Leech shell).
            None: set from the first training batch (see the module docstring; the RMS norms are
            summed over ``torch.distributed`` ranks), 1 until then.
        learn_scale: learn the ``P`` scales (kept positive as ``exp`` of a parameter). Their gradient
            is the codewords' (``d z_q / d scale = codeword``), through the decoder's loss.
        beta: weight of the commitment loss ``mean((z - sg[z_q])^2)``.
        bound: bound each sub-vector radially inside the code's largest codeword norm (times its
            scale) before it is coded (see the module docstring); the Leech shell, a spherical code
            that cannot wrap, takes no bound.
        rotation_trick: the rotation trick's gradient to ``z`` (:mod:`kepler.nn.rotation_trick`)
            instead of the straight-through one; the forward value is the same. A Voronoi code holds
            the origin, where there is no rotation: sub-vectors coded as 0 keep the straight-through
            gradient.
        backend: kernel backend of the sub-vector search: the closest point of a Voronoi code
            (:func:`kepler.ops.closest_lattice_point.closest_lattice_point`), the nearest codeword of
            the Leech shell (:func:`kepler.nearest_codeword`).

    Tokens per position: ``P``; token ``p`` indexes partition ``p``'s code (the scales differ, so
    the codebooks are not shared). Indices of a Voronoi code are the codeword's lattice coordinates
    modulo ``q`` as base-``q`` digits; of the Leech shell, the row of
    :func:`kepler.lattice_codes.leech_shell`. The sub-vector search runs in float32.
    """

    def __init__(
        self,
        dim: int = 256,
        lattice: str = "E8",
        q: int | None = None,
        partition: str = "group",
        scale: float | None = None,
        learn_scale: bool = True,
        beta: float = 0.25,
        bound: bool = True,
        rotation_trick: bool = False,
        backend: str | None = None,
    ):
        dim = check_int("dim", dim, 1)
        backend = check_backend(backend)
        self.lattice = get_lattice(lattice)
        n = self.lattice.dim
        if dim % n:
            raise ValueError(f"dim={dim} must be a multiple of lattice {self.lattice.name}'s dimension {n}")
        partitions = dim // n
        if self.lattice.name == "Leech":
            if q is not None:
                raise ValueError(f"the Leech shell is a fixed code of 196560 codewords; q must be null, got {q!r}")
            code, codebook_size = None, self.lattice.kissing_number
        else:
            code = VoronoiCode(self.lattice.name, 2 if q is None else check_int("q", q, 2), backend=backend)
            codebook_size = code.size
        super().__init__(dim=dim, codebook_size=codebook_size, tokens_per_position=partitions, shared_codebook=False)
        self.partitions = partitions
        self.sub_dim = n
        self.code = code
        self.q = None if code is None else code.q
        self.partition = make_partition(partition, partitions)
        initial_scale = 1.0 if scale is None else check_number("scale", scale, strict=True)
        learn_scale = check_bool("learn_scale", learn_scale)
        self.log_scale = nn.Parameter(torch.full((partitions,), math.log(initial_scale)), requires_grad=learn_scale)
        # Whether the scales still wait for the first training batch; in the state dict, so a resumed
        # or loaded model keeps its scales.
        self.register_buffer("scale_pending", torch.tensor(scale is None))
        self._scale_pending = scale is None  # the buffer as a Python bool: torch.compile does not branch on tensors
        self.bound = check_bool("bound", bound) and code is not None
        # The code's RMS and largest codeword norms (the Leech shell's are 1), as Python floats.
        self.codeword_rms = self.bound_radius = 1.0
        if code is not None:
            codeword_sq_norms = code.codewords(torch.float64).square().sum(dim=-1)  # on the CPU
            self.codeword_rms = math.sqrt(float(codeword_sq_norms.mean()))
            self.bound_radius = math.sqrt(float(codeword_sq_norms.max()))
        self.beta = check_number("beta", beta)
        self.rotation_trick = check_bool("rotation_trick", rotation_trick)
        self.backend = backend
        if code is None:
            # Rebuilt from the Golay code at construction, so kept out of the state dict (19 MB).
            self.register_buffer("shell", leech_shell(torch.float32), persistent=False)

    def extra_repr(self) -> str:
        parts = [f"dim={self.dim}", f"lattice={self.lattice.name!r}"]
        if self.q is not None:
            parts.append(f"q={self.q}")
        parts += [
            f"partitions={self.partitions}",
            f"partition={self.partition.name!r}",
            f"codebook_size={self.codebook_size}",
            f"learn_scale={self.log_scale.requires_grad}",
            f"beta={self.beta}",
        ]
        if self.code is not None and not self.bound:
            parts.append("bound=False")
        if self.rotation_trick:
            parts.append("rotation_trick=True")
        return ", ".join(parts)

    @property
    def scale(self) -> torch.Tensor:
        """``(P,)`` float32: each partition's scale."""
        return self.log_scale.exp()

    # ------------------------------------------------------------------------------- codes

    def _encode(self, rows: torch.Tensor) -> torch.Tensor:
        """Sub-vectors at the lattice's scale ``(N, n)`` float32 -> code indices ``(N,)`` int64."""
        if self.code is not None:
            return self.code.encode(rows)
        indices, _ = nearest_codeword(rows, self.shell, backend=self.backend)
        return indices

    def _unit_codewords(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices ``(..., P)`` -> codewords at the lattice's scale ``(..., P, n)`` float32."""
        flat = indices.reshape(-1)
        unit = self.code.decode(flat, torch.float32) if self.code is not None else self.shell[flat]
        return unit.view(*indices.shape, self.sub_dim)

    def _decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices ``(..., P)`` -> scaled codewords ``(..., P, n)`` float32, no gradient."""
        return self.scale.detach().unsqueeze(-1) * self._unit_codewords(indices)

    # ------------------------------------------------------------------------------- forward

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z: (B, C, H, W)`` (any float dtype; the search runs in float32).

        Returns :class:`~kepler.nn.QuantizerOutput` ``(z_q, loss, (perplexity, None, indices,
        utilization))``; ``z_q`` has ``z``'s dtype.
        """
        self.check_latent(z)
        self.partition.check(z.shape, self.sub_dim)
        shape = z.shape
        batch = shape[0]
        with torch.autocast(device_type=z.device.type, enabled=False):
            parts = self.partition.partition(z)  # (B, L, P, n)
            if self.training and self._scale_pending:
                self._scale_from(parts.detach())
            scale = self.scale
            if self.bound:
                parts = self._bounded(parts, scale)
            rows = (parts.detach().to(torch.float32) / scale.detach().unsqueeze(-1)).reshape(-1, self.sub_dim)
            indices = self._encode(rows).view(parts.shape[:-1])  # (B, L, P)
            unit = self._unit_codewords(indices)
            code_parts = scale.detach().unsqueeze(-1) * unit
            if self.rotation_trick:
                out_parts = rotated_codewords(parts, code_parts)
            else:
                out_parts = straight_through(parts, code_parts)
            if scale.requires_grad:
                # Adds exactly zero: the scales' gradient is the codewords, d z_q / d scale = codeword.
                scale_gradient = (scale - scale.detach()).unsqueeze(-1) * unit
                out_parts = out_parts + scale_gradient.to(out_parts.dtype)
            out = self.partition.unpartition(out_parts, shape).contiguous()
            z_q = out.detach()
            residual = z.to(torch.float32) - z_q.to(torch.float32)
            loss = self.beta * residual.square().mean() if z.numel() else residual.new_zeros(())

        index_map = indices.view(batch, shape[2], shape[3], self.partitions)
        batch_counts = self.count_codes(index_map)
        info = QuantizerInfo(self.perplexity_of(batch_counts), None, index_map, self.codebook_utilization())
        return QuantizerOutput(out, loss, info)

    def _bounded(self, parts: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Sub-vectors ``(B, L, P, n)`` moved radially inside ``R = bound_radius * scale``:
        ``v * R tanh(|v| / R) / |v|`` (the identity near 0, differentiable in ``v`` and the scale)."""
        radius = self.bound_radius * scale.unsqueeze(-1).to(parts.dtype)
        norm = parts.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(parts.dtype).tiny)
        return parts * (radius * torch.tanh(norm / radius) / norm)

    @torch.no_grad()
    def _scale_from(self, parts: torch.Tensor) -> None:
        """Set each partition's scale from sub-vectors ``(B, L, P, n)``: their RMS norm over the
        codewords' RMS norm (a partition whose sub-vectors are all 0 keeps its scale)."""
        check_first_batch_finite(parts, "lattice scale initialization", "the scales would be NaN")
        sq_norms = parts.to(torch.float64).square().sum(dim=-1).reshape(-1, self.partitions)
        totals = all_reduce_sum(torch.stack([sq_norms.sum(dim=0), torch.full_like(sq_norms[0], sq_norms.shape[0])]))
        rms = (totals[0] / totals[1].clamp_min(1.0)).sqrt()
        log_scale = torch.where(rms > 0, (rms / self.codeword_rms).log(), self.log_scale.double())
        self.log_scale.copy_(log_scale.to(self.log_scale.dtype))
        self.scale_pending.fill_(False)
        self._scale_pending = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._scale_pending = bool(self.scale_pending)

    # ------------------------------------------------------------------------------ protocol

    def _indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, P)`` int64 -> the scaled codewords laid out as ``(B, C, H, W)``, float32."""
        batch, height, width, _ = indices.shape
        latent_shape = (batch, self.dim, height, width)
        self.partition.check(latent_shape, self.sub_dim)
        index = indices.reshape(batch, self.partition.slots(latent_shape), self.partitions)
        return self.partition.unpartition(self._decode(index), latent_shape)

    def codewords(self) -> torch.Tensor | None:
        """Every partition's scaled codewords ``(P, K, n)`` float32, or None past
        ``MAX_EXPLICIT_CODES`` codes (the Leech shell: its packing is known, minimal angle 60 degrees)."""
        if self.codebook_size > MAX_EXPLICIT_CODES:
            return None
        all_indices = torch.arange(self.codebook_size, device=self.log_scale.device)
        return self._decode(all_indices.unsqueeze(-1).expand(-1, self.partitions)).transpose(0, 1).detach()

    def sub_vectors(self, z: torch.Tensor) -> torch.Tensor | None:
        """The sub-vectors of ``z: (B, C, H, W)`` as :meth:`codewords` are laid out: ``(P, N, n)``;
        None where :meth:`codewords` is."""
        if self.codebook_size > MAX_EXPLICIT_CODES:
            return None
        self.check_latent(z)
        self.partition.check(z.shape, self.sub_dim)
        parts = self.partition.partition(z.to(torch.float32))
        return parts.permute(2, 0, 1, 3).reshape(self.partitions, -1, self.sub_dim)
