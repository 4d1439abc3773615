"""``CodeTransformer``: an autoregressive prior over a tokenizer's index maps (the second stage).

A decoder-only, pre-norm transformer (learned absolute positions, GELU MLPs) on
:func:`torch.nn.functional.scaled_dot_product_attention`. Its first input is a start token: a
learned vector for an unconditional prior, the class's embedding for a class-conditional one
(taming's start-of-sequence conditioning). The sequence is an index map in one of the two orders of
:mod:`kepler.models.code_sequence`:

* ``flat``: one step per sub-code (``H*W*P`` steps); the hidden state of a step is read out as
  logits over the ``K`` codes of the next sub-code's codebook (with one codebook per sub-code the
  readout of sub-code ``p`` is the ``[p*K, (p+1)*K)`` slice of the ``P*K`` vocabulary: a token of
  another codebook can never be sampled there).
* ``factorized``: one step per position (``H*W`` steps, ``P^2`` times less attention); a step's
  input is the sum of the embeddings of the previous position's ``P`` sub-codes, and a small
  causal transformer over the ``P`` sub-codes of a position (its inputs: the step's hidden state,
  plus the embedding of the sub-code before) predicts them one after another.

Both orders give logits ``(B, H*W, P, K)``: one distribution per sub-code, in raster order. On a
CUDA device the model runs under bf16 autocast (``bf16_on_gpu``); on the CPU in its parameters' dtype.

Sampling (:meth:`CodeTransformer.generate`) keeps a static key/value cache per layer: each step runs
one token through the stack and attends to the cache under a mask, so the step has the same shapes
at every position and compiles whole (``torch.compile(model.decode_step, fullgraph=True)``).
``use_cache=False`` recomputes the whole prefix at every step instead: the reference the cache is
tested and benchmarked against.

Classifier-free guidance (Ho & Salimans 2022, as LlamaGen samples its class-conditional priors): a
class-conditional prior trained with ``class_dropout > 0`` has one more start token, the learned
null class (row ``num_classes``), which replaces each label with probability ``class_dropout`` in
training. Sampling with ``cfg_scale=S`` runs the conditional rows and their null-class twins as one
batch through one cache and draws each code from ``uncond + S * (cond - uncond)``; ``cfg_schedule=
"linear"`` raises the scale linearly over the sequence, from about 1 to ``S`` at the last sub-code
(MAR's and Muse's schedule; LlamaGen's sampler keeps it constant). :mod:`kepler.models.logits` holds
the arithmetic.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kepler.io.config import register_section
from kepler.models.code_sequence import ORDERS, CodeLayout
from kepler.models.logits import ChooseFn, check_guidance, check_sampling, filter_logits, guided
from kepler.models.transformer import KVCache, TransformerStack

# LlamaGen's class dropout: what model.class_dropout: null means for a class-conditional prior.
DEFAULT_CLASS_DROPOUT = 0.1


class _SubCodeReadout(nn.Module):
    """Hidden states -> logits over a sub-code's ``K`` codes: one ``(K, d)`` map for a shared
    codebook, one per sub-code otherwise."""

    def __init__(self, groups: int, codebook_size: int, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, codebook_size, d_model))
        self.bias = nn.Parameter(torch.zeros(groups, codebook_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden: (B, N, P, d)`` -> ``(B, N, P, K)``."""
        if self.weight.shape[0] == 1:
            return F.linear(hidden, self.weight[0], self.bias[0])
        return torch.einsum("bnpd,pkd->bnpk", hidden, self.weight) + self.bias

    def one(self, hidden: torch.Tensor, token: int) -> torch.Tensor:
        """``hidden: (B, d)`` of sub-code ``token`` -> ``(B, K)``."""
        group = 0 if self.weight.shape[0] == 1 else token
        return F.linear(hidden, self.weight[group], self.bias[group])


class _SubCodeHead(nn.Module):
    """The factorized order's head: a causal transformer over a position's ``P`` sub-codes.

    Input ``p`` is the trunk's hidden state for the position, plus a learned embedding of ``p``,
    plus (``p > 0``) the embedding of sub-code ``p - 1``'s code (token ``(p-1)*K + k``)."""

    def __init__(self, layout: CodeLayout, d_model: int, num_layers: int, num_heads: int, mlp_ratio: float,
                 dropout: float):
        super().__init__()
        tokens, codes = layout.tokens_per_position, layout.codebook_size
        self.previous_code = nn.Embedding((tokens - 1) * codes, d_model) if tokens > 1 else None
        self.sub_code_embedding = nn.Parameter(torch.empty(tokens, d_model))
        self.stack = TransformerStack(d_model, num_layers, num_heads, mlp_ratio, dropout)
        self.readout = _SubCodeReadout(1 if layout.shared_codebook else tokens, codes, d_model)
        self.register_buffer("offsets", layout.partition_offsets()[:-1], persistent=False)

    def _inputs(self, hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """``hidden: (..., d)``, ``previous: (..., p)`` codes of the first ``p`` sub-codes ->
        ``(..., p + 1, d)``."""
        count = previous.shape[-1] + 1
        x = hidden.unsqueeze(-2) + self.sub_code_embedding[:count]
        if count == 1:
            return x
        shifted = self.previous_code(previous + self.offsets[: count - 1])
        return torch.cat([x[..., :1, :], x[..., 1:, :] + shifted], dim=-2)

    def forward(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced: ``hidden: (B, N, d)``, ``codes: (B, N, P)`` -> logits ``(B, N, P, K)``."""
        batch, positions, tokens = codes.shape
        x = self._inputs(hidden, codes[..., :-1]).flatten(0, 1)
        return self.readout(self.stack(x).view(batch, positions, tokens, -1))

    def one(self, hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """``hidden: (B, d)``, ``previous: (B, p)`` -> logits ``(B, K)`` of sub-code ``p``."""
        token = previous.shape[-1]
        return self.readout.one(self.stack(self._inputs(hidden, previous))[:, -1], token)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 if it is (a float64 model is the reference in tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_cross_entropy(logits: torch.Tensor, indices: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in nats of each sub-code of ``indices: (B, H, W, P)`` under ``logits: (B, H*W,
    P, K)`` (what :class:`CodeTransformer` returns): the training objective, 0-d with ``"mean"``,
    ``(B * H * W * P,)`` with ``"none"``."""
    return F.cross_entropy(logits.flatten(0, 2), indices.reshape(-1).to(torch.int64), reduction=reduction)


@register_section("prior", "model", exclude=("layout",))
class CodeTransformer(nn.Module):
    """Autoregressive prior over index maps of one :class:`~kepler.models.code_sequence.CodeLayout`.

    Its keyword arguments are a config section (the layout comes from the tokenizer:
    :meth:`CodeLayout.from_quantizer`).

    Args:
        layout: ``H, W, P, K`` and the codebook sharing of the index maps modelled.
        order: ``"flat"`` (one step per sub-code) or ``"factorized"`` (one step per position, a
            small head for its ``P`` sub-codes); see the module docstring.
        num_classes: 0 for an unconditional prior; otherwise class labels in ``[0, num_classes)``
            condition it (the class embedding is the first input).
        class_dropout: the probability that a training label is replaced by the learned null class
            (label ``num_classes``), which classifier-free guidance needs; in ``[0, 1)``. None: 0.1
            (:data:`DEFAULT_CLASS_DROPOUT`) for a class-conditional prior, 0 for an unconditional
            one. With 0 the prior has no null class (and cannot be guided).
        d_model: width of the residual stream; a multiple of ``num_heads``.
        num_layers: transformer blocks of the trunk.
        num_heads: attention heads (trunk and sub-code head).
        mlp_ratio: MLP hidden width over ``d_model``.
        dropout: dropout on the attention weights and on each residual branch, in ``[0, 1)``.
        head_layers: blocks of the factorized order's sub-code head (unused by ``flat``).
        bf16_on_gpu: run forward, scoring and sampling under bf16 autocast on CUDA devices.

    Index maps are ``(B, H, W, P)`` int64 with codes in ``[0, K)``; class labels ``(B,)`` int64 in
    ``[0, num_classes)``, or :attr:`null_class` (the unconditional start token) where there is one.
    """

    def __init__(
        self,
        layout: CodeLayout,
        *,
        order: str = "flat",
        num_classes: int = 0,
        class_dropout: float | None = None,
        d_model: int = 256,
        num_layers: int = 8,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        head_layers: int = 1,
        bf16_on_gpu: bool = True,
    ):
        super().__init__()
        if not isinstance(layout, CodeLayout):
            raise TypeError(f"layout must be a CodeLayout, got {type(layout).__name__}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(map(repr, ORDERS))}, got {order!r}")
        for name, value, low in (("num_classes", num_classes, 0), ("d_model", d_model, 1),
                                 ("num_layers", num_layers, 1), ("num_heads", num_heads, 1),
                                 ("head_layers", head_layers, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be a multiple of num_heads={num_heads}")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if class_dropout is None:
            class_dropout = DEFAULT_CLASS_DROPOUT if num_classes else 0.0
        if (isinstance(class_dropout, bool) or not isinstance(class_dropout, (int, float))
                or not 0 <= class_dropout < 1):
            raise ValueError(f"class_dropout must be null or a number in [0, 1), got {class_dropout!r}")
        if class_dropout and not num_classes:
            raise ValueError(f"class_dropout={class_dropout} drops class labels, but this CodeTransformer is "
                             "unconditional (num_classes=0)")
        self.layout = layout
        self.order = order
        self.num_classes = num_classes
        self.class_dropout = float(class_dropout)
        # The ``model`` config section of this prior, class_dropout resolved (a saved copy means what it did).
        self.config = dict(order=order, num_classes=num_classes, class_dropout=self.class_dropout, d_model=d_model,
                           num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio, dropout=dropout,
                           head_layers=head_layers, bf16_on_gpu=bool(bf16_on_gpu))
        # The start-token row of "no class": what a dropped label becomes, the unconditional half of guidance.
        self.null_class = num_classes if self.class_dropout else None
        self.num_heads = num_heads
        self.bf16_on_gpu = bool(bf16_on_gpu)
        tokens = layout.tokens_per_position
        self.steps = layout.flat_length if order == "flat" else layout.positions
        vocab = layout.flat_vocab_size if order == "flat" else layout.position_vocab_size
        # Unconditional priors use row 0 as their learned start token; the null class is the last row.
        self.start_embedding = nn.Embedding(max(num_classes, 1) + (self.null_class is not None), d_model)
        self.token_embedding = nn.Embedding(vocab, d_model)
        self.position_embedding = nn.Parameter(torch.empty(self.steps, d_model))
        self.register_buffer("token_offsets", layout.token_offsets(order), persistent=False)
        self.trunk = TransformerStack(d_model, num_layers, num_heads, mlp_ratio, dropout)
        if order == "flat":
            self.readout = _SubCodeReadout(1 if layout.shared_codebook else tokens, layout.codebook_size, d_model)
        else:
            self.head = _SubCodeHead(layout, d_model, head_layers, num_heads, mlp_ratio, dropout)
        self._init_weights(num_layers)

    def _init_weights(self, num_layers: int) -> None:
        """GPT-2's: N(0, 0.02) weights, zero biases, residual output maps scaled by 1/sqrt(2 layers)."""
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif "norm" in name:
                nn.init.ones_(param)
            else:
                residual = name.endswith(("attn.proj.weight", "mlp.2.weight"))
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * num_layers) if residual else 0.02)

    # ------------------------------------------------------------------------------ inputs

    def _autocast(self, device: torch.device):
        if device.type == "cuda" and self.bf16_on_gpu:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def class_labels_for(self, batch: int, class_labels: torch.Tensor | int | None,
                         device: torch.device | None = None) -> torch.Tensor:
        """``(batch,)`` int64 rows of the start-token table: ``class_labels`` checked (a tensor
        ``(batch,)`` or one int for all; :attr:`null_class` allowed), zeros for an unconditional prior."""
        if self.num_classes == 0:
            if class_labels is not None:
                raise ValueError("class_labels given to an unconditional CodeTransformer (num_classes=0); "
                                 "only a prior trained with num_classes > 0 takes a class")
            return torch.zeros(batch, dtype=torch.int64, device=device)
        if class_labels is None:
            raise ValueError(f"class_labels are required: this CodeTransformer is class-conditional "
                             f"(num_classes={self.num_classes})")
        if isinstance(class_labels, int) and not isinstance(class_labels, bool):
            class_labels = torch.full((batch,), class_labels, dtype=torch.int64, device=device)
        if not isinstance(class_labels, torch.Tensor) or class_labels.dtype not in (torch.int32, torch.int64):
            raise TypeError("class_labels must be an int or an int32/int64 torch.Tensor")
        if tuple(class_labels.shape) != (batch,):
            raise ValueError(f"class_labels must be ({batch},), got shape {tuple(class_labels.shape)}")
        if not torch.compiler.is_compiling() and batch:
            low, high = int(class_labels.min()), int(class_labels.max())
            if low < 0 or high >= self.start_embedding.num_embeddings:
                null = "" if self.null_class is None else f" or {self.null_class} (the null class)"
                raise ValueError(f"class_labels must be in [0, {self.num_classes}){null}, got [{low}, {high}]")
        return class_labels.to(device=device, dtype=torch.int64)

    def _step_embedding(self, codes: torch.Tensor) -> torch.Tensor:
        """Input embedding of positions' codes ``(B, N, P)`` as steps: flat ``(B, N*P, d)``,
        factorized ``(B, N, d)`` (the sum over the ``P`` sub-codes)."""
        embedded = self.token_embedding(codes + self.token_offsets)
        return embedded.flatten(1, 2) if self.order == "flat" else embedded.sum(dim=-2)

    def _inputs(self, labels: torch.Tensor, codes: torch.Tensor, length: int) -> torch.Tensor:
        """The first ``length`` inputs ``(B, length, d)``: the start token, then the steps of
        ``codes: (B, N, P)`` (only those before step ``length - 1`` are read), plus positions."""
        x = self.start_embedding(labels).unsqueeze(1)
        if length > 1:
            x = torch.cat([x, self._step_embedding(codes)[:, : length - 1]], dim=1)
        return x + self.position_embedding[:length]

    # ------------------------------------------------------------------------------ training

    def forward(self, indices: torch.Tensor, class_labels: torch.Tensor | int | None = None) -> torch.Tensor:
        """Teacher-forced logits of every sub-code: ``indices: (B, H, W, P)`` -> ``(B, H*W, P, K)``
        float32 (float64 for a float64 model), entry ``[b, n, p]`` the distribution of sub-code ``p``
        of position ``n`` (raster order) given everything before it. In training mode each label
        becomes the null class with probability ``class_dropout`` (drawn from torch's global RNG)."""
        self.layout.check_indices(indices)
        batch = indices.shape[0]
        labels = self.class_labels_for(batch, class_labels, indices.device)
        if self.training and self.class_dropout:
            dropped = torch.rand(batch, device=indices.device) < self.class_dropout
            labels = labels.masked_fill(dropped, self.null_class)
        codes = indices.to(torch.int64).reshape(batch, self.layout.positions, self.layout.tokens_per_position)
        with self._autocast(indices.device):
            hidden = self.trunk(self._inputs(labels, codes, self.steps))
            if self.order == "flat":
                logits = self.readout(hidden.view(*codes.shape, -1))
            else:
                logits = self.head(hidden, codes)
        return _at_least_float32(logits)

    def loss(self, indices: torch.Tensor, class_labels: torch.Tensor | int | None = None) -> torch.Tensor:
        """0-d float32: the mean cross-entropy of a sub-code, in nats (the training objective)."""
        return token_cross_entropy(self(indices, class_labels), indices)

    def nll(self, indices: torch.Tensor, class_labels: torch.Tensor | int | None = None) -> torch.Tensor:
        """Negative log-likelihood in nats of each whole index map ``(B, H, W, P)``: ``(B,)`` float64
        (per token: divide by ``layout.flat_length``; per position: by ``layout.positions``)."""
        per_token = token_cross_entropy(self(indices, class_labels), indices, reduction="none")
        return per_token.view(indices.shape[0], -1).double().sum(dim=1)

    # ------------------------------------------------------------------------------ sampling

    def new_cache(self, batch: int) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` sequences, on this model's device (bf16 under
        ``bf16_on_gpu`` on CUDA, the parameters' dtype otherwise)."""
        reference = self.position_embedding
        dtype = torch.bfloat16 if reference.is_cuda and self.bf16_on_gpu else reference.dtype
        shape = (batch, self.num_heads, self.steps, reference.shape[1] // self.num_heads)

        def layer_buffers():
            return tuple(torch.zeros(shape, dtype=dtype, device=reference.device) for _ in self.trunk.blocks)

        return KVCache(layer_buffers(), layer_buffers())

    def decode_step(self, inputs: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One cached trunk step: ``inputs: (B, d)`` (the step's input embedding, position not yet
        added) at ``position`` (0-d int64) -> the trunk's hidden state ``(B, d)``; writes the step's
        keys and values into ``cache``. Same shapes at every position: compile it once with
        ``model.decode_step = torch.compile(model.decode_step, fullgraph=True)``."""
        x = (inputs + self.position_embedding[position]).unsqueeze(1)
        return self.trunk(x, cache, position)[:, 0]

    @torch.no_grad()
    def decode(self, choose: ChooseFn, num: int, class_labels: torch.Tensor | int | None = None, *,
               use_cache: bool = True, cfg_scale: float | None = None, cfg_schedule: str = "constant") -> torch.Tensor:
        """Index maps ``(num, H, W, P)`` int64 made one sub-code at a time in raster order:
        ``choose(logits (num, K) float32 or float64, token)`` picks the ``(num,)`` codes of sub-code ``token``
        (``n * P + p``). ``use_cache=False`` recomputes the prefix at every step (the reference for
        the cache). Runs in eval mode (dropout off), then restores the mode.

        ``cfg_scale``: classifier-free guidance (see the module docstring; None: none). The ``num``
        conditional rows and their null-class twins run as one batch of ``2 * num``, and ``choose``
        sees the guided logits (:func:`kepler.models.logits.guide`); ``cfg_schedule``: ``"constant"``
        or ``"linear"`` (:func:`kepler.models.logits.guidance_scale`). Scale 1 runs the conditional
        rows alone, a constant 0 the null class's: exactly the logits of no guidance and of the null
        class."""
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"num must be an int >= 1, got {num!r}")
        device = self.position_embedding.device
        labels = self.class_labels_for(num, class_labels, device)
        if cfg_scale is not None:
            self._check_guidance(cfg_scale, cfg_schedule)
            # A batch of 2B rounds its rows unlike one of B (matrix products block by batch size): where
            # the scale is 1 throughout, or a constant 0, only the half it weighs runs, so that these are
            # exactly the conditional and the null-class samples (at half the cost).
            if cfg_scale == 0 and cfg_schedule == "constant":
                labels = torch.full_like(labels, self.null_class)
            elif cfg_scale != 1:
                labels = torch.cat([labels, torch.full_like(labels, self.null_class)])
                choose = guided(choose, cfg_scale, cfg_schedule, self.layout.flat_length)
        rows = len(labels)
        tokens = self.layout.tokens_per_position
        codes = torch.zeros(rows, self.layout.positions, tokens, dtype=torch.int64, device=device)
        cache = self.new_cache(rows) if use_cache else None
        positions = torch.arange(self.steps, device=device)  # one 0-d index per step, made once
        was_training = self.training
        self.eval()
        try:
            with self._autocast(device):
                for step in range(self.steps):
                    hidden = self._step_hidden(labels, codes, step, positions[step], cache)
                    if self.order == "flat":
                        position, token = divmod(step, tokens)
                        logits = self.readout.one(hidden, token)
                        codes[:, position, token] = choose(_at_least_float32(logits), step)
                    else:
                        for token in range(tokens):
                            logits = self.head.one(hidden, codes[:, step, :token])
                            codes[:, step, token] = choose(_at_least_float32(logits), step * tokens + token)
        finally:
            self.train(was_training)
        return codes[:num].view(num, self.layout.height, self.layout.width, tokens)

    def _check_guidance(self, cfg_scale: float, cfg_schedule: str) -> None:
        check_guidance(cfg_scale, cfg_schedule)
        if self.num_classes == 0:
            raise ValueError("classifier-free guidance needs a class-conditional prior; this CodeTransformer is "
                             "unconditional (num_classes=0)")
        if self.null_class is None:
            raise ValueError("classifier-free guidance needs the null class, which a prior trained with "
                             "class_dropout=0 does not have (train with model.class_dropout > 0)")

    def _step_hidden(self, labels: torch.Tensor, codes: torch.Tensor, step: int, step_index: torch.Tensor,
                     cache: KVCache | None):
        """The trunk's hidden state ``(B, d)`` at ``step`` (``step_index``: the same, as a 0-d tensor on
        the model's device), from the cache or by recomputing the prefix."""
        if cache is None:
            return self.trunk(self._inputs(labels, codes, step + 1))[:, -1]
        if step == 0:
            inputs = self.start_embedding(labels)
        elif self.order == "flat":
            position, token = divmod(step - 1, self.layout.tokens_per_position)
            inputs = self.token_embedding(codes[:, position, token] + self.token_offsets[token])
        else:
            inputs = self._step_embedding(codes[:, step - 1 : step])[:, 0]
        return self.decode_step(inputs, step_index, cache)

    def generate(self, num: int, class_labels: torch.Tensor | int | None = None, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True, cfg_scale: float | None = None, cfg_schedule: str = "constant") -> torch.Tensor:
        """Sample ``num`` index maps ``(num, H, W, P)`` int64.

        Each code is drawn from ``softmax(logits / temperature)`` restricted by ``top_k`` / ``top_p``
        (:func:`filter_logits`). The draws use ``generator`` (on the model's device; None: torch's
        global generator), so a seeded generator gives the same maps every time on one device.
        ``class_labels``: one int or ``(num,)``, required by a class-conditional prior, refused by an
        unconditional one. ``cfg_scale``, ``cfg_schedule``: classifier-free guidance
        (:meth:`decode`); the logits are guided before the temperature and the filters, and the
        draws are the same as without guidance, so scale 1 gives the conditional samples of the
        same generator and scale 0 those of the null class."""
        check_sampling(temperature, top_k, top_p, self.layout.codebook_size)

        def sample(logits: torch.Tensor, token: int) -> torch.Tensor:
            probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            return torch.multinomial(probs, 1, generator=generator)[:, 0]

        return self.decode(sample, num, class_labels, use_cache=use_cache, cfg_scale=cfg_scale,
                           cfg_schedule=cfg_schedule)

    # ------------------------------------------------------------------------------ exported folders

    def save_pretrained(self, directory: str | os.PathLike, tokenizer, **card) -> Path:
        """Write this prior and ``tokenizer`` (the :class:`~kepler.models.VQModel` whose index maps it
        models) to ``directory`` for others: see :func:`kepler.models.pretrained.save_pretrained`
        (``card``: its keyword arguments)."""
        from kepler.models.pretrained import save_pretrained

        return save_pretrained(self, directory, tokenizer=tokenizer, **card)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: torch.device | str = "cpu") -> CodeTransformer:
        """A prior written by :meth:`save_pretrained` (or ``kepler export``), in eval mode on ``device``,
        every file checked (:func:`kepler.load`); its tokenizer is the folder's ``tokenizer/``."""
        from kepler.models.load import load_model

        return load_model(directory, device, kind="prior").model
