"""The recaption job on one GPU with the exact shapes of the Recap-DataComp-1B captioner, random weights.

The captioner is LLaVA-1.5 with LLaMA-3-8B and CLIP ViT-L/14-336 (tennant/llava-llama-3-8b-hqedit:
576 image tokens from layer -2 without CLS, a 2-layer GELU projector, 128256-token vocabulary).
This builds a llava-hf folder with those shapes: config, a processor at 336 px, and a byte-level BPE
tokenizer of the full vocabulary size. No weights are written or downloaded: the job runs with
`--engine-kwargs '{"load_format": "dummy"}'`, so vLLM fills the weights at random. Synthetic
DataComp-size images (512 px JPEGs, as img2dataset stores DataComp) go through the real job path
(`pipelines/recaption.py`: local Ray, one worker, its engine on the GPU).

Prints images/s and tokens/s over the job's span (first shard started .. last shard committed;
engine start-up excluded), the engine's busy share (any request in it) and full share (more
requests than it runs at once), and the percentage of the compute ceiling: the dense FLOPs of one
image (vision tower, projector, prefill of image + prompt tokens, decoding the generated tokens;
2 FLOPs per multiply-add, causal attention halved) against the GPU's peak (--peak-tflops; 989 is
H100/H200 dense bf16). Random weights rarely stop early, so captions run to --max-tokens.
The job runs --rounds times, each into a fresh output; the ceiling of each round (from its own tokens
per image) is the baseline its throughput is set against.

    python -m benchmarks.gpu_recaption              # on a GPU machine
    python -m benchmarks.gpu_recaption --tiny       # the same path on the CPU with a tiny config
    python -m benchmarks.gpu_recaption --smoke      # --tiny on the null backend: the code path, no engine
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.record import Record, parse
from dataset.outputs import load_finished
from dataset.synthetic.input_shards import write_shards
from pipelines import recaption as recaption_cli
from recaption.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, build_processor


@dataclass(frozen=True)
class Shapes:
    """What the cost of one image depends on."""
    image_size: int
    patch: int
    vision_hidden: int
    vision_ff: int
    vision_layers: int
    vision_heads: int
    hidden: int
    ff: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    positions: int


RECAP = Shapes(image_size=336, patch=14, vision_hidden=1024, vision_ff=4096, vision_layers=24, vision_heads=16,
               hidden=4096, ff=14336, layers=32, heads=32, kv_heads=8, vocab=128256, positions=8192)
TINY = Shapes(image_size=56, patch=14, vision_hidden=32, vision_ff=64, vision_layers=2, vision_heads=2,
              hidden=128, ff=256, layers=2, heads=2, kv_heads=1, vocab=4096, positions=2048)
VISION_FEATURE_LAYER = -2   # the second-to-last layer's patch features; the last layer never runs
SMOKE = {"tiny": True, "backend": "null", "shards": 1, "per_shard": 4, "max_tokens": 4, "rounds": 1}


def byte_level_tokenizer(vocab_size: int):
    """A byte-level BPE with exactly `vocab_size` tokens: the byte alphabet, merged pairs and triples of it
    (deterministic), then the special tokens. Any id a random model emits decodes to some bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = []
    wanted = vocab_size - len(SPECIAL_TOKENS)
    for first in alphabet:
        for second in alphabet:
            if len(vocab) >= wanted:
                break
            vocab[first + second] = len(vocab)
            merges.append((first, second))
    for pair in [t for t in vocab if len(t) == 2]:
        for third in alphabet:
            if len(vocab) >= wanted:
                break
            vocab[pair + third] = len(vocab)
            merges.append((pair, third))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token=None, extra_special_tokens={"image_token": "<image>"})


def build_model_folder(out: Path, s: Shapes) -> Path:
    """config.json + processor + tokenizer of a llava-hf LLaVA with shapes `s`; no weights (vLLM's dummy loader)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tokenizer = byte_level_tokenizer(s.vocab)
    assert len(tokenizer) == s.vocab, len(tokenizer)
    vision = CLIPVisionConfig(hidden_size=s.vision_hidden, intermediate_size=s.vision_ff,
                              num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
                              image_size=s.image_size, patch_size=s.patch, projection_dim=768)
    text = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.ff, num_hidden_layers=s.layers,
                       num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, vocab_size=s.vocab,
                       max_position_embeddings=s.positions, rope_theta=500000.0, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=VISION_FEATURE_LAYER, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", dtype="bfloat16")
    config.architectures = ["LlavaForConditionalGeneration"]
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    processor = build_processor(tokenizer, s.image_size, s.patch)
    processor.chat_template = CHAT_TEMPLATE
    processor.save_pretrained(out)
    return out


def flops_per_image(s: Shapes, prompt_tokens: int, new_tokens: float) -> float:
    """Dense FLOPs of one caption: vision tower, projector, prefill, decoding (see the module docstring)."""
    patches = (s.image_size // s.patch) ** 2
    seq = patches + 1
    vision_layers = s.vision_layers + VISION_FEATURE_LAYER + 1
    vision = 2 * patches * 3 * s.patch ** 2 * s.vision_hidden + vision_layers * (
        2 * seq * (4 * s.vision_hidden ** 2 + 2 * s.vision_hidden * s.vision_ff) + 4 * seq ** 2 * s.vision_hidden)
    projector = 2 * patches * (s.vision_hidden * s.hidden + s.hidden ** 2)
    kv = s.hidden // s.heads * s.kv_heads
    per_token = 2 * s.layers * (2 * s.hidden ** 2 + 2 * s.hidden * kv + 3 * s.hidden * s.ff)
    prefill = prompt_tokens * per_token + 2 * s.layers * prompt_tokens ** 2 * s.hidden + 2 * s.hidden * s.vocab
    context = prompt_tokens + new_tokens / 2   # the mean context a new token attends to
    decode = new_tokens * (per_token + 2 * s.hidden * s.vocab + 4 * s.layers * context * s.hidden)
    return vision + projector + prefill + decode


@dataclass
class Round:
    images: int
    tokens: int
    span_s: float
    startup_s: float
    busy: float
    full: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.span_s


def run_job(argv: list[str]) -> Round:
    """The users' command in-process; its rates over the span from its ledgers (engine start-up excluded)."""
    out = argv[argv.index("--output") + 1]
    started = time.time()
    if recaption_cli.main(argv) != 0:
        raise SystemExit("the recaption job failed; see its output above")
    finished = load_finished(out)
    first = min(ledger["started_at"] for ledger in finished.ledgers)
    span = max(ledger["finished_at"] for ledger in finished.ledgers) - first
    return Round(sum(ledger["ok"] for ledger in finished.ledgers), sum(ledger["tokens"] for ledger in finished.ledgers),
                 span, first - started, finished.run["engine_busy_share"], finished.run["engine_queued_share"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny config on the CPU: checks the path, not the GPU")
    p.add_argument("--backend", choices=["vllm", "null"], default="vllm", help="the job's engine (default vllm)")
    p.add_argument("--shards", type=int, help="input shards (default 8; --tiny 2)")
    p.add_argument("--per-shard", type=int, help="images per shard (default 1024; --tiny 16)")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per caption (Recap-DataComp-1B: 128)")
    p.add_argument("--rounds", type=int, default=2, help="job runs, each into a fresh output (default 2)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the GPU's dense bf16 peak (default 989: H100/H200 SXM)")
    p.add_argument("--engine-kwargs", default="{}", help="more vLLM options as JSON (load_format is set here)")
    a = parse(p, argv, SMOKE)
    record = Record("gpu_recaption", a, argv)
    shapes = TINY if a.tiny else RECAP
    shards, per_shard = a.shards or (2 if a.tiny else 8), a.per_shard or (16 if a.tiny else 1024)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_model_folder(root / "model", shapes)
        write_shards(root / "shards", shards, per_shard, image_size=512)
        engine_kwargs = {**json.loads(a.engine_kwargs), "load_format": "dummy"}
        job_argv = ["--input", str(root / "shards"), "--model", str(model), "--backend", a.backend,
                    "--max-tokens", str(a.max_tokens), "--num-workers", "1",
                    "--engine-kwargs", json.dumps(engine_kwargs), "--progress-every", "30"]
        job = recaption_cli.config_from_args(recaption_cli.parse_args(job_argv + ["--output", tmp])).job.pinned()
        prompt_tokens = job.request_tokens(job.prompt)
        rounds = [run_job(job_argv + ["--output", str(root / f"out-{i}")]) for i in range(a.rounds)]
        import ray

        ray.shutdown()

    ceilings = [a.peak_tflops * 1e12 / flops_per_image(shapes, prompt_tokens, r.tokens / max(r.images, 1))
                for r in rounds]
    last = rounds[-1]
    per_image = flops_per_image(shapes, prompt_tokens, last.tokens / max(last.images, 1))
    name = "tiny config (CPU check)" if a.tiny else "LLaVA-1.5 + LLaMA-3-8B + CLIP ViT-L/14-336 (Recap captioner)"
    print(f"\n{name}, random weights, {a.backend} backend; {last.images} images of 512 px, {prompt_tokens} prompt "
          f"tokens (image included), {last.tokens / max(last.images, 1):.0f} new tokens per image")
    for r in rounds:
        print(f"job: {r.images_per_s:.1f} images/s, {r.tokens / r.span_s:.0f} tokens/s over {r.span_s:.1f} s; engine "
              f"start-up {r.startup_s:.0f} s (excluded); engine busy {r.busy:.0%}, full {r.full:.0%}")
    print(f"compute: {per_image / 1e12:.2f} TFLOP per image; ceiling at {a.peak_tflops:g} TFLOPS = "
          f"{ceilings[-1]:.1f} images/s")
    record.figures.update({
        "model": name, "backend": a.backend, "images per round": last.images, "prompt tokens": prompt_tokens,
        "new tokens per image": round(last.tokens / max(last.images, 1), 2),
        "TFLOP per image": round(per_image / 1e12, 4), "peak TFLOPS": a.peak_tflops,
        "tokens/s": [round(r.tokens / r.span_s, 1) for r in rounds],
        "engine start-up s": [round(r.startup_s, 1) for r in rounds],
        "engine busy share": [round(r.busy, 4) for r in rounds],
        "engine full share": [round(r.full, 4) for r in rounds]})
    record.compare("the job vs the compute ceiling", "images/s", ("FLOP ceiling at the peak", ceilings),
                   ("job", [r.images_per_s for r in rounds]))
    record.write()


if __name__ == "__main__":
    main()
