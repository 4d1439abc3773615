"""``ResidualQuantizer`` (``type: residual``): residual vector quantization on kepler's search.

Stage ``s`` of ``S`` quantizes the residual the stages before it left (RQ-VAE, SoundStream, EnCodec,
DAC)::

    r_0 = z,    q_s = Q_s(r_s),    r_{s+1} = r_s - q_s,    z_q = q_0 + q_1 + ... + q_{S-1}

Each ``Q_s`` is a :class:`~kepler.nn.KeplerQuantizer`, so a stage is one
:func:`kepler.nearest_codeword` search (never a ``(rows, K)`` distance matrix), may cut its residual
into Kepler partitions (``partitions`` sub-vectors, one shared sub-codebook or one per partition), and
keeps its own codebook upkeep: k-means on the residuals it sees (stage ``s`` is initialized on the
first batch's ``r_s``, after the stages before it were), EMA updates and dead-code re-seeding on its
own residuals. With ``shared_stages`` one codebook (one such quantizer) serves every stage.

Tokens per position are ``S * P``, stage-major: ``indices[..., s * P + p]`` is partition ``p`` of
stage ``s``, so the code prior reads a position's stages in order, coarse to fine, as sub-codes
(RQ-Transformer's depth order). ``indices_to_latents(indices, num_stages=s)`` decodes the first ``s``
stages only.

Quantize dropout (SoundStream): in training, a ``quantize_dropout`` fraction of the samples decode from
a random number of stages, uniform in ``[quantize_dropout_min_stages, S]``, so that every prefix
decodes. As in DAC it is per sample; every stage is still searched and trained on every sample's
residual (the same collectives on every rank), only the stages past a sample's count are left out of
its ``z_q``.
"""

from __future__ import annotations

import torch
from torch import nn

from kepler.nn.kepler_quantizer import KeplerQuantizer
from kepler.nn.protocol import (
    Quantizer,
    QuantizerInfo,
    QuantizerOutput,
    check_index_type,
    check_int,
    check_number,
    register_quantizer,
    straight_through,
)


@register_quantizer("residual")
class ResidualQuantizer(Quantizer):
    """Residual vector quantizer of a latent map ``(B, C, H, W)``: ``num_quantizers`` stages, each a
    Kepler quantizer of the residual the stages before it left (see the module docstring).

    Args:
        num_quantizers: stages ``S``.
        num_codes: codes per stage codebook, ``K``.
        dim: latent channels ``C``.
        partitions: sub-vectors each stage cuts its residual into, ``P`` (must divide ``dim``).
        partition: how (``"group"``, ``"custom"``, ``"layer"``; :mod:`kepler.partition`).
        shared_codebook: whether a stage's ``P`` partitions share one sub-codebook (True) or have one
            each (False), as in :class:`~kepler.nn.KeplerQuantizer`.
        shared_stages: one codebook (one stage quantizer) for every stage instead of one per stage.
            Its upkeep then runs once per stage: k-means on the first stage's residuals, an EMA step
            and a dead-code window count per stage (``dead_code_window`` counts searches, ``S`` per
            training step).
        quantize_dropout: fraction of training samples that decode from a random prefix of stages.
        quantize_dropout_min_stages: the fewest stages such a sample keeps.
        beta, legacy: the commitment weight and its placement, per stage (as KeplerQuantizer's);
            the loss is the sum of the stages' losses.
        init: each stage codebook's start: ``"kmeans"`` (on its residuals), ``"uniform"`` or
            ``"lattice:<name>"``.
        ema_decay, dead_code_threshold, dead_code_window: codebook upkeep per stage.
        entropy_weight, entropy_gamma, entropy_temperature: the entropy loss per stage;
            :attr:`loss_terms` holds the stages' mean entropies.
        packing_weight, packing_t: the packing energy of each stage codebook.
        backend: kernel backend of the searches.

    Protocol: ``codebook_size = K``, ``tokens_per_position = S * P``; ``shared_codebook`` is True
    only when one codebook serves every token (``shared_stages`` and one sub-codebook per stage).
    The forward's ``z_q`` is exactly the decoded indices (in training: of the sample's stages).
    :meth:`codewords` is None: the stages' codebooks live at different scales, and one packing figure
    over them would mean nothing.
    """

    def __init__(
        self,
        num_quantizers: int = 4,
        num_codes: int = 1024,
        dim: int = 256,
        partitions: int = 1,
        partition: str = "group",
        shared_codebook: bool = True,
        shared_stages: bool = False,
        quantize_dropout: float = 0.0,
        quantize_dropout_min_stages: int = 1,
        beta: float = 0.25,
        legacy: bool = False,
        init: str = "kmeans",
        ema_decay: float | None = None,
        dead_code_threshold: float = 0,
        dead_code_window: int = 1,
        entropy_weight: float = 0.0,
        entropy_gamma: float = 1.0,
        entropy_temperature: float = 0.01,
        packing_weight: float = 0.0,
        packing_t: float = 1.0,
        backend: str | None = None,
    ):
        num_quantizers = check_int("num_quantizers", num_quantizers, 1)
        partitions = check_int("partitions", partitions, 1)
        shared_stages = bool(shared_stages)
        one_codebook = shared_stages and (bool(shared_codebook) or partitions == 1)
        super().__init__(dim=check_int("dim", dim, 1), codebook_size=check_int("num_codes", num_codes, 1),
                         tokens_per_position=num_quantizers * partitions, shared_codebook=one_codebook)
        self.quantize_dropout = check_number("quantize_dropout", quantize_dropout)
        if self.quantize_dropout > 1:
            raise ValueError(f"quantize_dropout must be <= 1, got {quantize_dropout}")
        self.quantize_dropout_min_stages = check_int("quantize_dropout_min_stages", quantize_dropout_min_stages, 1)
        if self.quantize_dropout_min_stages > num_quantizers:
            raise ValueError(f"quantize_dropout_min_stages={quantize_dropout_min_stages} is more than the "
                             f"num_quantizers={num_quantizers} stages")
        self.num_quantizers = num_quantizers
        self.num_codes = num_codes
        self.partitions = partitions
        self.shared_stages = shared_stages

        def make_stage() -> KeplerQuantizer:
            return KeplerQuantizer(
                num_codes=num_codes, dim=dim, partitions=partitions, partition=partition,
                shared_codebook=shared_codebook, beta=beta, legacy=legacy, init=init, ema_decay=ema_decay,
                dead_code_threshold=dead_code_threshold, dead_code_window=dead_code_window,
                entropy_weight=entropy_weight, entropy_gamma=entropy_gamma,
                entropy_temperature=entropy_temperature, packing_weight=packing_weight, packing_t=packing_t,
                backend=backend,
            )

        self.stages = nn.ModuleList([make_stage() for _ in range(1 if shared_stages else num_quantizers)])
        # Which codebook each token indexes (token s * P + p): the utilization counts codebook entries.
        stage_books = 1 if shared_codebook else partitions
        token_stage = torch.arange(num_quantizers).repeat_interleave(partitions) * (0 if shared_stages else 1)
        token_partition = torch.arange(partitions).repeat(num_quantizers) * (0 if shared_codebook else 1)
        self.register_buffer("token_codebook", token_stage * stage_books + token_partition, persistent=False)
        self.codebooks = len(self.stages) * stage_books
        self.eval_stages: int | None = None

    def set_eval_stages(self, num_stages: int | None) -> None:
        """Make eval-mode forwards decode from the first ``num_stages`` stages only (None: all), to
        measure what a prefix reconstructs; the indices still hold every stage. Not saved."""
        self.eval_stages = None if num_stages is None else self._checked_stages(num_stages)

    def _checked_stages(self, num_stages) -> int:
        """``num_stages`` if it is an int in ``[1, S]``; TypeError/ValueError naming it otherwise."""
        check_int("num_stages", num_stages, 1)
        if num_stages > self.num_quantizers:
            raise ValueError(f"num_stages={num_stages} is more than the quantizer's {self.num_quantizers} stages")
        return num_stages

    def extra_repr(self) -> str:
        parts = [f"num_quantizers={self.num_quantizers}", f"shared_stages={self.shared_stages}"]
        if self.quantize_dropout:
            parts.append(f"quantize_dropout={self.quantize_dropout}, "
                         f"quantize_dropout_min_stages={self.quantize_dropout_min_stages}")
        return ", ".join(parts)

    def stage(self, index: int) -> KeplerQuantizer:
        """The quantizer of stage ``index`` (the same one for every stage with ``shared_stages``)."""
        return self.stages[0 if self.shared_stages else index]

    # ------------------------------------------------------------------------------- forward

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z: (B, C, H, W)`` stage by stage (computed in float32 like the stages).

        Returns :class:`~kepler.nn.QuantizerOutput` ``(z_q, loss, (perplexity, None, indices,
        utilization))`` with ``indices: (B, H, W, S * P)``; ``z_q`` in ``z``'s dtype carries the
        straight-through gradient, ``loss`` is the sum of the stages' losses.
        """
        self.check_latent(z)
        batch, channels, height, width = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            residual = self._stage_layout(z.to(self.stages[0].codebook.dtype))
            stages_used = self._stages_used(batch, z.device)
            if stages_used is not None and residual.shape[0] != batch:
                stages_used = stages_used.repeat_interleave(height * width)
            z_q = torch.zeros_like(residual)
            loss = residual.new_zeros(())
            indices, terms = [], []
            for index in range(self.num_quantizers):
                out = self.stage(index)(residual)
                codes = out.z_q.detach()
                if stages_used is None:
                    z_q = z_q + codes
                else:
                    z_q = z_q + torch.where((stages_used > index).view(-1, 1, 1, 1), codes, 0.0)
                # The stage's loss already holds its commitment gradient to this residual.
                residual = residual - codes
                loss = loss + out.loss
                indices.append(out.indices.reshape(batch, height, width, self.partitions))
                terms.append(self.stage(index).loss_terms)
            z_q = z_q.reshape(batch, height, width, channels).permute(0, 3, 1, 2) if z_q.shape != z.shape else z_q
        index_map = torch.cat(indices, dim=-1)
        if terms[0]:
            self.loss_terms = {name: torch.stack([t[name] for t in terms]).mean() for name in terms[0]}
        batch_counts = self.count_codes(index_map)
        info = QuantizerInfo(self.perplexity_of(batch_counts), None, index_map, self.codebook_utilization())
        return QuantizerOutput(straight_through(z, z_q), loss, info)

    def _stage_layout(self, z: torch.Tensor) -> torch.Tensor:
        """The latents as the stages take them. A partition within each position (``group``,
        ``custom``) sees each position as a ``(C, 1, 1)`` latent of its own: ``(B*H*W, C, 1, 1)``,
        one copy here instead of a layout copy in and out of every stage. Its search rows come in
        the same order, so the codes, losses and random picks are those of the ``(B, C, H, W)`` map.
        ``layer`` partitions cut across positions and take the map itself."""
        if self.stages[0].partition.name == "layer":
            return z
        return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1], 1, 1)

    def _stages_used(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """``(B,)`` int64: how many stages each sample decodes in this forward, or None (every
        stage): in training the quantize dropout's draw, in eval mode :attr:`eval_stages`."""
        if not self.training:
            return None if self.eval_stages is None else torch.full((batch,), self.eval_stages, device=device)
        if self.quantize_dropout == 0:
            return None
        low = self.quantize_dropout_min_stages
        prefix = torch.randint(low, self.num_quantizers + 1, (batch,), device=device)
        dropped = torch.rand(batch, device=device) < self.quantize_dropout
        return torch.where(dropped, prefix, self.num_quantizers)

    def loss_term_names(self) -> tuple[str, ...]:
        return self.stages[0].loss_term_names()

    # ------------------------------------------------------------------------------ protocol

    @property
    def codebook_entries(self) -> int:
        """``K`` times the codebooks: one per stage (or one in all), times ``P`` per-partition ones."""
        return self.codebook_size * self.codebooks

    @torch.no_grad()
    def codebook_utilization(self) -> torch.Tensor:
        """0-d float32: fraction of the codebooks' entries used since :meth:`reset_usage` (tokens
        that index one codebook pool their counts)."""
        per_codebook = torch.zeros(self.codebooks, self.codebook_size, dtype=torch.int64,
                                   device=self.code_counts.device)
        per_codebook.index_add_(0, self.token_codebook.to(self.code_counts.device), self.code_counts)
        return (per_codebook > 0).to(torch.float32).mean()

    def indices_to_latents(self, indices: torch.Tensor, num_stages: int | None = None) -> torch.Tensor:
        """Code indices -> latents ``(B, C, H, W)`` float32: the sum of the first ``num_stages``
        stages' codewords (default: all ``S``), exactly the forward's ``z_q`` for them.

        indices: ``(B, H, W, S * P)`` (all stages; the ones past ``num_stages`` are ignored) or
        ``(B, H, W, num_stages * P)``, int32/int64 in ``[0, K)``.
        """
        stages = self.num_quantizers if num_stages is None else self._checked_stages(num_stages)
        check_index_type(indices)
        tokens = {self.tokens_per_position, stages * self.partitions}
        if indices.dim() != 4 or indices.shape[-1] not in tokens:
            raise ValueError(f"indices must be (B, H, W, S*P={self.tokens_per_position})"
                             + (f" or (B, H, W, {stages * self.partitions}) for {stages} stages"
                                if len(tokens) > 1 else "") + f", got shape {tuple(indices.shape)}")
        used = indices[..., : stages * self.partitions].to(torch.int64)
        self.check_code_range(used)
        batch, height, width, _ = indices.shape
        latents = torch.zeros(batch, self.dim, height, width, dtype=self.stages[0].codebook.dtype,
                              device=indices.device)
        for index in range(stages):  # in the forward's order, so that the sum rounds the same
            stage_indices = used[..., index * self.partitions : (index + 1) * self.partitions]
            latents = latents + self.stage(index)._indices_to_latents(stage_indices)
        return latents.contiguous()
