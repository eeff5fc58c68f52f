"""What a recaption run is: engine, sampling, prompt and image preparation, and their fingerprint."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from recaption.engines import EngineConfig, SamplingConfig, fingerprint
from recaption.images import ImageConfig


@dataclass(frozen=True)
class CaptionJob:
    engine: EngineConfig
    sampling: SamplingConfig = SamplingConfig()
    prompt: str = ""
    image: ImageConfig = ImageConfig()
    write_wds: bool = True
    chunk_size: int = 256  # images prepared and handed to the engine at a time
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.engine, self.sampling, self.prompt, self.image.as_dict())

    def caption_config(self) -> dict:
        """The settings recorded in every ledger and in the dataset card."""
        return {"model": self.engine.model, "revision": self.engine.revision, "backend": self.engine.backend,
                "prompt": self.prompt, **asdict(self.sampling), "image": self.image.as_dict()}
