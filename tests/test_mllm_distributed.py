"""Two gloo processes (DDP, then FSDP) with half of a global batch each == one process accumulating it.

Each rank reads its own share of the data stream; answers differ in length, so the ranks hold
different numbers of answer tokens and the loss must be normalised over the global batch.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from train import distributed
from train.mllm.conversation import TEMPLATES
from train.mllm.data import ExampleStream, LlavaJson, make_loader
from train.mllm.model import load_run
from train.mllm.tiny import build_tiny_lm, build_tiny_tower, write_shape_task
from train.mllm.train import STAGE2, StageConfig, accumulate, model_config, prepare_model, save_run, wrap

GLOBAL_BATCH, MICRO = 4, 2


def stage2(root: Path, **fields) -> StageConfig:
    task = root / "task"
    return replace(STAGE2, data=str(task / "train.json"), image_folder=str(task / "images"), out="",
                   lm=str(root / "lm"), tower=str(root / "tower.pt"), **fields)


def gradients(root: Path, fsdp: bool, save: Path | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and full gradients of one global batch, in whatever process group is current (then
    the run saved to `save`, if given)."""
    ctx = distributed.setup()
    cfg = stage2(root, fsdp=fsdp, micro_batch_size=MICRO, batch_size=GLOBAL_BATCH)
    model = prepare_model(cfg, model_config(cfg))
    stream = ExampleStream(LlavaJson(cfg.data, cfg.image_folder), model.tokenizer, TEMPLATES[cfg.template],
                           model.tower.prep, image_tokens=model.tower.shape()[0], max_length=cfg.max_length, seed=0,
                           rank=ctx.rank, world=ctx.world)
    batches = iter(make_loader(stream, MICRO, workers=0))
    net = wrap(model, cfg, ctx, torch.float32)
    loss_sum, tokens = accumulate(net, [next(batches) for _ in range(GLOBAL_BATCH // (MICRO * ctx.world))], ctx, None)
    loss = (distributed.all_reduce_sum(loss_sum) / tokens).item()
    grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
             for n, p in model.named_parameters() if p.grad is not None}
    if save:
        save_run(model, replace(cfg, out=str(save)), model_config(cfg), ctx)
    return loss, grads


def worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    for mode in ("ddp", "fsdp"):
        save = Path(root) / "fsdp-run" if mode == "fsdp" else None
        torch.save(gradients(Path(root), fsdp=mode == "fsdp", save=save), Path(root) / f"{mode}-rank{rank}.pt")
    distributed.teardown(distributed.setup())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_and_fsdp_match_one_process(tmp_path: Path) -> None:
    build_tiny_lm(tmp_path / "lm")
    build_tiny_tower(tmp_path / "tower.pt", depth=1, image_size=32)
    conversations = write_shape_task(tmp_path / "task", GLOBAL_BATCH, image_size=32)["conversations"]
    samples = json.loads(conversations.read_text())
    for i, sample in enumerate(samples):  # answers of 1, 2, 4, 8 words: no two ranks hold as many tokens
        answer = sample["conversations"][1]
        answer["value"] = " ".join([answer["value"]] * 2 ** i)
    conversations.write_text(json.dumps(samples))
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    single_loss, single = gradients(tmp_path, fsdp=False)
    assert {n.split(".")[0] for n in single} == {"projector", "lm"}
    for mode in ("ddp", "fsdp"):
        for rank in range(2):
            loss, grads = torch.load(tmp_path / f"{mode}-rank{rank}.pt")
            assert loss == pytest.approx(single_loss, rel=1e-5), mode
            assert grads.keys() == single.keys()
            for name, grad in single.items():
                # fp32 sums over the same tokens grouped differently (and reduced over ranks): order-only noise.
                torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7, msg=f"{mode} rank {rank} {name}")
    # The sharded model saves whole: untouched by an optimizer step, it is the model it started as.
    cfg = stage2(tmp_path)
    saved, fresh = load_run(tmp_path / "fsdp-run"), prepare_model(cfg, model_config(cfg))
    for (name, a), b in zip(saved.state_dict().items(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
