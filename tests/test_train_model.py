"""Model sizes, the two reference decoders, the loss weights, the fp32 vocabulary head and the vision API."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from train.export import mlp_ratio
from train.loop import CAPTION_WEIGHT, CONTRASTIVE_WEIGHT, forward_loss
from train.losses import vocab_nll
from train.model import SIZES, build_model, model_config, sincos_2d

# Vision-tower parameters of the /16 and /14 models (the rows of the OpenVision paper's Table 6,
# 224 px), counted as our module holds them: the contrastive tower with its pooled LayerNorm and
# projection; the fixed sin-cos table is not a parameter (an open_clip export stores it as one,
# adding (224/patch)^2 + 1 rows of width). Seed values are the paper's; the deviations are ours
# as measured, written down rather than tuned away: L/14 and H/14 agree, the smaller towers are
# 1.6-6.4 % below the published counts.
SEED = {"Ti/16": 5.9e6, "S/16": 22.4e6, "B/16": 87.4e6, "L/14": 303.7e6, "H/14": 632.1e6}
MEASURED = {"Ti/16": 5_523_264, "S/16": 21_737_088, "B/16": 86_039_808, "L/14": 303_700_992, "H/14": 631_745_280}
DEVIATION = {"Ti/16": -0.064, "S/16": -0.030, "B/16": -0.016, "L/14": 0.000, "H/14": -0.0006}


@pytest.mark.parametrize("name", list(SEED))
def test_vision_tower_parameter_counts_against_the_seed(name: str) -> None:
    with torch.device("meta"):
        model = build_model(model_config(name))
    count = sum(p.numel() for p in model.vision.parameters())
    assert count == MEASURED[name]
    assert count / SEED[name] - 1 == pytest.approx(DEVIATION[name], abs=0.0005)


@pytest.mark.parametrize("size", list(SIZES))
def test_every_size_builds_on_meta(size: str) -> None:
    patch = 16 if size in ("Ti", "S", "B") else 14
    with torch.device("meta"):
        model = build_model(model_config(f"{size}/{patch}"))
        ov2 = build_model(model_config(f"{size}/{patch}", objective="openvision2"))
    vision, text = SIZES[size]
    assert len(model.vision.transformer.blocks) == vision.depth
    assert model.text.proj.out_features == text.width
    assert model.vision.transformer.blocks[0].mlp.fc1.out_features == vision.mlp
    assert int(vision.width * mlp_ratio(vision)) == vision.mlp  # So400m's 4304 survives open_clip's int()
    assert ov2.text is None and ov2.vision.proj is None and ov2.vision.norm is None  # nothing untrained is built


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
    model = tiny()
    positions = model.vision.positions(3, 3)
    assert positions.shape == (10, 192) and torch.count_nonzero(positions[0]) == 0  # CLS row is zero
    for side in (32, 48, 80):  # any resolution works without a stored table
        assert model.encode_image(torch.randn(2, 3, side, side)).shape == (2, 192)


def tiny(objective: str = "clips", depth: int = 1, **kw):
    torch.manual_seed(0)
    return build_model(model_config("Ti/16", depth=depth, context_length=8, caption_length=7, objective=objective,
                                    vocab_size=512, **kw)).eval()


def decoder_states(model, images, texts, captions) -> list[torch.Tensor]:
    """Inputs of the decoder's head (its transformer's output at the query / caption positions)."""
    seen: list[torch.Tensor] = []
    handle = model.decoder.out.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    model(images, captions, texts=texts)
    handle.remove()
    return seen


def test_openvision1_queries_never_see_the_caption_tokens() -> None:
    model = tiny()
    images, texts = torch.randn(2, 3, 32, 32), torch.randint(5, 200, (4, 8))
    captions = torch.randint(5, 200, (2, 7))
    changed = captions.clone()
    changed[:, 1:] = torch.randint(200, 400, (2, 6))  # every token but [BOS]
    (base,), (other,) = decoder_states(model, images, texts, captions), decoder_states(model, images, texts, changed)
    assert base.shape == (2, 6, 192)  # 6 queries predict tokens 1..6
    torch.testing.assert_close(other, base, rtol=0, atol=0)  # not one query's state moved
    images2 = images.clone()
    images2[1] += 1.0
    (moved,) = decoder_states(model, images2, texts, captions)
    assert torch.equal(moved[0], base[0]) and not torch.allclose(moved[1], base[1])  # the prefix does matter


def test_openvision1_prefix_is_the_web_captions_pre_norm_states_without_cls() -> None:
    model = tiny()
    images, captions = torch.randn(2, 3, 32, 32), torch.randint(5, 200, (2, 7))
    texts = torch.randint(5, 200, (4, 8))
    seen: list[torch.Tensor] = []
    handle = model.decoder.text_proj.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    base = decoder_states(model, images, texts, captions)[0]
    handle.remove()
    x = model.text.token_embed(texts) + model.text.positions  # the same batch: the same arithmetic
    torch.testing.assert_close(seen[0], model.text.transformer(x)[:2, :-1], rtol=0, atol=0)  # no final norm, no CLS
    changed = texts.clone()
    changed[2:] = 7  # the sub-captions: contrastive only
    torch.testing.assert_close(decoder_states(model, images, changed, captions)[0], base, rtol=0, atol=0)


def test_teacher_forcing_is_an_explicit_option() -> None:
    model = tiny(teacher_forcing=True)
    images, texts = torch.randn(2, 3, 32, 32), torch.randint(5, 200, (4, 8))
    captions = torch.randint(5, 200, (2, 7))
    changed = captions.clone()
    changed[:, 3] = 300
    (base,), (other,) = decoder_states(model, images, texts, captions), decoder_states(model, images, texts, changed)
    torch.testing.assert_close(other[:, :3], base[:, :3])  # query i sees tokens <= i only
    assert not torch.allclose(other[:, 3:], base[:, 3:])
    assert tiny().decoder.token_embed is None


def ov2_decoder_states(model, patches: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """The OpenVision 2 decoder's transformer output over [kept patches; caption tokens 0..L-2]."""
    decoder = model.decoder
    x = torch.cat([decoder.image_proj(patches), decoder.token_embed(captions[:, :-1])], dim=1)
    return decoder.transformer(x, causal=True)


def test_openvision2_decoder_is_causal_over_kept_patches_then_caption() -> None:
    """Two decoder blocks, so that what a position sees in block 1 reaches block 2."""
    model = tiny("openvision2", depth=2, keep_ratio=0.35)
    assert model.cfg.kept_tokens(16) == 5  # int(16 x 0.35), as the reference
    k = 5
    patches, captions = torch.randn(2, k, 192), torch.randint(5, 200, (2, 7))
    with torch.no_grad():
        base = ov2_decoder_states(model, patches, captions)
        assert base.shape == (2, k + 6, 192)
        for t in range(1, 7):  # caption token t is input position k + t: it reaches positions >= k + t only
            changed = captions.clone()
            changed[:, t] = 300
            other = ov2_decoder_states(model, patches, changed)
            if t < 6:
                torch.testing.assert_close(other[:, :k + t], base[:, :k + t], rtol=0, atol=0)
                assert (other[:, k + t:] - base[:, k + t:]).abs().amax(-1).min() > 1e-3  # every later position moved
            else:  # the last token is only a target: no input position holds it
                torch.testing.assert_close(other, base, rtol=0, atol=0)
        for j in range(k):  # kept patch j reaches the patches after it and every caption position
            moved = patches.clone()
            moved[:, j] += 1.0
            other = ov2_decoder_states(model, moved, captions)
            torch.testing.assert_close(other[:, :j], base[:, :j], rtol=0, atol=0)
            assert (other[:, j:] - base[:, j:]).abs().amax(-1).min() > 1e-3
        # Patches see only the patches before them, so with two blocks the caption states depend on
        # the order of the kept patches, far above rounding. With one block the caption tokens attend
        # to a set of the same patch inputs (no position embedding): order-free up to float rounding.
        reversed_ = ov2_decoder_states(model, patches.flip(1), captions)[:, k:]
        assert (reversed_ - base[:, k:]).abs().amax(-1).min() > 1e-3
        one_block = tiny("openvision2", depth=1)
        torch.testing.assert_close(ov2_decoder_states(one_block, patches.flip(1), captions)[:, k:],
                                   ov2_decoder_states(one_block, patches, captions)[:, k:], rtol=1e-5, atol=1e-5)
    images, captions = torch.randn(2, 3, 64, 64), torch.randint(5, 200, (2, 7))
    out = model(images, captions, keep=torch.stack([torch.randperm(16)[:k] for _ in range(2)]))
    assert set(out) == {"caption_nll", "caption_correct", "caption_tokens"} and out["caption_tokens"] == 12


@pytest.mark.parametrize("objective", ["clips", "openvision2"])
def test_loss_is_contrastive_plus_two_times_caption(objective: str) -> None:
    model = tiny(objective).train()
    batch = {"images": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
             "captions": torch.randint(5, 200, (2, 7))}
    if objective == "clips":
        batch["texts"] = torch.randint(5, 200, (4, 8))
    else:
        batch["keep"] = torch.tensor([[0, 1], [2, 3]])
    loss, parts = forward_loss(model, batch, model.cfg)
    assert (CONTRASTIVE_WEIGHT, CAPTION_WEIGHT) == (1.0, 2.0)
    expected = 2 * parts["caption"] + (parts["contrastive"] if objective == "clips" else 0)
    torch.testing.assert_close(loss, expected)
    assert 0.8 * torch.log(torch.tensor(512.0)) < parts["caption"] < 1.2 * torch.log(torch.tensor(512.0))


def test_vocab_head_matches_full_cross_entropy_in_fp32_and_chunks() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the head ignores autocast: logits stay fp32
        nll, correct = vocab_nll(hidden, weight, targets, chunk=8)
    nll.backward()
    logits = hidden.detach() @ weight.detach().T
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    F.cross_entropy(h @ w.T, targets, reduction="sum").backward()
    # float32 sums of <= 50 terms in another order: about 50 x 2**-24 ~ 3e-6 relative
    torch.testing.assert_close(nll, F.cross_entropy(logits, targets, reduction="sum"), rtol=1e-5, atol=0)
    assert correct == (logits.argmax(-1) == targets).sum()
    torch.testing.assert_close(hidden.grad, h.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, w.grad, rtol=1e-5, atol=1e-5)


def test_contrastive_logits_are_fp32_under_bf16_autocast() -> None:
    from train.losses import softmax_contrastive

    image, text = torch.randn(4, 8), torch.randn(4, 8)
    scale = torch.tensor(2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = softmax_contrastive(image, [text], scale)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, softmax_contrastive(image, [text], scale))  # the same fp32 arithmetic


def test_vision_tokens_of_any_block_cls_first() -> None:
    model = tiny(depth=3)
    images = torch.randn(2, 3, 32, 32)
    last = model.vision.tokens(images)
    assert last.shape == (2, 1 + 4, 192)
    assert torch.equal(model.vision.tokens(images, layer=2), last)
    second_to_last = model.vision.tokens(images, layer=-2)
    assert torch.equal(second_to_last, model.vision.tokens(images, layer=1))
    assert not torch.equal(second_to_last, last)
    with pytest.raises(ValueError):
        model.vision.tokens(images, layer=3)


def test_sigmoid_model_has_bias_and_scale_10() -> None:
    model = tiny(loss="sigmoid")
    assert model.logit_bias.item() == -10.0
    assert model.logit_scale.exp().item() == pytest.approx(10.0)
    assert tiny().logit_scale.exp().item() == pytest.approx(1 / 0.07)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    batch = {"images": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
             "texts": torch.randint(5, 200, (4, 8)), "captions": torch.randint(5, 200, (2, 7))}
    grads = []
    for checkpointing in (False, True):
        model = tiny(grad_checkpointing=checkpointing).train()
        loss, _ = forward_loss(model, batch, model.cfg)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


@pytest.mark.parametrize("objective", ["clips", "openvision2"])
def test_bf16_autocast_step_keeps_fp32_losses_and_reaches_every_parameter(objective: str) -> None:
    """The GPU path's autocast, on the CPU: losses stay fp32 and every parameter gets a gradient."""
    model = tiny(objective).train()
    batch = {"images": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8),
             "captions": torch.randint(5, 200, (2, 7)), "texts": torch.randint(5, 200, (4, 8)),
             "keep": torch.tensor([[0, 5, 9, 3, 1], [2, 4, 6, 8, 10]])}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts = forward_loss(model, batch, model.cfg)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
