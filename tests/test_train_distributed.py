"""Two gloo processes with half the batch each == one process with the whole batch (both objectives)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from train.distributed import all_reduce_sum
from train.loop import forward_loss
from train.model import build_model, model_config

BATCH = 8  # global


def global_batch() -> dict[str, torch.Tensor]:
    """Fixed samples with uneven caption lengths, so per-rank token counts differ."""
    g = torch.Generator().manual_seed(0)
    texts = torch.randint(103, 500, (2 * BATCH, 12), generator=g)
    texts[:, -1] = 101
    captions = torch.randint(103, 500, (BATCH, 10), generator=g)
    for i in range(BATCH):
        texts[i, 3 + i % 5:-1] = 0
        captions[i, 2 + i:] = 0
    images = torch.randint(0, 256, (BATCH, 3, 48, 48), dtype=torch.uint8, generator=g)
    keep = torch.stack([torch.randperm(9, generator=g)[:3] for _ in range(BATCH)])  # 9 patches, keep int(9 x .35)
    return {"images": images, "texts": texts, "captions": captions, "keep": keep}


def shard(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    n = BATCH // world
    rows = slice(rank * n, (rank + 1) * n)
    web, sub = batch["texts"][:BATCH], batch["texts"][BATCH:]
    return {"images": batch["images"][rows], "texts": torch.cat([web[rows], sub[rows]]),
            "captions": batch["captions"][rows], "keep": batch["keep"][rows]}


def loss_and_grads(rank: int, world: int, variant: str) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    objective, loss = ("openvision2", "softmax") if variant == "openvision2" else ("clips", variant)
    cfg = model_config("Ti/16", depth=1, context_length=12, caption_length=10, vocab_size=512, loss=loss,
                       objective=objective)
    model = build_model(cfg)
    net = DistributedDataParallel(model) if world > 1 else model
    batch = shard(global_batch(), rank, world)
    if objective == "openvision2":
        del batch["texts"]
    value, _ = forward_loss(net, batch, cfg)
    value.backward()
    mean = all_reduce_sum(value) / world
    return mean.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


VARIANTS = ("softmax", "sigmoid", "openvision2")  # clips with either contrastive loss, and OpenVision 2


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for variant in VARIANTS:
        torch.save(loss_and_grads(rank, world, variant), Path(out) / f"{variant}-rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Tolerances. float32 has unit roundoff u = 2**-24 ~ 6e-8. One process sums the batch in one order,
# two processes sum half batches and then add the halves (DDP's all-reduce): the same terms in another
# association, so results differ by rounding only. Summing N terms in another order moves the result by
# about sqrt(N) * u of its magnitude (rounding errors add like a random walk; N * u is the worst case).
# The longest chains here are weight gradients: a sum over 2B * T = 2 * 8 * 12 = 192 token rows of
# products with inner length <= 768 (the MLP), N ~ 192 * 768 ~ 1.5e5, sqrt(N) * u ~ 2.3e-5. So every
# gradient must agree to 2e-5 of its own norm (measured: <= 6e-7), and the loss, a mean of 2B = 16
# per-row terms, to 1e-6 (16 * u, the worst case; measured 1.6e-7). Comparing against each gradient's
# norm rather than elementwise keeps entries that are tiny relative to their tensor from failing on noise.
GRAD_RTOL, LOSS_RTOL = 2e-5, 1e-6


def assert_grads_match(two: dict[str, torch.Tensor], one: dict[str, torch.Tensor], label: str) -> None:
    assert two.keys() == one.keys()
    for name, grad in one.items():
        norm = grad.norm().item()
        assert norm > 0, f"{label} {name}: no gradient"
        error = (two[name] - grad).norm().item()
        assert error <= GRAD_RTOL * norm, f"{label} {name}: |difference| {error:.3g} > {GRAD_RTOL} x |grad| {norm:.3g}"


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path: Path) -> None:
    """clips (softmax, sigmoid) and openvision2: same loss, same gradients on every parameter and rank."""
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the thread count changes the reduction order
    try:
        for variant in VARIANTS:
            single_loss, single_grads = loss_and_grads(0, 1, variant)
            for rank in range(2):
                two_loss, two_grads = torch.load(tmp_path / f"{variant}-rank{rank}.pt")
                assert two_loss == pytest.approx(single_loss, rel=LOSS_RTOL), variant
                assert_grads_match(two_grads, single_grads, f"{variant} rank {rank}")
    finally:
        torch.set_num_threads(threads)
