"""The MLLM's parts: towers (ours, OpenVision 2, open_clip), the splice, freezing per stage, decoding."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from train import checkpoint
from train.mllm.conversation import IGNORE, IMAGE_ID, encode
from train.mllm.data import Example, collate
from train.mllm.evaluate import Answerer
from train.mllm.model import MLLMConfig, build, summed_loss
from train.mllm.tiny import build_tiny_lm, build_tiny_tower, write_shape_task
from train.mllm.towers import load_tower
from train.mllm.train import STAGE1, STAGE2, make_optimizer, model_config, prepare_model
from train.model import build_model, config_from_dict

SIZE, PATCH = 64, 16
TOKENS = (SIZE // PATCH) ** 2  # CLS dropped


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mllm-parts")
    return {"lm": build_tiny_lm(root / "lm"), "tower": build_tiny_tower(root / "tower.pt", image_size=SIZE),
            "ov2": build_tiny_tower(root / "ov2.pt", objective="openvision2", image_size=SIZE, seed=1),
            "task": write_shape_task(root / "task", 4, image_size=SIZE)}


@pytest.fixture(scope="module")
def model(parts):
    torch.manual_seed(0)
    return build(MLLMConfig(lm=str(parts["lm"]), tower=str(parts["tower"]))).eval()


def batch_of(model, task: dict[str, Path], n: int = 2) -> dict:
    """Training batch: the first `n` shape conversations, plus one text-only conversation."""
    items = json.loads(task["conversations"].read_text())[:n]
    examples = []
    for item in items:
        e = encode(item["conversations"], model.tokenizer, model.template, has_image=True)
        image = model.tower.prep(Image.open(task["images"] / item["image"]))
        examples.append(Example(e.ids, e.labels, image, item["id"]))
    text_only = encode([{"from": "human", "value": "What color is it?"}, {"from": "gpt", "value": "red"}],
                       model.tokenizer, model.template, has_image=False)
    examples.append(Example(text_only.ids, text_only.labels, None, "text"))
    return collate(examples)


def test_splice_places_the_image_at_its_placeholder(model, parts) -> None:
    b = batch_of(model, parts["task"])
    with torch.no_grad():
        pictures = model.image_embeddings(b["images"])
        text = model.lm.get_input_embeddings()(b["ids"].clamp(min=0))
        s = model.splice(b["ids"], b["mask"], b["images"], b["labels"])
    assert pictures.shape == (2, TOKENS, model.lm.config.hidden_size)
    for row in range(3):
        n = int(b["mask"][row].sum())
        where = (b["ids"][row, :n] == IMAGE_ID).nonzero()
        length = n - 1 + TOKENS if len(where) else n
        assert int(s.mask[row].sum()) == length and s.mask[row, :length].all()
        assert s.positions[row, :length].tolist() == list(range(length))
        if not len(where):  # the text-only row is unchanged
            torch.testing.assert_close(s.embeds[row, :n], text[row, :n], rtol=0, atol=0)
            assert s.labels[row, :n].tolist() == b["labels"][row, :n].tolist()
            continue
        p = int(where[0, 0])
        # Exact copies (no arithmetic): text before, the image's tokens, text after shifted by TOKENS - 1.
        torch.testing.assert_close(s.embeds[row, :p], text[row, :p], rtol=0, atol=0)
        torch.testing.assert_close(s.embeds[row, p:p + TOKENS], pictures[row], rtol=0, atol=0)
        torch.testing.assert_close(s.embeds[row, p + TOKENS:length], text[row, p + 1:n], rtol=0, atol=0)
        assert (s.labels[row, p:p + TOKENS] == IGNORE).all()
        assert s.labels[row, p + TOKENS:length].tolist() == b["labels"][row, p + 1:n].tolist()
    left = model.splice(b["ids"], b["mask"], b["images"], left_pad=True)
    longest = s.mask.shape[1]
    for row in range(3):
        length = int(s.mask[row].sum())
        torch.testing.assert_close(left.embeds[row, longest - length:], s.embeds[row, :length], rtol=0, atol=0)
        assert left.positions[row, longest - length:].tolist() == list(range(length))
    with pytest.raises(ValueError, match="no image was given"):
        model.splice(b["ids"], b["mask"], b["images"][:1])


def one_step(cfg) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], object]:
    """Parameters before and after one optimizer step of `cfg`'s stage on a tiny batch."""
    model = prepare_model(cfg, model_config(cfg))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make_optimizer(model, cfg)
    b = batch_of(model, {"conversations": Path(cfg.data), "images": Path(cfg.data).parent / "images"})
    logits, labels = model(b["ids"], b["mask"], b["images"], b["labels"])
    loss, count = summed_loss(logits, labels)
    (loss / count).backward()
    optimizer.step()
    return before, dict(model.named_parameters()), model


def changed(before: dict, after: dict, prefix: str) -> set[str]:
    return {n for n in before if n.startswith(prefix) and not torch.equal(before[n], after[n].detach())}


def test_each_stage_trains_only_its_parts(parts) -> None:
    common = dict(data=str(parts["task"]["conversations"]), out="", lm=str(parts["lm"]), tower=str(parts["tower"]))
    before, after, model = one_step(replace(STAGE1, **common))
    assert changed(before, after, "") == {n for n in before if n.startswith("projector.")}

    before, after, model = one_step(replace(STAGE2, **common))
    trainable = {n for n in before if n.startswith(("projector.", "lm."))}
    assert changed(before, after, "") == trainable
    assert all(p.grad is None for p in model.tower.parameters())  # a frozen tower builds no graph

    before, after, model = one_step(replace(STAGE2, tower_lr=1e-4, **common))
    tower_changed = changed(before, after, "tower.")
    # Layer -2 of a 2-block tower: the patch embedding, CLS and block 0 learn; block 1 and the head are unused.
    assert {"tower.vision.patch_embed.weight", "tower.vision.cls"} <= tower_changed
    assert any(n.startswith("tower.vision.transformer.blocks.0.") for n in tower_changed)
    assert not any(".blocks.1." in n or ".norm." in n or ".proj." in n for n in tower_changed)
    assert changed(before, after, "projector.") and changed(before, after, "lm.")


def first_block_only(path: Path, out: Path) -> Path:
    """The same checkpoint cut to one block per tower."""
    state = checkpoint.load(path)
    cfg = state["model_config"]
    one = {**cfg, "vision": {**cfg["vision"], "depth": 1}, "text": {**cfg["text"], "depth": 1}}
    model = build_model(config_from_dict(one))
    model.load_state_dict({k: v for k, v in state["model"].items() if ".blocks.1." not in k})
    torch.save({**state, "model": model.state_dict(), "model_config": asdict(config_from_dict(one))}, out)
    return out


@pytest.mark.parametrize("kind", ["tower", "ov2"])
def test_our_towers_give_second_to_last_block_patch_tokens(parts, tmp_path, kind) -> None:
    images = torch.randn(2, 3, SIZE, SIZE)
    tower = load_tower(str(parts[kind])).eval()
    assert tower.shape() == (TOKENS, 192) and tower.prep.size == SIZE
    cut = load_tower(str(first_block_only(parts[kind], tmp_path / "one.pt")), layer=-1).eval()
    with torch.no_grad():
        # Same weights, same arithmetic: block 0's output either way.
        torch.testing.assert_close(tower(images), cut(images), rtol=0, atol=0)
        assert not torch.equal(tower(images), load_tower(str(parts[kind]), layer=-1)(images))
    # Fixed sin-cos positions: any resolution that is a multiple of the patch.
    assert load_tower(str(parts[kind]), image_size=2 * SIZE).shape() == (4 * TOKENS, 192)


def test_open_clip_tower_plugs_in(parts, tmp_path) -> None:
    import open_clip

    folder = tmp_path / "oc"
    folder.mkdir()
    config = {"model_cfg": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64,
                                                            "patch_size": 8, "head_width": 32},
                            "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2,
                                         "layers": 1}},
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    reference = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    torch.save(reference.state_dict(), folder / "open_clip_pytorch_model.bin")
    spec = f"open_clip:local-dir:{folder}"
    tower = load_tower(spec).eval()
    assert tower.shape() == (16, 64) and tower.prep.std == (0.25, 0.25, 0.25)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # block 0 of 2, without the class token, from the saved weights
        expected = reference.visual.forward_intermediates(images, indices=[0], intermediates_only=True,
                                                         output_fmt="NLC")["image_intermediates"][0]
        # Same weights, same blocks; open_clip may pick another attention kernel when it loads weights,
        # so allow fp32 summation-order differences (values ~1, 64-wide sums: ~1e-7 each).
        torch.testing.assert_close(tower(images), expected, rtol=0, atol=1e-5)
    assert load_tower(spec, image_size=64).shape() == (64, 64)

    model = build(MLLMConfig(lm=str(parts["lm"]), tower=spec)).eval()
    b = batch_of(model, parts["task"], n=1)
    with torch.no_grad():
        logits, labels = model(b["ids"], b["mask"], b["images"], b["labels"])
    assert logits.shape[:2] == labels.shape and logits.shape[1] == b["ids"].shape[1] - 1 + 16


def test_cached_greedy_decoding_matches_full_forward(model, parts) -> None:
    """Left-padded KV-cache decoding picks the tokens a right-padded full forward ranks first."""
    image = Image.open(next(parts["task"]["images"].iterdir()))
    answerer = Answerer(model, batch_size=2, max_new_tokens=5)
    prompts = [answerer.prompt("What color is the shape?", image), answerer.prompt("A longer question, what shape "
                                                                                  "is it and where is it?", None)]
    ids, mask, images, _ = answerer.batch(prompts)
    generated = model.generate(ids, mask, images, 5, stop_ids={-1})  # no stop: five tokens each
    assert [len(g) for g in generated] == [5, 5]
    rows = [Example(p.ids + g, p.labels + g, p.image, p.name) for p, g in zip(prompts, generated, strict=True)]
    results = model.loglikelihood(*answerer.batch(rows))
    assert [greedy for _, greedy in results] == [True, True]
    assert all(logprob < 0 for logprob, _ in results)


def test_text_only_batch_still_reaches_every_trainable_vision_parameter(parts) -> None:
    """DDP and FSDP need a gradient for every trainable parameter in every step, images or not."""
    cfg = replace(STAGE2, data=str(parts["task"]["conversations"]), out="", lm=str(parts["lm"]),
                  tower=str(parts["tower"]), tower_lr=1e-4)
    model = prepare_model(cfg, model_config(cfg)).train()
    text = encode([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "red"}], model.tokenizer,
                  model.template, has_image=False)
    b = collate([Example(text.ids, text.labels, None, "text")])
    logits, labels = model(b["ids"], b["mask"], b["images"], b["labels"])
    loss, count = summed_loss(logits, labels)
    (loss / count).backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.projector.parameters())
    assert model.tower.vision.patch_embed.weight.grad is not None


def test_a_continuation_is_scored_as_the_answer_training_tokenises(model, parts) -> None:
    """loglikelihood scores the continuation tokenised with its prompt ("ASSISTANT:" then " red"), without a
    stop token after it: the tokens training supervises for that answer."""
    image = Image.open(next(parts["task"]["images"].iterdir()))
    answerer = Answerer(model)
    prompt, scored = answerer.prompt("What color is the shape?", image), answerer.prompt("What color is the shape?",
                                                                                         image, "red")
    trained = encode([{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"}],
                     model.tokenizer, model.template, has_image=True)
    assert scored.ids == prompt.ids + scored.ids[len(prompt.ids):] == trained.ids[:-1]  # all but the stop token
    assert scored.labels == [IGNORE] * len(prompt.ids) + trained.labels[len(prompt.ids):-1]
    assert model.tokenizer.decode(scored.ids[len(prompt.ids):]) == " red"
