"""The rotation trick's gradient against an autograd reference that builds the rotation as a matrix."""

import pytest
import torch

from kepler.nn.rotation_trick import rotation_trick


def reference(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``sg(lambda R) e`` with ``R`` built explicitly as a (d, d) matrix per row, float64."""
    d = e.shape[-1]
    with torch.no_grad():
        e_hat = e / e.norm(dim=-1, keepdim=True)
        q_hat = q / q.norm(dim=-1, keepdim=True)
        r = (e_hat + q_hat) / (e_hat + q_hat).norm(dim=-1, keepdim=True)
        eye = torch.eye(d, dtype=e.dtype)
        rotation = eye - 2 * r[:, :, None] * r[:, None, :] + 2 * q_hat[:, :, None] * e_hat[:, None, :]
        scaled = rotation * (q.norm(dim=-1) / e.norm(dim=-1))[:, None, None]
    return (scaled @ e.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("d", [2, 3, 8, 24])
def test_gradient_matches_the_explicit_rotation(d):
    generator = torch.Generator().manual_seed(d)
    e = torch.randn(64, d, generator=generator, dtype=torch.float64, requires_grad=True)
    q = torch.randn(64, d, generator=generator, dtype=torch.float64) * 3
    g = torch.randn(64, d, generator=generator, dtype=torch.float64)
    out = rotation_trick(e, q)
    assert torch.equal(out, q)  # the value is the codeword itself
    (grad,) = torch.autograd.grad(out, e, g)
    e_ref = e.detach().clone().requires_grad_(True)
    expected_out = reference(e_ref, q)
    torch.testing.assert_close(expected_out, q)  # the reference does map e onto q
    (expected,) = torch.autograd.grad(expected_out, e_ref, g)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(grad, g)  # not the straight-through gradient


def test_float32_leading_dimensions_and_degenerate_rows():
    e = torch.randn(2, 5, 4, requires_grad=True)
    q = torch.randn(2, 5, 4)
    q[0, 0] = 0.0  # the zero codeword: no direction, the gradient passes unchanged
    with torch.no_grad():
        e[0, 1] = 0.0
        q[1, 0] = -2 * e[1, 0]  # opposite directions
    g = torch.randn(2, 5, 4)
    (grad,) = torch.autograd.grad(rotation_trick(e, q), e, g)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
    assert torch.equal(grad[0, 0], g[0, 0]) and torch.equal(grad[0, 1], g[0, 1])
    flat = (slice(None), slice(2, None))
    e64 = e.detach()[flat].reshape(-1, 4).double().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference(e64, q[flat].reshape(-1, 4).double()), e64, g[flat].reshape(-1, 4).double())
    torch.testing.assert_close(grad[flat].reshape(-1, 4).double(), expected, rtol=1e-5, atol=1e-5)
    # Opposite directions: the gradient is still lambda R^T g with R mapping e_hat to q_hat.
    e_hat = e.detach()[1, 0] / e.detach()[1, 0].norm()
    assert torch.allclose(grad[1, 0], 2 * (g[1, 0] + 2 * e_hat * (-e_hat * g[1, 0]).sum()), atol=1e-5)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"e and q must have the same shape, got \(3, 4\) and \(3, 2\)"):
        rotation_trick(torch.zeros(3, 4), torch.zeros(3, 2))


@pytest.mark.parametrize("partition", ["group", "custom"])
def test_kepler_quantizer_rotates_each_sub_vector_gradient(partition):
    from kepler.nn import KeplerQuantizer

    torch.manual_seed(0)
    plain = KeplerQuantizer(num_codes=16, dim=8, partitions=2, partition=partition, backend="reference")
    rotating = KeplerQuantizer(num_codes=16, dim=8, partitions=2, partition=partition, backend="reference",
                               rotation_trick=True)
    rotating.load_state_dict(plain.state_dict())
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    g = torch.randn(2, 8, 3, 3)
    out_plain, out_rotating = plain(z), rotating(z)
    assert torch.equal(out_plain.z_q, out_rotating.z_q) and out_rotating.z_q.is_contiguous()
    (grad,) = torch.autograd.grad(out_rotating.z_q, z, g)
    # The reference on the sub-vectors as the partition cuts them.
    parts = plain.partition.partition(z.detach()).reshape(-1, 4).double().requires_grad_(True)
    codes = plain.partition.partition(out_plain.z_q.detach()).reshape(-1, 4).double()
    g_parts = plain.partition.partition(g).reshape(-1, 4).double()
    (expected,) = torch.autograd.grad(reference(parts, codes), parts, g_parts)
    grad_parts = plain.partition.partition(grad).reshape(-1, 4).double()
    torch.testing.assert_close(grad_parts, expected, rtol=1e-4, atol=1e-5)
