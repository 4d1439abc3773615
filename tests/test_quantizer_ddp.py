"""KeplerQuantizer and ResidualQuantizer under torch.distributed: two CPU processes (gloo) keep identical
codebooks.

Each rank quantizes its own half of a batch and uses its own RNG stream, so every statistic and
every random pick must go through the collectives for the ranks to agree.
"""

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kepler.nn import KeplerQuantizer, ResidualQuantizer

WORLD_SIZE = 2
STEPS = 3
TIMEOUT_S = 240

# Random init (k-means seeds, dead-code re-seeding) and EMA, per-partition codebooks.
RANDOM_CONFIG = dict(
    num_codes=16, dim=8, partitions=2, shared_codebook=False, init="kmeans", ema_decay=0.9,
    dead_code_threshold=1,
)
# Deterministic given the data: under DDP it must equal one process seeing the whole batch.
EMA_CONFIG = dict(num_codes=16, dim=8, partitions=2, ema_decay=0.8)
# Residual stages with all the random upkeep, and quantize dropout drawn on each rank's own stream.
RESIDUAL_CONFIG = dict(num_quantizers=2, num_codes=16, dim=8, partitions=2, init="kmeans", ema_decay=0.9,
                       dead_code_threshold=1, quantize_dropout=0.5)


def batches():
    generator = torch.Generator().manual_seed(1234)
    return [torch.randn(2 * WORLD_SIZE, 8, 3, 3, generator=generator) for _ in range(STEPS)]


def build(config):
    torch.manual_seed(0)  # identical construction on every rank and in the single process
    return ResidualQuantizer(**config) if "num_quantizers" in config else KeplerQuantizer(**config)


def run_steps(quantizer, batches_for_me):
    quantizer.train()
    perplexities = []
    for z in batches_for_me:
        out = quantizer(z.clone().requires_grad_(True))
        out.loss.backward()
        perplexities.append(out.perplexity)
    return perplexities


def state_of(quantizer, perplexities):
    return {name: tensor.clone() for name, tensor in quantizer.state_dict().items()} | {
        "perplexity": torch.stack(perplexities)
    }


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=120))
    try:
        random_quantizer = build(RANDOM_CONFIG)
        ema_quantizer = build(EMA_CONFIG)
        residual_quantizer = build(RESIDUAL_CONFIG)
        torch.manual_seed(100 + rank)  # different picks on every rank: rank 0's must win
        halves = [z.chunk(WORLD_SIZE)[rank] for z in batches()]
        result = {
            "random": state_of(random_quantizer, run_steps(random_quantizer, halves)),
            "ema": state_of(ema_quantizer, run_steps(ema_quantizer, halves)),
            "residual": state_of(residual_quantizer, run_steps(residual_quantizer, halves)),
        }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("ddp"))
    context = mp.start_processes(
        _worker, args=(free_port(), out_dir), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE} gloo ranks did not finish within {TIMEOUT_S} s")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("config", ["random", "ema", "residual"])
def test_ranks_keep_identical_state(ranks, config):
    first, second = ranks[0][config], ranks[1][config]
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("config", ["random", "ema"])
def test_code_counts_cover_both_ranks(ranks, config):
    counts = ranks[0][config]["code_counts"]
    assert int(counts.sum()) == STEPS * (2 * WORLD_SIZE) * 3 * 3 * 2


def test_residual_stages_count_both_ranks_and_moved(ranks):
    state = ranks[0]["residual"]
    assert int(state["code_counts"].sum()) == STEPS * (2 * WORLD_SIZE) * 3 * 3 * 4  # 2 stages x 2 partitions
    untouched = build(RESIDUAL_CONFIG)
    for stage in range(2):
        assert bool(state[f"stages.{stage}.upkeep.initialized"])
        assert not torch.equal(state[f"stages.{stage}.codebook"], untouched.stage(stage).codebook)


def test_random_config_actually_initialized_and_moved(ranks):
    state = ranks[0]["random"]
    assert bool(state["upkeep.initialized"])
    untouched = build(RANDOM_CONFIG).codebook
    assert not torch.equal(state["codebook"], untouched)


def test_ema_matches_one_process_on_the_whole_batch(ranks):
    single = build(EMA_CONFIG)
    perplexities = run_steps(single, batches())
    distributed = ranks[0]["ema"]
    assert torch.equal(distributed["code_counts"], single.code_counts)
    torch.testing.assert_close(distributed["codebook"], single.codebook.detach())
    torch.testing.assert_close(distributed["upkeep.ema_cluster_size"], single.upkeep.ema_cluster_size)
    torch.testing.assert_close(distributed["perplexity"], torch.stack(perplexities))
