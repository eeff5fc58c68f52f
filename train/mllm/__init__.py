"""A LLaVA-1.5-style multimodal LLM harness that judges vision encoders the way OpenVision does.

towers (vision features) -> projector -> a Hugging Face causal LM; two training stages and
benchmark evaluation (LLaVA-format jsonl, or lmms-eval through `lmms_plugin`).
"""
