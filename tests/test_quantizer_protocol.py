"""The quantizer protocol: a quantizer written here, knowing nothing of KeplerQuantizer, goes through
VQModel, the trainer, evaluation and the CLI; the registry and the config schema read off constructors."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_train import random_images, tiny_config

from kepler.cli import main
from kepler.models import VQModel
from kepler.nn import (
    KeplerQuantizer,
    Quantizer,
    QuantizerInfo,
    QuantizerOutput,
    build_quantizer,
    register_quantizer,
    straight_through,
)
from kepler.io.config import load_config
from kepler.train.trainer import train


@register_quantizer("test_rounding")
class RoundingQuantizer(Quantizer):
    """Each latent channel rounded to the nearest of ``levels`` integers centred on 0: one token per
    channel (P = C), an implicit codebook of ``levels`` scalars shared by every channel."""

    def __init__(self, dim: int, levels: int = 8, commitment: float = 0.25):
        super().__init__(dim=dim, codebook_size=levels, tokens_per_position=dim, shared_codebook=True)
        self.offset = (levels - 1) / 2
        self.commitment = commitment

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        indices = torch.clamp(torch.round(z.detach() + self.offset), 0, self.codebook_size - 1).long()
        z_q = indices.to(z.dtype) - self.offset
        loss = self.commitment * F.mse_loss(z, z_q)
        index_map = indices.permute(0, 2, 3, 1).contiguous()
        counts = self.count_codes(index_map)
        info = QuantizerInfo(self.perplexity_of(counts), None, index_map, self.codebook_utilization())
        return QuantizerOutput(straight_through(z, z_q), loss, info)

    def _indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        return (indices.to(torch.float32) - self.offset).permute(0, 3, 1, 2)


def rounding_config(tmp_path, steps: int = 3):
    path = tiny_config(tmp_path, steps=steps, disc_start=2)
    path.write_text(path.read_text().replace("quantizer: {num_codes: 16, partitions: 4}",
                                             "quantizer: {type: test_rounding, levels: 5}"))
    return path


def test_protocol_statistics_and_decoding():
    quantizer = build_quantizer({"type": "test_rounding", "levels": 5}, dim=3)
    assert isinstance(quantizer, RoundingQuantizer) and quantizer.type_name == "test_rounding"
    z = torch.tensor([[-9.0, -1.2, 0.4, 2.0]]).view(1, 1, 2, 2).expand(2, 3, 2, 2).contiguous()
    out = quantizer(z)
    assert out.indices.shape == (2, 2, 2, 3)
    assert torch.equal(quantizer.code_counts, torch.tensor([[2, 2, 2, 0, 2]] * 3))
    assert out.utilization.item() == pytest.approx(4 / 5)
    assert out.perplexity.item() == pytest.approx(4.0)
    decoded = quantizer.indices_to_latents(out.indices)
    assert torch.equal(decoded, out.z_q) and decoded.is_contiguous()
    flat = out.indices.reshape(-1)
    assert torch.equal(quantizer.get_codebook_entry(flat, (2, 2, 2, 3)), out.z_q)
    assert quantizer.codewords() is None and quantizer.sub_vectors(z) is None
    quantizer.reset_usage()
    assert int(quantizer.code_counts.sum()) == 0 and quantizer.codebook_utilization() == 0


def test_decoding_checks_indices():
    quantizer = build_quantizer({"type": "test_rounding", "levels": 5}, dim=3)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 5\), got \[0, 5\]"):
        quantizer.indices_to_latents(torch.tensor([0, 5, 1]).view(1, 1, 1, 3))
    with pytest.raises(ValueError, match=r"needs shape=\(B, H, W, C\)"):
        quantizer.get_codebook_entry(torch.zeros(6, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"indices has 6 entries; shape \(1, 2, 2, 3\) with P=3 tokens"):
        quantizer.get_codebook_entry(torch.zeros(6, dtype=torch.int64), (1, 2, 2, 3))


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown quantizer type 'nope'; known types: .*kepler.*test_rounding"):
        build_quantizer({"type": "nope"}, dim=4)
    with pytest.raises(ValueError, match="'test_rounding' is already registered to RoundingQuantizer"):
        register_quantizer("test_rounding")(type("Other", (Quantizer,), {}))
    with pytest.raises(TypeError, match="takes a Quantizer subclass"):
        register_quantizer("plain_module")(torch.nn.Linear)
    assert type(build_quantizer(None, dim=8)) is KeplerQuantizer  # the default type


def test_config_schema_follows_the_quantizer_type(tmp_path):
    cfg = load_config(rounding_config(tmp_path))
    assert dict(cfg.model.quantizer) == {"type": "test_rounding", "levels": 5, "commitment": 0.25}
    with pytest.raises(ValueError, match="unknown config key 'model.quantizer.num_codes'"):
        load_config(rounding_config(tmp_path), ["model.quantizer.num_codes=4"])
    with pytest.raises(ValueError, match="unknown quantizer type 'nope'"):
        load_config(None, ["model.quantizer.type=nope"])
    defaults = load_config(None)
    assert defaults.model.quantizer.type == "kepler" and defaults.model.quantizer.num_codes == 1024
    assert defaults.loss.disc_start == 10000


def test_rounding_quantizer_trains_evaluates_encodes_and_decodes(tmp_path, capsys):
    metrics = train(load_config(rounding_config(tmp_path), [f"run_dir={tmp_path / 'run'}"]))
    assert metrics["step"] == 3 and metrics["codebook_entries"] == 5 and np.isfinite(metrics["psnr"])
    checkpoint = metrics["checkpoint"]

    assert main(["eval", checkpoint, "--data", str(tmp_path / "val_images"), "--out", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    assert "codebook packing: unavailable: the RoundingQuantizer has no explicit codewords" in printed
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())
    counts = np.array(results["resolutions"]["32"]["code_counts"])
    assert counts.shape == (8, 5) and counts.sum() == 3 * 16 * 16 * 8  # 3 images, 16 x 16 latents, P = C = 8

    photo = random_images(tmp_path / "photos", count=1) / "img0.png"
    assert main(["encode", checkpoint, str(photo), "--out", str(tmp_path / "codes")]) == 0
    codes = np.load(tmp_path / "codes" / "img0.npy")
    assert codes.shape == (20, 24, 8) and codes.min() >= 0 and codes.max() < 5
    assert main(["decode", checkpoint, str(tmp_path / "codes" / "img0.npy"), "--out", str(tmp_path / "dec")]) == 0
    assert (tmp_path / "dec" / "img0.png").is_file()


def test_vqmodel_decodes_what_it_encodes_with_any_quantizer():
    torch.manual_seed(0)
    model = VQModel(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=4, resolution=16,
                    norm_groups=4, embed_dim=4, quantizer={"type": "test_rounding", "levels": 7}).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        reconstruction, _, info = model(x)
        assert torch.equal(model.decode_indices(info.indices), reconstruction)


def test_a_study_run_of_the_rounding_quantizer(tmp_path):
    from kepler.metrics import bits_per_position
    from kepler.study.runner import run_one

    job = {"variant": "rounding", "seed": 1, "base": str(rounding_config(tmp_path, steps=2)), "overrides": [],
           "runtime": ["train.progress=false"], "run_dir": str(tmp_path / "study_run")}
    result = run_one(job)
    assert result["layout"]["type"] == "test_rounding" and result["layout"]["partitions"] == 8
    assert result["layout"]["bits"] == bits_per_position(5, 8)
    metrics = result["metrics"]
    assert 0 <= metrics["effective_bits"] <= result["layout"]["bits"] and np.isfinite(metrics["psnr"])
    assert metrics["min_nn"] is None and result["packing_normalized"] is None and result["codewords"] is None
    assert np.array(result["code_counts"]).shape == (8, 5)


# Every registered type with a small configuration for a latent of DIM channels (P tokens, K codes).
DIM = 24
PROTOCOL_CASES = {
    "kepler": ({"type": "kepler", "num_codes": 16, "partitions": 4}, 4, 16),
    "kepler_rotation": ({"type": "kepler", "num_codes": 16, "partitions": 4, "rotation_trick": True}, 4, 16),
    "lattice_e8": ({"type": "lattice", "lattice": "E8", "q": 2}, 3, 256),
    "lattice_d4": ({"type": "lattice", "lattice": "D4", "q": 3, "rotation_trick": True}, 6, 81),
    "lattice_leech": ({"type": "lattice", "lattice": "Leech"}, 1, 196560),
    "fsq": ({"type": "fsq", "levels": [8, 5, 5], "num_codebooks": 2}, 2, 200),
    "lfq": ({"type": "lfq", "codebook_size": 64, "num_codebooks": 2}, 2, 64),
    "residual": ({"type": "residual", "num_quantizers": 3, "num_codes": 16}, 3, 16),
    "residual_kepler_shared": ({"type": "residual", "num_quantizers": 2, "num_codes": 16, "partitions": 4,
                                "shared_stages": True}, 8, 16),
}


def test_the_protocol_cases_cover_every_registered_quantizer():
    from kepler.nn import QUANTIZERS

    kepler_types = {name for name, cls in QUANTIZERS.items() if cls.__module__.startswith("kepler.")}
    assert {config["type"] for config, _, _ in PROTOCOL_CASES.values()} == kepler_types


@pytest.mark.parametrize("case", sorted(PROTOCOL_CASES))
def test_every_quantizer_type_follows_the_protocol(case):
    config, tokens, codes = PROTOCOL_CASES[case]
    torch.manual_seed(0)
    quantizer = build_quantizer(config, dim=DIM).train()
    assert quantizer.type_name == config["type"] and quantizer.dim == DIM
    assert quantizer.tokens_per_position == tokens and quantizer.codebook_size == codes
    z = torch.randn(2, DIM, 3, 5, requires_grad=True)
    out = quantizer(z)
    assert isinstance(out, QuantizerOutput) and isinstance(out.info, QuantizerInfo)
    z_q, loss, (perplexity, min_encodings, indices, utilization) = out
    assert z_q.shape == z.shape and z_q.dtype == z.dtype and z_q.is_contiguous()
    assert loss.dim() == 0 and torch.isfinite(loss) and min_encodings is None
    assert indices.shape == (2, 3, 5, tokens) and indices.dtype == torch.int64
    assert 0 <= int(indices.min()) and int(indices.max()) < codes
    assert perplexity.shape == (() if quantizer.shared_codebook else (tokens,))
    assert utilization.dim() == 0 and 0 < utilization.item() <= 1
    assert quantizer.code_counts.shape == (tokens, codes) and int(quantizer.code_counts.sum()) == indices.numel()
    # Decoding the indices gives the forward's z_q exactly, in both spellings.
    with torch.no_grad():
        assert torch.equal(quantizer.indices_to_latents(indices).to(z.dtype), z_q)
        flat = quantizer.get_codebook_entry(indices.reshape(-1), (2, 3, 5, DIM))
        assert torch.equal(flat.to(z.dtype), z_q)
    # The gradient reaches the latents.
    (grad,) = torch.autograd.grad((z_q * torch.randn_like(z_q)).sum() + loss, z)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    codewords, vectors = quantizer.codewords(), quantizer.sub_vectors(z.detach())
    assert (codewords is None) == (vectors is None)
    if codewords is not None:
        assert codewords.shape[1:] == (codes, vectors.shape[-1]) and codewords.shape[0] == vectors.shape[0]
    quantizer.reset_usage()
    assert int(quantizer.code_counts.sum()) == 0


@pytest.mark.parametrize("case", ["lattice_e8", "lattice_leech", "fsq", "lfq", "residual"])
def test_new_quantizer_types_train_through_the_cli(tmp_path, case):
    config, tokens, codes = PROTOCOL_CASES[case]
    path = tiny_config(tmp_path, steps=2, disc_start=2)
    section = ", ".join(f"{key}: {json.dumps(value)}" for key, value in config.items())
    path.write_text(path.read_text().replace("quantizer: {num_codes: 16, partitions: 4}", f"quantizer: {{{section}}}")
                    .replace("embed_dim: 8", f"embed_dim: {DIM}"))
    run = tmp_path / "run"
    assert main(["train", str(path), f"run_dir={run}"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 2 and np.isfinite(metrics["psnr"])
    assert metrics["codebook_entries"] == codes * (1 if build_quantizer(config, dim=DIM).shared_codebook else tokens)
    # The checkpoint loads (built on the meta device first) and evaluates.
    out = tmp_path / "eval"
    assert main(["eval", metrics["checkpoint"], "--data", str(tmp_path / "val_images"), "--out", str(out)]) == 0
    counts = np.array(json.loads((out / "eval.json").read_text())["resolutions"]["32"]["code_counts"])
    assert counts.shape == (tokens, codes) and counts.sum() == 3 * 16 * 16 * tokens


@pytest.mark.parametrize("case", sorted(PROTOCOL_CASES))
def test_every_quantizer_type_builds_on_the_meta_device(case):
    # How a checkpoint's config is checked before its weights are loaded (kepler.train.evaluate.load_model).
    config = PROTOCOL_CASES[case][0]
    with torch.device("meta"):
        quantizer = build_quantizer(config, dim=DIM)
    real = build_quantizer(config, dim=DIM)
    assert {k: v.shape for k, v in quantizer.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}


@pytest.mark.parametrize(
    "config, error, match",
    [
        ({"type": "fsq", "levels": [8, 2]}, ValueError, r"levels must be a non-empty list of ints >= 3, got \[8, 2\]"),
        ({"type": "fsq", "levels": []}, ValueError, r"levels must be a non-empty list of ints >= 3, got \[\]"),
        ({"type": "fsq", "num_codebooks": 0}, ValueError, "num_codebooks must be >= 1, got 0"),
        ({"type": "lfq", "codebook_size": 48}, ValueError, "codebook_size must be a power of two, got 48"),
        ({"type": "lfq", "entropy_loss_weight": -1.0}, ValueError, "entropy_loss_weight must be >= 0.0, got -1.0"),
        ({"type": "lfq", "frac_per_sample_entropy": 0.0}, ValueError, "frac_per_sample_entropy must be > 0.0, got 0.0"),
        ({"type": "lfq", "frac_per_sample_entropy": 1.5}, ValueError, "frac_per_sample_entropy must be <= 1.0, got 1.5"),
        ({"type": "lfq", "entropy": "exact"}, ValueError, "entropy must be 'library' or 'kepler', got 'exact'"),
        ({"type": "lfq", "entropy": "kepler", "frac_per_sample_entropy": 0.5}, ValueError,
         "entropy='kepler' is exact over every position: frac_per_sample_entropy must be 1.0, got 0.5"),
    ],
)
def test_adapter_arguments_are_checked(config, error, match):
    with pytest.raises(error, match=match):
        build_quantizer(config, dim=DIM)


def test_lfq_entropy_fraction_reaches_the_library():
    """A fraction below 1 makes the library estimate its entropy loss from a random subset of the
    positions: the loss then differs from the all-positions one for the same weights and input."""
    z = torch.randn(2, DIM, 4, 4)
    losses = {}
    for fraction in (1.0, 0.25):
        torch.manual_seed(0)
        quantizer = build_quantizer({"type": "lfq", "codebook_size": 64, "frac_per_sample_entropy": fraction}, dim=DIM)
        assert quantizer.library.frac_per_sample_entropy == fraction
        losses[fraction] = quantizer.train()(z).loss
    assert torch.isfinite(losses[0.25])
    assert not torch.allclose(losses[1.0], losses[0.25])


@pytest.mark.parametrize("dim, codebook_size, num_codebooks, commitment", [
    (DIM, 64, 1, 0.0),  # a projection in and out (DIM != 6 bits)
    (12, 64, 2, 0.25),  # no projection, two codebooks, a commitment loss
])
def test_lfq_kepler_entropy_is_the_librarys_loss(dim, codebook_size, num_codebooks, commitment):
    """entropy='kepler' computes the library's exact training loss (entropy and commitment) with the
    code-entropy op: the same loss, indices, z_q and gradients (to z and the projections), and both
    entropies in loss_terms; eval mode is the library's (loss 0)."""
    options = {"type": "lfq", "codebook_size": codebook_size, "num_codebooks": num_codebooks,
               "commitment_loss_weight": commitment}
    library = build_quantizer(options, dim=dim)
    ours = build_quantizer({**options, "entropy": "kepler"}, dim=dim)
    ours.load_state_dict(library.state_dict())
    assert library.loss_term_names() == () and ours.loss_term_names() == ("entropy_per_sample", "entropy_batch")
    z = torch.randn(2, dim, 5, 3)
    results = []
    for quantizer in (library, ours):
        leaf = z.clone().requires_grad_(True)
        out = quantizer.train()(leaf)
        (out.loss + out.z_q.square().sum()).backward()
        results.append((out, leaf.grad, [p.grad for p in quantizer.parameters()]))
    (lib_out, lib_grad, lib_param_grads), (our_out, our_grad, our_param_grads) = results
    torch.testing.assert_close(our_out.loss, lib_out.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(our_out.indices, lib_out.indices) and torch.equal(our_out.z_q, lib_out.z_q)
    torch.testing.assert_close(our_grad, lib_grad, rtol=1e-4, atol=1e-4)
    for ours_grad, lib_param_grad in zip(our_param_grads, lib_param_grads):
        torch.testing.assert_close(ours_grad, lib_param_grad, rtol=1e-4, atol=1e-4)
    assert set(ours.loss_terms) == {"entropy_per_sample", "entropy_batch"}
    fresh = build_quantizer({**options, "entropy": "kepler"}, dim=dim)
    fresh.load_state_dict(library.state_dict())
    assert fresh.eval()(z).loss.item() == 0.0  # eval mode: the library's 0 loss...
    torch.testing.assert_close(fresh.loss_terms, ours.loss_terms)  # ...and the entropies of this batch


@pytest.mark.parametrize("config, message", [
    ({"type": "fsq", "levels": [1024, 1024, 1024]}, "FSQQuantizer would have 1073741824 codes per token"),
    ({"type": "fsq", "levels": [65536] * 4}, "FSQQuantizer would have 18446744073709551616 codes per token"),
    ({"type": "lfq", "codebook_size": 2**32}, "LFQQuantizer would have 4294967296 codes per token"),
    ({"type": "kepler", "num_codes": 10**12}, r"num_codes=1000000000000 x scale=1.0 gives 1000000000000 codes; at most 1048576"),
    ({"type": "lattice", "lattice": "E8", "q": 8}, "LatticeQuantizer would have 16777216 codes per token"),
])
def test_a_codebook_too_large_to_count_is_refused_before_it_is_allocated(config, message):
    """FSQ levels [1024] * 3 allocated 8 GB and [65536] * 4 overflowed in C++; every type now refuses
    more than 2**20 codes a token in its constructor, before the library or the codebook is built."""
    with pytest.raises(ValueError, match=re.escape(message)):
        build_quantizer(config, dim=DIM if config["type"] != "lattice" else 8)
    with pytest.raises(ValueError, match=r"would count 64 tokens x 1048576 codes; at most 16777216 \(2\*\*24\)"):
        build_quantizer({"type": "kepler", "num_codes": 2**20, "partitions": 64}, dim=64)


@settings(max_examples=60)  # fixed seed, no database (the "kepler" profile, conftest.py)
@given(kind=st.sampled_from(["fsq", "lfq", "kepler"]), sizes=st.lists(st.integers(1, 2**40), min_size=1, max_size=4))
def test_any_codebook_size_builds_within_the_bound_or_is_one_line(kind, sizes):
    """Whatever size a config asks for, the quantizer is built (small enough to count) or refused with
    one line; the bound is what decides."""
    config = {"fsq": {"type": "fsq", "levels": sizes}, "lfq": {"type": "lfq", "codebook_size": sizes[0]},
              "kepler": {"type": "kepler", "num_codes": sizes[0], "partitions": 1}}[kind]
    try:
        with torch.device("meta"):  # what fits is not allocated for real here either
            quantizer = build_quantizer(config, dim=8)
    except ValueError as exc:
        assert "\n" not in str(exc)
        return
    assert quantizer.codebook_size <= 2**20
