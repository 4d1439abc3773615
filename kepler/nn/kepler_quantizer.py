"""``KeplerQuantizer``: the vector quantizer of the Kepler Codebook paper, on kepler's kernels.

Configured like the released code (``partition="group"`` or ``"custom"``, shared codebook,
``legacy=True``, ``init="uniform"``) it computes what the released ``VectorQuantizer_kepler``
computes -- same indices, quantized latents, loss and gradients -- without materializing the
``(rows, K)`` distance matrix. On top of that it fixes the released code's bugs (``scale != 1``,
``get_codebook_entry`` for the ``custom`` and ``layer`` partitions, usage counted over the wrong
codebook size) and adds per-partition codebooks, the packing-energy regularizer, data-dependent
initializations, EMA codebook updates, dead-code re-seeding and ``torch.distributed`` support.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kepler.lattice import get_lattice
from kepler.losses import code_entropy, kepler_kl, official_grid_prior, packing_energy, prior_row
from kepler.nn.codebook import CodebookUpkeep
from kepler.nn.protocol import (
    MAX_CODES,
    Quantizer,
    QuantizerInfo,
    QuantizerOutput,
    check_backend,
    check_bool,
    check_int,
    check_number,
    register_quantizer,
    straight_through,
)
from kepler.nn.rotation_trick import rotation_trick as rotated_codewords
from kepler.ops.nearest_codeword import nearest_codeword
from kepler.partition import make_partition
from kepler.reference.kepler_kl import standardize_rows


class _ScaleGradient(torch.autograd.Function):
    """Identity forward, gradient times ``weight`` backward: one distance, two loss weights."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.weight, None


def _parse_prefixed(value: str, argument: str, plain: tuple[str, ...]) -> tuple[str, str | None]:
    """``"lattice:<name>"`` -> ``("lattice", name)``; a plain choice -> ``(value, None)``."""
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a str, got {type(value).__name__}")
    if value in plain:
        return value, None
    if value.startswith("lattice:") and value[len("lattice:") :]:
        return "lattice", value[len("lattice:") :]
    choices = ", ".join(repr(c) for c in plain)
    raise ValueError(f"{argument} must be {choices} or 'lattice:<name>', got {value!r}")


def _lattice_points(name: str, count: int, dim: int | None) -> torch.Tensor:
    """``count`` points of lattice ``name`` nearest the origin, ``(count, n)`` float64.

    With ``dim`` given, the lattice must live in dimension ``n == dim``.
    """
    lattice = get_lattice(name)
    if dim is not None and lattice.dim != dim:
        raise ValueError(
            f"lattice {name!r} lives in dimension {lattice.dim}, but the codebook's "
            f"sub-vectors have dim/partitions={dim} elements"
        )
    return lattice.points(count)


@register_quantizer("kepler")
class KeplerQuantizer(Quantizer):
    """Partitioned vector quantizer of a latent map ``(B, C, H, W)`` (Kepler Codebook).

    Each latent is cut into ``partitions`` sub-vectors of ``dim / partitions`` elements (see
    :mod:`kepler.partition`), each replaced by its nearest codeword
    (:func:`kepler.nearest_codeword`), and the result returned with the straight-through
    gradient.

    Args:
        num_codes: codebook size before ``scale``.
        dim: latent channels ``C``.
        partitions: sub-vectors per latent vector, ``P``; must divide ``dim``.
        partition: ``"group"`` (contiguous channel chunks, released default), ``"custom"`` (the
            released even/odd interleaving) or ``"layer"`` (chunks of each channel's ``H x W``
            map; needs ``H * W == dim``).
        shared_codebook: True (released): one codebook ``(K, dim / P)`` shared by every
            partition. False: one sub-codebook per partition, ``(P, K, dim / P)`` (product
            quantization), searched by the grouped kernels in one launch.
        scale: the codebook has ``K = round(num_codes * scale)`` entries (per partition with
            ``shared_codebook=False``).
        beta: commitment weight.
        legacy: True is the released ordering, ``mean((sg[z_q] - z)^2) +
            beta * mean((z_q - sg[z])^2)`` (beta lands on the codebook term); False puts beta on
            the commitment term: ``beta * mean((sg[z_q] - z)^2) + mean((z_q - sg[z])^2)``.
        kepler_kl_weight: weight of :func:`kepler.losses.kepler_kl` on the quantized latents
            (each image's ``(H, W, C)`` codewords flattened to one row; the gradient reaches the
            codebook only, as released).
        kl_prior: ``"grid"``, the released hypercube prior
            (:func:`kepler.losses.official_grid_prior` with ``num_codes`` rows), or
            ``"lattice:<name>"``, the ``num_codes`` points of that lattice nearest the origin;
            either laid out to the row length by :func:`kepler.losses.prior_row`. Drawn once at
            construction and kept in the state dict.
        kl_prior_seed: seed of the ``"grid"`` prior's random start row; None takes
            ``torch.initial_seed()``, so a run seeded with ``torch.manual_seed`` gets the same
            prior every time. The prior never draws from torch's global RNG: switching the KL on
            leaves the initialization of every other layer as it was.
        packing_weight: weight of :func:`kepler.losses.packing_energy` of the codebook (the mean
            over sub-codebooks with ``shared_codebook=False``).
        packing_t: the packing energy's temperature.
        entropy_weight: weight of the entropy loss of LFQ / MAGVIT-v2 on the soft assignment of
            each sub-vector to its codebook (:func:`kepler.losses.code_entropy`):
            ``entropy_weight * (per_sample - entropy_gamma * batch)``, each partition's sub-vectors
            against its codebook (the shared one or its own), averaged over partitions. Both
            entropies of the last forward are in :attr:`loss_terms` (``entropy_per_sample``,
            ``entropy_batch``), in the training logs and the validation metrics. With an EMA
            codebook the gradient reaches the sub-vectors only.
        entropy_gamma: weight of the batch entropy (code use) against the per-sample entropy.
        entropy_temperature: temperature of the soft assignment, ``softmax(-||z - e||^2 / T)``.
        init: ``"uniform"`` (released: ``U(-1/K, 1/K)``), ``"lattice:<name>"`` (the ``K``
            lattice points nearest the origin, centred on the first batch's mean sub-vector and
            scaled to its RMS spread) or ``"kmeans"`` (Lloyd iterations on the first batch's
            sub-vectors). Data-dependent inits run at the first forward (see
            :class:`kepler.nn.codebook.CodebookUpkeep`, which also keeps the EMA and dead-code state).
        ema_decay: None (the codebook learns from the codebook loss) or a decay in (0, 1): the
            codebook follows Laplace-smoothed exponential moving averages of its assigned
            sub-vectors instead, and the loss keeps only the commitment term (weight 1 with
            ``legacy=True``, ``beta`` with ``legacy=False``). Excludes the two regularizers.
        dead_code_threshold: 0 (off) or a count: at the start of a training forward that ends a
            window of ``dead_code_window`` training forwards, codes used fewer times than this
            in that window are re-seeded from random sub-vectors of the current batch.
        backend: kernel backend for every op (see :func:`kepler.available_backends`).
        dead_code_window: training forwards per dead-code window.
        l2_norm: l2-normalize every sub-vector and every codeword before the search and the loss
            (ViT-VQGAN, LlamaGen): the search is then by cosine similarity and the quantized
            sub-vectors (and ``indices_to_latents``) are unit codewords. With a small ``dim /
            partitions`` this is LlamaGen's codebook. The stored codebook stays unnormalized (EMA,
            k-means and re-seeding run on the normalized sub-vectors, and the codebook is normalized
            where it is used), and ``codewords()`` / ``sub_vectors()`` are on the sphere, so the
            packing report is too.
        rotation_trick: False: the straight-through gradient to ``z``; True: the rotation trick's
            (:mod:`kepler.nn.rotation_trick`), each sub-vector's gradient rotated and scaled as the
            rotation that takes the sub-vector onto its codeword. The forward value is the same.

    Tokens per position: ``P`` (one index per sub-vector); the quantizer protocol
    (:mod:`kepler.nn.protocol`) gives the code counts, usage and decoding.

    Under ``torch.distributed`` the code counts, EMA statistics, k-means statistics and
    initialization statistics are summed over ranks and random picks (k-means seeds, re-seeded
    codes) come from rank 0, so every rank keeps the same codebook.

    The codebook is updated in place at the start (re-seeding) or end (EMA) of a training
    forward: call backward before the next training forward, as usual.
    """

    def __init__(
        self,
        num_codes: int = 1024,
        dim: int = 256,
        partitions: int = 4,
        partition: str = "group",
        shared_codebook: bool = True,
        scale: float = 1.0,
        beta: float = 0.25,
        legacy: bool = True,
        kepler_kl_weight: float = 0.0,
        kl_prior: str = "grid",
        kl_prior_seed: int | None = None,
        packing_weight: float = 0.0,
        packing_t: float = 1.0,
        entropy_weight: float = 0.0,
        entropy_gamma: float = 1.0,
        entropy_temperature: float = 0.01,
        init: str = "uniform",
        ema_decay: float | None = None,
        dead_code_threshold: float = 0,
        backend: str | None = None,
        dead_code_window: int = 1,
        rotation_trick: bool = False,
        l2_norm: bool = False,
    ):
        num_codes = check_int("num_codes", num_codes, 1)
        dim = check_int("dim", dim, 1)
        partitions = check_int("partitions", partitions, 1)
        if dim % partitions:
            raise ValueError(f"dim={dim} must be divisible by partitions={partitions}")
        scale = check_number("scale", scale, strict=True)
        codebook_size = round(num_codes * scale)
        if codebook_size < 1:
            raise ValueError(f"scale={scale} leaves round(num_codes * scale) = {codebook_size} codes")
        if codebook_size > MAX_CODES:  # named here: the protocol's own check knows no num_codes
            raise ValueError(f"num_codes={num_codes} x scale={scale} gives {codebook_size} codes; at most {MAX_CODES} (2**20)")
        super().__init__(
            dim=dim, codebook_size=codebook_size, tokens_per_position=partitions, shared_codebook=bool(shared_codebook)
        )
        self.num_codes = num_codes
        self.partitions = partitions
        self.partition = make_partition(partition, partitions)
        self.scale = scale
        self.sub_dim = dim // partitions
        self.beta = check_number("beta", beta)
        self.legacy = bool(legacy)
        self.kepler_kl_weight = check_number("kepler_kl_weight", kepler_kl_weight)
        self.kl_prior = kl_prior
        _, kl_lattice = _parse_prefixed(kl_prior, "kl_prior", ("grid",))
        if kl_prior_seed is not None:
            check_int("kl_prior_seed", kl_prior_seed, 0)
        self.packing_weight = check_number("packing_weight", packing_weight)
        self.packing_t = check_number("packing_t", packing_t, strict=True)
        if self.packing_weight > 0 and codebook_size < 2:
            raise ValueError("packing_weight > 0 needs a codebook of at least 2 codes")
        self.entropy_weight = check_number("entropy_weight", entropy_weight)
        self.entropy_gamma = check_number("entropy_gamma", entropy_gamma)
        self.entropy_temperature = check_number("entropy_temperature", entropy_temperature, strict=True)
        self.init = init
        init_kind, init_lattice = _parse_prefixed(init, "init", ("uniform", "kmeans"))
        if ema_decay is not None:
            ema_decay = check_number("ema_decay", ema_decay, strict=True)
            if ema_decay >= 1:
                raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        self.ema_decay = ema_decay
        if ema_decay is not None and (self.kepler_kl_weight > 0 or self.packing_weight > 0):
            # Both regularizers act through the codebook's gradient, which EMA codebooks do not take.
            raise ValueError(
                "kepler_kl_weight and packing_weight need a gradient-trained codebook (ema_decay=None)"
            )
        dead_code_threshold = check_number("dead_code_threshold", dead_code_threshold)
        dead_code_window = check_int("dead_code_window", dead_code_window, 1)
        self.backend = check_backend(backend)
        self.rotation_trick = check_bool("rotation_trick", rotation_trick)
        self.l2_norm = check_bool("l2_norm", l2_norm)

        self._groups = 1 if self.shared_codebook else partitions
        codebook_shape = (codebook_size, self.sub_dim)
        if not self.shared_codebook:
            codebook_shape = (partitions,) + codebook_shape
        bound = 1.0 / codebook_size
        self.codebook = nn.Parameter(
            torch.empty(codebook_shape).uniform_(-bound, bound), requires_grad=ema_decay is None
        )
        self.upkeep = CodebookUpkeep(
            self.codebook,
            self._groups,
            init=init_kind,
            # Enumerated now, so an unknown or mis-sized lattice fails at construction.
            init_points=_lattice_points(init_lattice, codebook_size, self.sub_dim) if init_lattice else None,
            ema_decay=ema_decay,
            dead_code_threshold=dead_code_threshold,
            dead_code_window=dead_code_window,
            backend=backend,
        )
        if self.kepler_kl_weight > 0:
            if kl_lattice is None:
                seed = torch.initial_seed() if kl_prior_seed is None else kl_prior_seed
                prior = official_grid_prior(num_codes, seed=seed)
            else:
                prior = _lattice_points(kl_lattice, num_codes, None).to(torch.float32)
            self.register_buffer("kl_prior_points", prior)

    def extra_repr(self) -> str:
        parts = [
            f"num_codes={self.num_codes}",
            f"dim={self.dim}",
            f"partitions={self.partitions}",
            f"partition={self.partition.name!r}",
            f"shared_codebook={self.shared_codebook}",
            f"codebook={tuple(self.codebook.shape)}",
            f"beta={self.beta}",
            f"legacy={self.legacy}",
        ]
        if self.kepler_kl_weight:
            parts.append(f"kepler_kl_weight={self.kepler_kl_weight}, kl_prior={self.kl_prior!r}")
        if self.packing_weight:
            parts.append(f"packing_weight={self.packing_weight}, packing_t={self.packing_t}")
        if self.entropy_weight:
            parts.append(
                f"entropy_weight={self.entropy_weight}, entropy_gamma={self.entropy_gamma}, "
                f"entropy_temperature={self.entropy_temperature}"
            )
        if self.init != "uniform":
            parts.append(f"init={self.init!r}")
        if self.rotation_trick:
            parts.append("rotation_trick=True")
        if self.l2_norm:
            parts.append("l2_norm=True")
        if self.ema_decay is not None:
            parts.append(f"ema_decay={self.ema_decay}")
        if self.upkeep.dead_code_threshold:
            parts.append(
                f"dead_code_threshold={self.upkeep.dead_code_threshold}, "
                f"dead_code_window={self.upkeep.dead_code_window}"
            )
        return ", ".join(parts)

    # ----------------------------------------------------------------------------------- layout

    def _check_latent(self, z: torch.Tensor) -> None:
        self.check_latent(z)
        self.partition.check(z.shape, self.sub_dim)

    def _search_rows(self, parts: torch.Tensor) -> torch.Tensor:
        """``(B, L, P, d)`` -> search rows: ``(B*L*P, d)`` shared, ``(P, B*L, d)`` per partition."""
        batch, slots = parts.shape[:2]
        if self.shared_codebook:
            return parts.reshape(batch * slots * self.partitions, self.sub_dim)
        return parts.permute(2, 0, 1, 3).reshape(self.partitions, batch * slots, self.sub_dim)

    def _global_index(self, indices: torch.Tensor) -> torch.Tensor:
        """Search-order indices ``(R,)`` or ``(P, N)`` -> flat rows of ``codebook.view(-1, d)``."""
        if self.shared_codebook:
            return indices
        offsets = torch.arange(self.partitions, device=indices.device) * self.codebook_size
        return indices + offsets.unsqueeze(1)

    def _codes_to_parts(self, codes: torch.Tensor, batch: int, slots: int) -> torch.Tensor:
        """Codewords in search order -> ``(B, L, P, d)``."""
        if self.shared_codebook:
            return codes.view(batch, slots, self.partitions, self.sub_dim)
        return codes.view(self.partitions, batch, slots, self.sub_dim).permute(1, 2, 0, 3)

    # ------------------------------------------------------------------------------- forward

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z: (B, C, H, W)`` (any float dtype; computed in the codebook's dtype).

        Returns :class:`QuantizerOutput` ``(z_q, loss, (perplexity, None, indices, utilization))``.
        """
        self._check_latent(z)
        shape = z.shape
        batch, slots = shape[0], self.partition.slots(shape)
        with torch.autocast(device_type=z.device.type, enabled=False):
            parts = self._on_sphere(self.partition.partition(z.to(self.codebook.dtype)))
            rows = self._search_rows(parts)
            grouped_rows = rows.detach().reshape(self._groups, -1, self.sub_dim)
            self.upkeep.before_search(self.codebook, grouped_rows, self.training)

            codebook = self.codebook
            if self.ema_decay is not None and self.training:
                # The EMA step below rewrites the codebook in place; backward needs this step's.
                codebook = codebook.detach().clone()
            codebook = self._on_sphere(codebook)
            indices, loss = self._search_and_vq_loss(rows, codebook)
            flat_index = self._global_index(indices).reshape(-1)

            kl_active = self.kepler_kl_weight > 0
            gather_from = codebook if kl_active else codebook.detach()
            codes = F.embedding(flat_index, gather_from.reshape(-1, self.sub_dim))
            code_parts = self._codes_to_parts(codes, batch, slots)
            z_q = self.partition.unpartition(code_parts, shape)
            if kl_active and batch > 0:
                loss = loss + self.kepler_kl_weight * self._kepler_kl(z_q)
            if self.packing_weight > 0:
                loss = loss + self.packing_weight * self._packing_energy()
            if self.entropy_weight > 0:
                loss = loss + self.entropy_weight * self._entropy_loss(rows, codebook)
            if self.rotation_trick:
                rotated = rotated_codewords(parts.to(z.dtype), code_parts)
                out = self.partition.unpartition(rotated, shape).contiguous()
            else:
                # The gradient reaches z through the normalization when l2_norm is on.
                source = self.partition.unpartition(parts, shape).to(z.dtype) if self.l2_norm else z
                out = straight_through(source, z_q)

        if self.shared_codebook:
            index_map = indices.view(batch, shape[2], shape[3], self.partitions)
        else:
            index_map = indices.view(self.partitions, batch, shape[2], shape[3]).permute(1, 2, 3, 0)
            index_map = index_map.contiguous()
        batch_counts = self.count_codes(index_map)
        if self.training:
            entry_counts = batch_counts.sum(dim=0) if self.shared_codebook else batch_counts.reshape(-1)
            self.upkeep.after_search(self.codebook, entry_counts, flat_index, grouped_rows)
        info = QuantizerInfo(self.perplexity_of(batch_counts), None, index_map, self.codebook_utilization())
        return QuantizerOutput(out, loss, info)

    def _search_and_vq_loss(
        self, rows: torch.Tensor, codebook: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codes of ``rows`` and the VQ loss, from one search and no second gather.

        ``sq_dist`` is ``||z - e||^2`` per sub-vector, differentiable in both; the mean of
        ``(z_q - z)^2`` over all latent elements is ``mean(sq_dist) / d``. The commitment term
        (gradient to z) and the codebook term (gradient to the codebook) share that value, so the
        loss is ``(w_z + w_e) * mean`` with the gradient into each side scaled to its own weight.
        """
        commitment_weight = 1.0 if self.legacy else self.beta
        codebook_weight = self.beta if self.legacy else 1.0
        if not codebook.requires_grad:
            codebook_weight = 0.0
        total_weight = commitment_weight + codebook_weight
        if total_weight > 0:
            if commitment_weight != total_weight:
                rows = _ScaleGradient.apply(rows, commitment_weight / total_weight)
            if codebook_weight != total_weight:
                codebook = _ScaleGradient.apply(codebook, codebook_weight / total_weight)
        indices, sq_dist = nearest_codeword(rows, codebook, backend=self.backend)
        elements = max(sq_dist.numel(), 1) * self.sub_dim
        loss = sq_dist.sum() * (total_weight / elements)
        return indices, loss

    def _kepler_kl(self, z_q: torch.Tensor) -> torch.Tensor:
        # The released loss flattens each image's (H, W, C) codewords to one row.
        latent_rows = z_q.permute(0, 2, 3, 1).reshape(z_q.shape[0], -1)
        prior_logq = self._kl_prior_logq(latent_rows.shape[1]).to(latent_rows.device)
        return kepler_kl(latent_rows, prior_logq=prior_logq, backend=self.backend)

    def _kl_prior_logq(self, length: int) -> torch.Tensor:
        """``log q`` for latent rows of ``length``, ``(1, length)`` float32.

        As released: the *whole* flattened prior is standardized, then laid out to ``length``
        (cropped, or tiled where the released code would crash), then soft-maxed.
        """
        flat = self.kl_prior_points.reshape(-1).to(torch.float64)
        standardized = prior_row(standardize_rows(flat, "official"), length)
        return torch.log_softmax(standardized, dim=-1).to(torch.float32).unsqueeze(0)

    def _on_sphere(self, vectors: torch.Tensor) -> torch.Tensor:
        """``vectors`` (sub-vectors or codewords, last axis ``d``) l2-normalized when ``l2_norm``."""
        return F.normalize(vectors, dim=-1) if self.l2_norm else vectors

    def _packing_energy(self) -> torch.Tensor:
        return packing_energy(self._on_sphere(self.codebook), t=self.packing_t, backend=self.backend).mean()

    def loss_term_names(self) -> tuple[str, ...]:
        return ("entropy_per_sample", "entropy_batch") if self.entropy_weight > 0 else ()

    def _entropy_loss(self, rows: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """``per_sample - entropy_gamma * batch`` of each partition's rows, averaged over partitions.

        rows: search rows (``(B*L*P, d)`` shared, ``(P, B*L, d)`` per partition); codebook: the
        searched codebook. Leaves both entropies (means over partitions) in :attr:`loss_terms`.
        """
        by_partition = rows if not self.shared_codebook else rows.view(-1, self.partitions, self.sub_dim).transpose(0, 1)
        per_sample, batch = code_entropy(by_partition, codebook, self.entropy_temperature, backend=self.backend)
        self.loss_terms = {"entropy_per_sample": per_sample.detach().mean(), "entropy_batch": batch.detach().mean()}
        return (per_sample - self.entropy_gamma * batch).mean()

    # ------------------------------------------------------------------------------ protocol

    def _indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, P)`` int64 -> the codewords laid out as ``(B, C, H, W)``, the codebook's dtype."""
        batch, height, width, _ = indices.shape
        latent_shape = (batch, self.dim, height, width)
        self.partition.check(latent_shape, self.sub_dim)
        index = indices.reshape(batch, self.partition.slots(latent_shape), self.partitions)
        if not self.shared_codebook:
            index = index + torch.arange(self.partitions, device=index.device) * self.codebook_size
        codes = F.embedding(index, self._on_sphere(self.codebook).reshape(-1, self.sub_dim))
        return self.partition.unpartition(codes, latent_shape)

    def codewords(self) -> torch.Tensor:
        """The codebook as ``(G, K, d)``: ``G = 1`` shared, ``G = P`` per partition."""
        return self._on_sphere(self.codebook).view(self._groups, self.codebook_size, self.sub_dim)

    def sub_vectors(self, z: torch.Tensor) -> torch.Tensor:
        """The sub-vectors of ``z: (B, C, H, W)`` as the forward searches them: ``(G, N, d)``."""
        self._check_latent(z)
        rows = self._search_rows(self._on_sphere(self.partition.partition(z.to(self.codebook.dtype))))
        return rows.reshape(self._groups, -1, self.sub_dim)
