"""Model sizes, position tables, decoder masking and the open_clip export mapping."""
from __future__ import annotations

import pytest
import torch

from train.export import mlp_ratio
from train.model import SIZES, build_model, model_config, sincos_2d, vision_parameter_count

# The seed's vision-tower sizes (Table 6 of the OpenVision slides). They are open_clip's counts of
# the released towers, whose position table is a parameter: Ti/S/B at patch 8 and 384 px,
# L/H at patch 14 and 224 px. At patch 16 Ti would be 5.56M (-6 %), so patch 16 cannot be meant.
SEED_COUNTS = {("Ti/8", 384): 5.9e6, ("S/8", 384): 22.4e6, ("B/8", 384): 87.4e6,
               ("L/14", 224): 303.7e6, ("H/14", 224): 632.1e6}


@pytest.mark.parametrize("name,size", list(SEED_COUNTS))
def test_vision_tower_matches_seed_parameter_count(name: str, size: int) -> None:
    with torch.device("meta"):
        model = build_model(model_config(name))
    assert vision_parameter_count(model, size) == pytest.approx(SEED_COUNTS[name, size], rel=0.01)


@pytest.mark.parametrize("size", list(SIZES))
def test_every_size_builds_on_meta(size: str) -> None:
    patch = 16 if size in ("Ti", "S", "B") else 14
    with torch.device("meta"):
        model = build_model(model_config(f"{size}/{patch}"))
    vision, text = SIZES[size]
    assert len(model.vision.transformer.blocks) == vision.depth
    assert model.text.proj.out_features == text.width
    assert model.vision.transformer.blocks[0].mlp.fc1.out_features == vision.mlp
    assert int(vision.width * mlp_ratio(vision)) == vision.mlp  # So400m's 4304 survives open_clip's int()


def test_bad_model_names_are_rejected() -> None:
    for name in ("X/16", "B", "B/x"):
        with pytest.raises(ValueError):
            model_config(name)
    with pytest.raises(ValueError):
        model_config("B/16", objective="clip")


def test_sincos_table_is_fixed_and_resolution_free() -> None:
    table = sincos_2d(4, 6, 32)
    assert table.shape == (24, 32)
    assert torch.equal(table, sincos_2d(4, 6, 32))
    assert torch.equal(table[:6, :16], sincos_2d(1, 6, 32)[:, :16])  # x half depends on the column only
    model = build_model(model_config("Ti/16", depth=1, context_length=8, caption_length=6, vocab_size=64))
    positions = model.vision.positions(3, 3)
    assert positions.shape == (10, 192) and torch.count_nonzero(positions[0]) == 0  # CLS row is zero
    for side in (32, 48, 80):  # any resolution works without a stored table
        assert model.encode_image(torch.randn(2, 3, side, side)).shape == (2, 192)


def tiny(objective: str = "clips", **kw):
    torch.manual_seed(0)
    return build_model(model_config("Ti/16", depth=1, context_length=8, caption_length=6, objective=objective,
                                    vocab_size=512, **kw)).eval()


def test_decoder_queries_are_causal_and_prefix_ignores_them() -> None:
    model = tiny()
    images = torch.randn(2, 3, 32, 32)
    texts = torch.randint(5, 200, (4, 8))
    captions = torch.randint(5, 200, (2, 7))
    base = model(images, texts, captions)["caption_logits"]
    changed = captions.clone()
    changed[:, 4] = 3
    logits = model(images, texts, changed)["caption_logits"]
    # position i predicts token i+1 from tokens <= i: inputs 0..3 are untouched, so logits 0..3 are too
    torch.testing.assert_close(logits[:, :4], base[:, :4])
    assert not torch.allclose(logits[:, 4:], base[:, 4:])


def test_decoder_ignores_invalid_prefix_positions() -> None:
    model = tiny()
    prefix = torch.randn(2, 5, 192)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    previous = torch.randint(5, 200, (2, 6))
    base = model.decoder(prefix, valid, previous)
    noisy = prefix.clone()
    noisy[0, 3:] = 100.0  # padded web-caption positions of sample 0
    torch.testing.assert_close(model.decoder(noisy, valid, previous), base)
    noisy[0, 0] += 1.0  # a valid position does matter
    assert not torch.allclose(model.decoder(noisy, valid, previous)[0], base[0])


def test_openvision2_keeps_a_share_of_patch_tokens() -> None:
    model = tiny("openvision2", keep_ratio=0.3)
    assert model.text is None
    tokens = torch.randn(2, 100, 192)
    kept = model.keep_random_tokens(tokens)
    assert kept.shape == (2, 30, 192)
    out = model(torch.randn(2, 3, 64, 64), None, torch.randint(5, 200, (2, 7)))
    assert out["caption_logits"].shape == (2, 6, 512) and "image" not in out


def test_sigmoid_model_has_bias_and_scale_10() -> None:
    model = tiny(loss="sigmoid")
    assert model.logit_bias.item() == -10.0
    assert model.logit_scale.exp().item() == pytest.approx(10.0)
    assert tiny().logit_scale.exp().item() == pytest.approx(1 / 0.07)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    from train.loop import forward_loss

    batch = {"images": torch.randn(2, 3, 32, 32), "texts": torch.randint(5, 200, (4, 8)),
             "captions": torch.randint(5, 200, (2, 7))}
    grads = []
    for checkpointing in (False, True):
        model = tiny(grad_checkpointing=checkpointing).train()
        loss, _ = forward_loss(model, batch, model.cfg)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)
