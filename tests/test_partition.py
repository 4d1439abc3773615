"""kepler.partition: row order identical to the released partitions, exact inverses, clear errors."""

import pytest
import torch

from kepler.partition import (
    CustomPartition,
    GroupPartition,
    LayerPartition,
    make_partition,
)


# Transcriptions of the released partitions' `partition` (they take the latent as (B, H, W, C)
# and return the sub-vectors flattened to rows).
def released_rows(name: str, z_bhwc: torch.Tensor, partitions: int) -> torch.Tensor:
    batch, height, width, channels = z_bhwc.shape
    if name == "group":
        return z_bhwc.reshape(-1, channels // partitions)
    if name == "custom":
        paired = z_bhwc.reshape(batch, height, width, channels // 2, 2).permute(0, 1, 2, 4, 3)
        return paired.reshape(-1, channels // partitions)
    maps = z_bhwc.permute(0, 3, 1, 2)
    return maps.reshape(-1, height * width // partitions)


SHAPES = {
    # name: (B, C, H, W, P); layer needs C == H * W.
    "group": [(2, 12, 3, 5, 3), (1, 8, 1, 1, 8), (3, 7, 2, 3, 1)],
    "custom": [(2, 12, 3, 5, 3), (2, 16, 3, 3, 4), (1, 6, 1, 2, 6)],
    "layer": [(2, 16, 4, 4, 4), (3, 6, 2, 3, 3), (1, 4, 1, 4, 2)],
}
CASES = [(name, shape) for name, shapes in SHAPES.items() for shape in shapes]


@pytest.mark.parametrize("name,shape", CASES)
def test_rows_match_released_order(name, shape):
    batch, channels, height, width, partitions = shape
    z = torch.randn(batch, channels, height, width)
    parts = make_partition(name, partitions).partition(z)
    slots = channels if name == "layer" else height * width
    assert parts.shape == (batch, slots, partitions, parts.shape[-1])
    expected = released_rows(name, z.permute(0, 2, 3, 1).contiguous(), partitions)
    torch.testing.assert_close(parts.reshape(-1, parts.shape[-1]), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name,shape", CASES)
def test_unpartition_inverts(name, shape):
    batch, channels, height, width, partitions = shape
    partition = make_partition(name, partitions)
    # A slice of a larger buffer: non-contiguous input.
    z = torch.randn(batch, channels + 1, height, width)[:, 1:]
    parts = partition.partition(z)
    assert torch.equal(partition.unpartition(parts, z.shape), z)
    assert torch.equal(partition.unpartition(parts.contiguous(), z.shape), z)


def test_custom_partition_channel_layout():
    # P = 4, C = 8: even channels of each half, then odd channels of each half.
    z = torch.arange(8.0).view(1, 8, 1, 1)
    parts = CustomPartition(4).partition(z)
    assert parts.reshape(4, 2).tolist() == [[0, 2], [4, 6], [1, 3], [5, 7]]


def test_group_and_layer_partition_are_views():
    z = torch.randn(2, 16, 4, 4)
    assert GroupPartition(4).partition(z).data_ptr() == z.data_ptr()
    assert LayerPartition(4).partition(z)._base is z


def test_empty_batch():
    z = torch.randn(0, 8, 2, 3)
    partition = GroupPartition(2)
    parts = partition.partition(z)
    assert parts.shape == (0, 6, 2, 4)
    assert partition.unpartition(parts, z.shape).shape == z.shape


def test_check_returns_sub_dim():
    assert GroupPartition(4).check((2, 16, 3, 3)) == 4
    assert CustomPartition(2).check((2, 16, 3, 3), sub_dim=8) == 8
    assert LayerPartition(4).check((1, 16, 4, 4), sub_dim=4) == 4


@pytest.mark.parametrize(
    "partition,shape,sub_dim,message",
    [
        (GroupPartition(3), (2, 8, 2, 2), None, r"channels C=8 must be divisible by partitions=3"),
        (GroupPartition(2), (2, 8, 2), None, r"z must be \(B, C, H, W\)"),
        (GroupPartition(2), (2, 8, 2, 2), 3, r"z has C=8 channels, expected dim=6"),
        (CustomPartition(1), (2, 7, 2, 2), None, r"custom partition: channels C=7 must be even"),
        (CustomPartition(4), (2, 6, 2, 2), None, r"channels C=6 must be divisible by partitions=4"),
        (LayerPartition(4), (1, 9, 3, 3), None, r"H\*W=3\*3=9 must be divisible by partitions=4"),
        (LayerPartition(2), (1, 8, 2, 2), None, r"layer partition needs H\*W == C"),
        (LayerPartition(4), (1, 16, 4, 4), 2, r"must match the codebook's dim/partitions=2"),
    ],
)
def test_errors(partition, shape, sub_dim, message):
    with pytest.raises(ValueError, match=message):
        partition.check(shape, sub_dim)


def test_factory_errors():
    with pytest.raises(ValueError, match=r"partition must be one of \('group', 'custom', 'layer'\), got 'rows'"):
        make_partition("rows", 2)
    with pytest.raises(ValueError, match=r"partitions must be a positive int, got 0"):
        make_partition("group", 0)
    with pytest.raises(ValueError, match=r"partitions must be a positive int, got 2.0"):
        GroupPartition(2.0)
