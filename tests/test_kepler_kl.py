"""kepler_kl: every backend against the float64 reference, the released formula, edge rows, errors.

Tolerance rule (section "Tests" of docs/DESIGN.md): a backend's error against the float64 oracle
may be at most twice the error of the plain-PyTorch reference run at the input's precision, plus a
floor of 1e-6 relative (the fp32 rounding of the loss itself), plus on a GPU the bound of the
approximate exp2/log2 that the kernels use there (:func:`_gpu_approx_fn_bound`; the interpreter and
the CPU use exact ones).
"""

import math

import pytest
import torch
from conftest import GPU_APPROX_FN_REL_ERROR, device_backend_params, property_examples
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import value_specs

from kepler import _ext
from kepler.kernels._common import triton_interpreter_on
from kepler.losses import kepler_kl, official_grid_prior
from kepler.ops._common import registered_op
from kepler.ops.kepler_kl import KeplerKLFunction, kepler_kl_prior_logq
from kepler.reference.kepler_kl import kepler_kl_ref, kepler_kl_rows_ref, standardize_rows

DEVICE_BACKENDS = device_backend_params()


def _loss_and_grad(x, prior, backend, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    loss = kepler_kl(x, prior, backend=backend, **kwargs)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def _gpu_approx_fn_bound(x, prior, mode="official", eps=0.0) -> float:
    """Extra error of the loss from approximate exp2/log2 (relative error d = 2**-22 each, see
    conftest) in a GPU kernel; 0 off the GPU.

    Per row the kernel forms p_i = exp(s_i - lse) (an exp, and lse from a sum of exps and a log: p_i
    relative error <= 3d) and the term p_i * log(p_i / q_i + eps) (one more log: absolute error
    <= d). So a row's error is at most 3d * sum_i p_i |log(p_i/q_i + eps)| + d * sum_i p_i, and the
    loss, a mean over rows, at most d * mean_rows(3 * A_row + 1), A_row from the float64 reference.
    Twice that is allowed. The gradient needs no extra term: its 1e-6 relative floor is 4.2 d.
    """
    if x.device.type != "cuda":
        return 0.0
    log_p = torch.log_softmax(standardize_rows(x.double(), mode), dim=-1)
    log_q = torch.log_softmax(standardize_rows(prior.double(), mode), dim=-1)
    terms = log_p.exp() * torch.log(torch.exp(log_p - log_q) + eps).abs()
    return 2 * GPU_APPROX_FN_REL_ERROR * (3 * terms.sum(-1) + 1).mean().item()


def _gradient_terms_scale(x, prior, mode="official", eps=0.0) -> float:
    """Size of the terms the gradient is a difference of: max over rows of
    sum_i p_i |dL/dp_i| / scale / B (scale: the row's variance or std). Where the gradient cancels
    to ~0 (p = q at eps = 0, a minimum) its float32 rounding is relative to this, not to itself."""
    x64 = x.double()
    variance = x64.var(dim=-1, keepdim=True) if x.shape[1] > 1 else torch.ones_like(x64[:, :1])
    scale = variance if mode == "official" else variance.sqrt()
    log_p = torch.log_softmax(standardize_rows(x64, mode), dim=-1)
    log_q = torch.log_softmax(standardize_rows(prior.double(), mode), dim=-1)
    ratio = torch.exp(log_p - log_q)
    dloss_dp = torch.log(ratio + eps) + ratio / (ratio + eps)
    terms = (log_p.exp() * dloss_dp.abs()).sum(dim=-1, keepdim=True) / scale / x.shape[0]
    terms = terms[torch.isfinite(terms)]
    return terms.max().item() if terms.numel() else 0.0


def _check_against_oracle(x, prior, backend, **kwargs):
    """Backend vs float64 reference, with the fp-`x.dtype` reference as the yardstick."""
    loss, grad = _loss_and_grad(x, prior, backend, **kwargs)
    oracle_loss, oracle_grad = _loss_and_grad(x.double(), prior.double(), "reference", **kwargs)
    yard_loss, yard_grad = _loss_and_grad(x, prior, "reference", **kwargs)
    assert loss.dtype == torch.float32 and grad.dtype == x.dtype and grad.shape == x.shape

    loss_err = (loss.double() - oracle_loss).abs().item()
    loss_allowed = 2 * (yard_loss.double() - oracle_loss).abs().item() + 1e-6 * max(1.0, oracle_loss.abs().item())
    if backend != "reference":
        loss_allowed += _gpu_approx_fn_bound(x, prior, **kwargs)
    assert loss_err <= loss_allowed, f"loss {loss.item()} vs {oracle_loss.item()}: err {loss_err} > {loss_allowed}"

    grad_err = (grad.double() - oracle_grad).abs().max().item()
    grad_scale = oracle_grad.abs().max().item()
    yard_err = (yard_grad.double() - oracle_grad).abs().max().item()
    if backend == "triton" and triton_interpreter_on() and x.dtype == torch.bfloat16:
        # The Triton interpreter casts fp32 -> bf16 by truncation (GPUs round to nearest even, as
        # torch does): the yardstick is then the oracle truncated to bf16.
        truncated = (oracle_grad.float().view(torch.int32) & ~0xFFFF).view(torch.float32)
        yard_err = max(yard_err, (truncated.double() - oracle_grad).abs().max().item())
    # Gradients below fp32's normal range (~1e-38, official mode at |x| ~ 1e19) are formed from
    # intermediates that underflow: a few times the smallest normal number is their floor.
    grad_allowed = 2 * yard_err + 1e-6 * max(grad_scale, _gradient_terms_scale(x, prior, **kwargs)) + 8 * 2.0**-126
    assert grad_err <= grad_allowed, f"grad err {grad_err} > {grad_allowed} (max |grad| {grad_scale})"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("mode", ["official", "std"])
@pytest.mark.parametrize("eps", [0.0, 1e-5])
@pytest.mark.parametrize("shape", [(3, 1), (64, 257), (2, 4099), (1, 65536)], ids=str)
def test_matches_float64_reference(device, backend, mode, eps, shape, poisoned_empty):
    x = (torch.randn(shape) * 0.7 + 0.2).to(device)
    prior = torch.rand(shape[1]).to(device)
    _check_against_oracle(x, prior, backend, mode=mode, eps=eps)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["official", "std"])
def test_low_precision_inputs(device, backend, dtype, mode, poisoned_empty):
    x = (torch.randn(5, 1031) * 2 - 0.5).to(device=device, dtype=dtype)
    prior = torch.rand(1031, device=device)
    _check_against_oracle(x, prior, backend, mode=mode)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("mode", ["official", "std"])
def test_per_row_prior(device, backend, mode):
    x = torch.randn(4, 263, device=device)
    prior = torch.rand(4, 263, device=device) * torch.arange(1, 5, device=device)[:, None]
    _check_against_oracle(x, prior, backend, mode=mode)
    # a (B, M) prior with identical rows is the same as the shared (M,) prior
    shared, _ = _loss_and_grad(x, prior[0], backend, mode=mode)
    repeated, _ = _loss_and_grad(x, prior[0].expand(4, -1), backend, mode=mode)
    torch.testing.assert_close(shared, repeated)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_non_contiguous_and_offset_inputs(device, backend):
    big = torch.randn(7, 2 * 301 + 5, device=device)
    prior = torch.rand(301, device=device)
    strided = big[1:6, 3 : 3 + 2 * 301 : 2]  # column stride 2, storage offset
    offset = big[2:, 4 : 4 + 301]  # row stride != M, storage offset
    transposed = torch.randn(301, 3, device=device).t()  # column stride 3, row stride 1
    for x in (strided, offset, transposed):
        _check_against_oracle(x, prior, backend)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("mode", ["official", "std"])
@pytest.mark.parametrize("scale", [1e-12, 1e-10, 1e-9, 1e-8, 1e-7, 1e-5, 1e-3, 1e-1, 1.0, 10.0, 1e3], ids=str)
def test_scale_sweep(device, backend, mode, scale):
    """Official mode divides by the variance: s grows as 1/scale and the softmax saturates. The
    loss must saturate with it (it exploded to inf through s - logsumexp(s) at |s| ~ 1e10)."""
    prior = torch.rand(257, device=device)
    for shape in ((4, 10), (3, 257)):
        x = torch.randn(shape, device=device) * scale
        _check_against_oracle(x, prior[: shape[1]], backend, mode=mode)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("mode", ["official", "std"])
def test_long_row_2_pow_20(backend, mode):
    # One row of 2**20 elements: B=1 splits the row across threads on the CPU backend.
    if backend not in kepler_available():
        pytest.skip(f"backend {backend} unavailable here")
    if backend == "triton" and triton_interpreter_on() and mode == "std":
        pytest.skip("the Triton interpreter takes ~20 s per 2**20-element row (measured); official covers the loop")
    x = torch.randn(1, 2**20) * 3 + 1
    prior = torch.rand(2**20)
    _check_against_oracle(x, prior, backend, mode=mode)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("mode", ["official", "std"])
@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_degenerate_rows(device, backend, mode, eps):
    """M == 1 and constant rows standardize to 0: uniform p, loss from the formula, zero grad."""
    num_cols = 129
    prior = torch.rand(num_cols, device=device)
    x = torch.randn(3, num_cols, device=device)
    x[0] = 0.1  # constant row (its rounded mean makes tiny nonzero deviations in float64)
    x[2] = -7.0
    loss, grad = _loss_and_grad(x, prior, backend, mode=mode, eps=eps)
    log_q = torch.log_softmax(standardize_rows(prior.double(), mode), dim=-1)
    uniform = math.log(1.0 / num_cols)
    constant_row_loss = (math.exp(uniform) * torch.log(torch.exp(uniform - log_q) + eps)).sum()
    oracle, _ = _loss_and_grad(x[1:2].double(), prior.double(), "reference", mode=mode, eps=eps)
    expected = (2 * constant_row_loss + oracle) / 3
    gpu_bound = _gpu_approx_fn_bound(x, prior, mode, eps) if backend != "reference" else 0.0
    torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=1e-7 + gpu_bound)
    assert torch.all(grad[0] == 0) and torch.all(grad[2] == 0)
    assert grad[1].abs().max() > 0

    single, single_grad = _loss_and_grad(torch.randn(4, 1, device=device), torch.rand(1, device=device), backend,
                                         mode=mode, eps=eps)
    # log(1 + eps): fp32 rounds 1 + eps by up to 2**-24 (the reference's own error)
    torch.testing.assert_close(single.double(), torch.tensor(math.log1p(eps), dtype=torch.float64), rtol=1e-6,
                               atol=2**-23)
    assert torch.all(single_grad == 0)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("num_cols", [300, 1])
def test_nan_propagates(device, backend, num_cols):
    """A NaN makes the loss NaN and its row's gradient NaN, as in the reference. M == 1 included: a
    one-element NaN row is not a degenerate row (its variance is NaN, not 0)."""
    x = torch.randn(2, num_cols, device=device)
    x[1, num_cols // 2] = float("nan")
    prior = torch.rand(num_cols, device=device)
    loss, grad = _loss_and_grad(x, prior, backend)
    expected_loss, expected_grad = _loss_and_grad(x.double(), prior.double(), "reference")
    assert torch.isnan(expected_loss) and expected_grad[1].isnan().all() and expected_grad[0].isfinite().all()
    assert torch.isnan(loss)
    assert torch.equal(grad.isnan().cpu(), expected_grad.isnan().cpu()), f"grad {grad}"
    if backend != "reference":
        # The backward gives rows with scale 0 (degenerate) a zero gradient by rule; a NaN row's
        # scale must stay NaN so that it never takes that branch.
        _, stats = registered_op("kepler_kl", backend)(x, kepler_kl_prior_logq(prior), False, 1e-5)
        assert stats[1, 1].isnan() and stats[0, 1].isfinite(), f"stats {stats}"


def _released_kepler_kl(z: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Transcription of the released KeplerLoss.forward + kl_divergence (without kl_weight)."""
    p = z.reshape(z.shape[0], -1)
    p = (p - p.mean(dim=1, keepdim=True)) / p.var(dim=1, keepdim=True)
    p = torch.softmax(p, dim=1)
    q = prior.reshape(1, -1).repeat(p.shape[0], 1)
    q = (q - q.mean(dim=1, keepdim=True)) / q.var(dim=1, keepdim=True)
    q = torch.softmax(q[:, : p.shape[1]], dim=1)
    return torch.sum(p * torch.log(p / q + 1e-5), dim=1).mean()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_released_formula_with_hypercube_prior(device, backend):
    """1024-code hypercube prior (dim 64) vs a 2 x 16x16x256 latent: value and grad to 1e-6 (plus,
    for the value on a GPU, the bound of approximate exp2/log2)."""
    prior = official_grid_prior(1024, dim=64, seed=0).to(device)
    z = torch.randn(2, 16, 16, 256, device=device)
    z64 = z.double().requires_grad_(True)
    expected = _released_kepler_kl(z64, prior.double())
    (expected_grad,) = torch.autograd.grad(expected, z64)
    # The fp32 reference is itself ~2e-5 off here; the float64 reference must match exactly.
    x = z.reshape(2, -1) if backend != "reference" else z.reshape(2, -1).double()
    loss, grad = _loss_and_grad(x, prior.reshape(-1), backend, mode="official", eps=1e-5)
    expected_grad = expected_grad.reshape(2, -1)
    gpu_bound = _gpu_approx_fn_bound(x, prior.reshape(-1), "official", 1e-5) if backend != "reference" else 0.0
    assert abs(loss.item() - expected.item()) <= 1e-6 * abs(expected.item()) + gpu_bound
    grad_err = (grad.double() - expected_grad).norm() / expected_grad.norm()
    assert grad_err <= 1e-6, f"relative grad error {grad_err.item()}"


def test_prior_logq_is_cacheable():
    x = torch.randn(3, 200)
    prior = torch.rand(200)
    for mode in ("official", "std"):
        prior_logq = kepler_kl_prior_logq(prior, mode)
        assert prior_logq.shape == (1, 200) and prior_logq.dtype == torch.float32
        for backend in ("reference", "cpu") if _ext.HAS_CPU_EXT else ("reference",):
            direct = kepler_kl(x, prior, mode=mode, backend=backend)
            cached = kepler_kl(x, prior_logq=prior_logq, mode=mode, backend=backend)
            torch.testing.assert_close(direct, cached)


def test_float64_input_goes_to_reference_under_auto():
    x = torch.randn(2, 50, dtype=torch.float64)
    prior = torch.rand(50, dtype=torch.float64)
    assert kepler_kl(x, prior).dtype == torch.float64
    torch.testing.assert_close(kepler_kl(x, prior), kepler_kl_ref(x, prior))


def test_gradcheck_reference_float64():
    for mode in ("official", "std"):
        for eps in (0.0, 1e-5, 0.3):
            x = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
            prior = torch.rand(11, dtype=torch.float64)
            assert torch.autograd.gradcheck(lambda t: kepler_kl(t, prior, mode=mode, eps=eps, backend="reference"), (x,))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_function_backward_matches_reference_autograd(backend):
    """KeplerKLFunction's analytic backward vs autograd of the float64 reference, non-uniform grad_loss."""
    if backend not in kepler_available():
        pytest.skip(f"backend {backend} unavailable here")
    x = torch.randn(4, 97)
    prior_logq = kepler_kl_prior_logq(torch.rand(97), "std")
    grad_loss = torch.tensor([1.0, -2.0, 0.5, 3.0])
    x_leaf = x.clone().requires_grad_(True)
    (KeplerKLFunction.apply(x_leaf, prior_logq, True, 1e-3, backend) * grad_loss).sum().backward()
    x64 = x.double().requires_grad_(True)
    (kepler_kl_rows_ref(x64, prior_logq.double(), "std", 1e-3) * grad_loss.double()).sum().backward()
    torch.testing.assert_close(x_leaf.grad.double(), x64.grad, rtol=0, atol=2e-6 * x64.grad.abs().max().item())


def kepler_available():
    import kepler

    return kepler.available_backends("cpu")


def _op_samples():
    x = torch.randn(3, 37)
    logq = kepler_kl_prior_logq(torch.rand(37))
    stats_args = [(x, logq, False, 1e-5), (x.bfloat16(), logq, True, 0.0), (x[:, ::2], logq[:, :19], False, 0.1)]
    return stats_args


@pytest.mark.parametrize("op_name", ["kepler_kl", "kepler_kl_triton"])
def test_opcheck(op_name):
    if op_name == "kepler_kl" and not _ext.HAS_CPU_EXT:
        pytest.skip("kepler._C is not built")
    if op_name == "kepler_kl_triton" and "triton" not in kepler_available():
        pytest.skip("triton backend unavailable on CPU tensors here")
    forward = getattr(torch.ops.kepler, op_name)
    backward = getattr(torch.ops.kepler, op_name.replace("kepler_kl", "kepler_kl_backward"))
    for args in _op_samples():
        torch.library.opcheck(forward, args)
        _, stats = forward(*args)
        grad_loss = torch.randn(args[0].shape[0])
        torch.library.opcheck(backward, (grad_loss, args[0], args[1], stats, args[2], args[3]))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_ops_with_no_rows(backend):
    if backend not in kepler_available():
        pytest.skip(f"backend {backend} unavailable here")
    forward = torch.ops.kepler.kepler_kl if backend == "cpu" else torch.ops.kepler.kepler_kl_triton
    backward = torch.ops.kepler.kepler_kl_backward if backend == "cpu" else torch.ops.kepler.kepler_kl_backward_triton
    x = torch.randn(0, 9)
    logq = kepler_kl_prior_logq(torch.rand(9))
    loss, stats = forward(x, logq, False, 1e-5)
    assert loss.shape == (0,) and stats.shape == (0, 3)
    assert backward(torch.randn(0), x, logq, stats, False, 1e-5).shape == (0, 9)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_compiles_without_graph_breaks(device, backend):
    prior = torch.rand(131, device=device)

    def loss_fn(x):
        return kepler_kl(x, prior, mode="std", backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    x = torch.randn(4, 131, device=device, requires_grad=True)
    loss = compiled(x)
    (grad,) = torch.autograd.grad(loss, x)
    expected, expected_grad = _loss_and_grad(x, prior, backend, mode="std")
    torch.testing.assert_close(loss.detach(), expected)
    torch.testing.assert_close(grad, expected_grad)


def test_errors():
    x = torch.randn(2, 5)
    prior = torch.rand(5)
    with pytest.raises(ValueError, match=r"x must be a 2-D tensor \(B, M\)"):
        kepler_kl(torch.randn(5), prior)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        kepler_kl([[1.0] * 5], prior)
    with pytest.raises(TypeError, match="x must be float32, bfloat16, float16 or float64, got torch.int64"):
        kepler_kl(torch.ones(2, 5, dtype=torch.int64), prior)
    with pytest.raises(ValueError, match=r"x has no rows \(B == 0\)"):
        kepler_kl(torch.randn(0, 5), prior)
    with pytest.raises(ValueError, match=r"x has no columns \(M == 0\)"):
        kepler_kl(torch.randn(2, 0), torch.rand(0))
    with pytest.raises(ValueError, match=r"prior must have shape \(5,\), \(1, 5\) or \(2, 5\)"):
        kepler_kl(x, torch.rand(6))
    with pytest.raises(TypeError, match="prior must be float32, bfloat16, float16 or float64, got torch.int32"):
        kepler_kl(x, torch.ones(5, dtype=torch.int32))
    with pytest.raises(ValueError, match="mode must be one of"):
        kepler_kl(x, prior, mode="variance")
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        kepler_kl(x, prior, eps=-1e-5)
    with pytest.raises(ValueError, match="pass exactly one of prior and prior_logq"):
        kepler_kl(x, prior, prior_logq=kepler_kl_prior_logq(prior))
    with pytest.raises(ValueError, match="pass exactly one of prior and prior_logq"):
        kepler_kl(x)
    with pytest.raises(TypeError, match="prior_logq must be float32"):
        kepler_kl(x, prior_logq=kepler_kl_prior_logq(prior).double())
    with pytest.raises(ValueError, match="unknown backend argument 'fast'"):
        kepler_kl(x, prior, backend="fast")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        kepler_kl(x, prior, backend="cuda")
    if _ext.HAS_CPU_EXT:
        with pytest.raises(TypeError, match="backend 'cpu' cannot run kepler_kl on torch.float64 inputs: it takes float32, bfloat16 or float16"):
            kepler_kl(x.double(), prior, backend="cpu")
        with pytest.raises(RuntimeError, match=r"kepler_kl: prior_logq must be \(1, M\) or \(B, M\)"):
            torch.ops.kepler.kepler_kl(x, torch.zeros(1, 4), False, 0.0)
        with pytest.raises(RuntimeError, match="kepler_kl: x must be float32, bfloat16 or float16"):
            torch.ops.kepler.kepler_kl(x.double(), torch.zeros(1, 5), False, 0.0)
        with pytest.raises(RuntimeError, match="kepler_kl: eps must be >= 0"):
            torch.ops.kepler.kepler_kl(x, torch.zeros(1, 5), False, -1.0)
    if "triton" in kepler_available():
        from kepler.kernels.kepler_kl import kepler_kl_triton

        with pytest.raises(ValueError, match=r"kepler_kl_triton: prior_logq must be \(1, M\) or \(B, M\)"):
            kepler_kl_triton(x, torch.zeros(1, 4), False, 0.0)
        with pytest.raises(TypeError, match="kepler_kl_triton: x must be float32, bfloat16 or float16"):
            kepler_kl_triton(x.double(), torch.zeros(1, 5), False, 0.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        kepler_kl_prior_logq(prior, "var")


# ---------------------------------------------------------------------------------------------
# Properties (Hypothesis): random shapes, dtypes, layouts, magnitudes 1e-20..1e19, NaN/inf,
# constant rows
# ---------------------------------------------------------------------------------------------


@st.composite
def kl_cases(draw):
    """(x (B, M), prior (M,) or (B, M), mode, eps); some rows made constant (degenerate)."""
    rows, cols = draw(st.integers(1, 5)), draw(st.integers(1, 300))
    x_spec = draw(value_specs())
    x = x_spec.build((rows, cols))
    if draw(st.booleans()):
        x[0] = x[0, 0]  # a constant row (NaN/inf ones included)
    per_row = draw(st.booleans())
    prior = value_specs(dtypes=(torch.float32,), non_finite=False, kinds=("gaussian",))
    prior = draw(prior.filter(lambda spec: abs(spec.exponent) <= 20)).build((rows, cols) if per_row else (cols,))
    return x, prior, draw(st.sampled_from(["official", "std"])), draw(st.sampled_from([0.0, 1e-5, 0.3]))


# NaN/inf inputs make numpy (the Triton interpreter) warn; those warnings are expected here.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_random_inputs_match_the_float64_reference(device, backend, poisoned_empty):
    @settings(max_examples=property_examples(device, backend))
    @given(case=kl_cases())
    def check(case):
        x, prior, mode, eps = case
        x, prior = x.to(device), prior.to(device)
        if torch.isfinite(x).all():
            _check_against_oracle(x, prior, backend, mode=mode, eps=eps)
        else:  # a row holding NaN or inf (even a constant one) makes the loss NaN
            loss = kepler_kl(x, prior, mode=mode, eps=eps, backend=backend)
            assert loss.isnan(), f"loss {loss.item()} for x holding NaN/inf"

    check()
