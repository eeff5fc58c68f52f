"""Our WebDataset tars: read the recaption output's `wds/` samples back, and export them for standard CLIP trainers.

The recaption job writes `{key}.{image ext}`, `{key}.txt` (web caption), `{key}.re_caption.txt` and
`{key}.json` per ok sample (`outputs.WdsWriter`); keys hold no dots (dataset/reader.py, 'Key rule').
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from dataset import outputs, storage
from dataset.destinations import open_destination, upload_line
from dataset.publish import check_version
from dataset.reader import IMAGE_EXTS
from dataset.scores import ScoreLookup, score_store, scores_to_join


def iter_samples(path: str, limit: int | None = None) -> Iterator[dict]:
    """Samples of one output tar, streamed: {"key", "image_ext", "image", then member ext -> bytes}."""
    sample: dict | None = None
    yielded = 0
    with storage.open_read(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            tar.members = []  # type: ignore[attr-defined]  # stream mode keeps every TarInfo otherwise
            key, _, ext = member.name.partition(".")
            if sample is not None and key != sample["key"]:
                yield sample
                yielded += 1
                sample = None
            if limit is not None and yielded >= limit:
                return
            if sample is None:
                sample = {"key": key, "image_ext": None, "image": b""}
            member_file = tar.extractfile(member) if member.isfile() else None
            data = member_file.read() if member_file is not None else b""
            if ext in IMAGE_EXTS:
                sample["image_ext"], sample["image"] = ext, data
            else:
                sample[ext] = data
    if sample is not None and (limit is None or yielded < limit):
        yield sample


# --- export for standard CLIP trainers --------------------------------------------------------------------
# open_clip's trainer (and DataComp's) read the caption from the `txt` member only, so the export puts the
# chosen caption there and keeps every caption beside it under its own name.

TEXT_CHOICES = ("re_caption", "org_caption", "mix")   # and any other caption column of the version's set
# Recap-DataComp-1B (arXiv:2406.08478, Sec. 5; project page "Recap-CLIP Results") trains CLIP on a
# per-sample mix of recaptions and web captions and sets the mixing ratio p to 0.8; we read p as the
# share of samples whose text is the recaption.
RECAP_MIX_RATIO = 0.8
MANIFEST = "manifest.json"   # what the export holds and how it chose each `txt`
SIZES = "sizes.json"         # samples per tar: open_clip_train reads it when --train-num-samples is not given


@dataclass(frozen=True)
class WdsExportConfig:
    text: str = "re_caption"          # what `txt` holds: a caption column, org_caption, or mix (per sample)
    mix_ratio: float = RECAP_MIX_RATIO  # mix: the probability that a sample's `txt` is its recaption
    seed: int = 0                     # mix: the choice is a hash of (seed, key): the same on every export
    fingerprint: str | None = None    # the output version to export (default: the current one)
    scores: bool = True               # put CLIP scores in each sample's json when the version has them
    public: bool = False              # hf:// only: create the repo public (default private)
    dry_run: bool = False
    hub_endpoint: str | None = None
    allow_incomplete: bool = False    # export a version that is neither complete nor current

    def __post_init__(self) -> None:
        if not 0.0 <= self.mix_ratio <= 1.0:
            raise ValueError(f"mix ratio {self.mix_ratio}: a probability in [0, 1]")


def takes_recaption(key: str, mix_ratio: float, seed: int = 0) -> bool:
    """The per-sample mix: True for a share `mix_ratio` of keys, fixed by (seed, key)."""
    draw = int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big") / 2.0**64
    return draw < mix_ratio


def chosen_caption(key: str, config: WdsExportConfig) -> str:
    """Which caption goes to `txt`: a caption column or 'org_caption'."""
    if config.text == "mix":
        return "re_caption" if takes_recaption(key, config.mix_ratio, config.seed) else "org_caption"
    return config.text


def export_sample(sample: dict, config: WdsExportConfig, scores: dict[str, float | None] | None,
                  columns: tuple[str, ...] = ("re_caption",)) -> dict:
    """One exported sample: the image, `txt`, every caption by name (`{column}.txt`, `org_caption.txt`), and the
    json with what `txt` holds."""
    captions = {**{c: sample[f"{c}.txt"] for c in columns}, "org_caption": sample["txt"]}
    choice = chosen_caption(sample["key"], config)
    meta = {**json.loads(sample.get("json") or b"{}"), "caption": choice, **(scores or {})}
    return {"__key__": sample["key"], sample["image_ext"]: sample["image"], "txt": captions[choice],
            **{f"{name}.txt": text for name, text in captions.items()},
            "json": json.dumps(meta, sort_keys=True).encode()}


def export_wds(input_dir: str, dest: str, config: WdsExportConfig | None = None,
               log: Callable[[str], None] = print, **overrides) -> dict:
    """Export the committed shards' WDS samples to `dest` as `{shard}.tar` + sizes.json + manifest.json.

    One output tar per committed shard with samples, named after its source shard, so that a re-export
    rewrites each tar with the same shard's samples (an img2dataset input gives `{00000..}.tar`); one version
    (fingerprint) only. The manifest is written last and switches readers (dataset/destinations.py); tars of
    shards no longer in the version are removed after it. Returns the manifest.
    """
    config = dataclasses.replace(config or WdsExportConfig(), **overrides)
    run = outputs.load_finished(input_dir, config.fingerprint)
    check_version(run, config.allow_incomplete)
    columns = outputs.caption_columns(run.caption_config)
    if config.text not in (*columns, "org_caption", "mix"):
        raise ValueError(f"--text {config.text!r}: choose a caption column of this version ({', '.join(columns)}), "
                         "org_caption or mix")
    shards = [ledger["shard"] for ledger in run.ledgers if ledger["ok"]]
    if not shards:
        raise ValueError(f"{input_dir}: no committed shard with ok samples to export")
    if no_wds := [shard for shard in shards if outputs.WDS_DIR not in run.by_shard[shard]["files"]]:
        raise ValueError(f"{input_dir}: shards {', '.join(no_wds[:5])} have no WDS output (captioned with --no-wds); "
                         "export needs the images")
    found, score_line = scores_to_join(run, shards, config.scores)
    names = {shard: f"{shard}.tar" for shard in shards}
    for line in [f"input {run.out}: {len(shards)} committed shards with samples (fingerprint {run.fingerprint})",
                 f"txt: {config.text}" + (f" (recaption for a share {config.mix_ratio:g} of samples, seed "
                                          f"{config.seed})" if config.text == "mix" else ""),
                 score_line, f"destination {dest}: {names[shards[0]]} .. {names[shards[-1]]}, {SIZES}, {MANIFEST}",
                 upload_line(dest, len(shards) + 2)]:
        log(line)
    manifest: dict[str, Any] = {"fingerprint": run.fingerprint, "text": config.text, "mix_ratio": config.mix_ratio,
                "seed": config.seed, "scores": found is not None, "tars": {}}
    if config.dry_run:
        return manifest
    sizes: dict[str, int] = {}
    recaptions = 0
    with tempfile.TemporaryDirectory(prefix="ov-wds-") as tmp:
        destination = open_destination(dest, MANIFEST, os.path.join(tmp, "staging"), public=config.public,
                                       endpoint=config.hub_endpoint, log=log)
        for shard in shards:
            shard_scores = ScoreLookup(score_store(run.output), found.current[shard]).by_key() if found else {}
            local, count = os.path.join(tmp, names[shard]), 0
            from webdataset import TarWriter  # here, not at import: webdataset imports torch (drivers import us)

            with TarWriter(local, encoder=False, mode=0o644, mtime=int(time.time())) as tar:
                for sample in iter_samples(run.wds(shard)):
                    if found and sample["key"] not in shard_scores:
                        raise ValueError(f"{run.wds(shard)}: no score row for key {sample['key']!r}")
                    exported = export_sample(sample, config, shard_scores.get(sample["key"]), columns)
                    recaptions += exported["txt"] == exported["re_caption.txt"]
                    tar.write(exported)
                    count += 1
            sizes[names[shard]] = count
            manifest["tars"][names[shard]] = {"shard": shard, "samples": count}
            destination.put(local, names[shard])
            log(f"wrote {names[shard]}: {count:,} samples from shard {shard}")
        local = os.path.join(tmp, SIZES)
        with open(local, "w") as f:
            json.dump(sizes, f, indent=1, sort_keys=True)
        destination.put(local, SIZES)
        switch = json.dumps(manifest, indent=1, sort_keys=True).encode()
        for path in destination.finish(switch, {*sizes, SIZES, MANIFEST},
                                       lambda rel: "/" not in rel and rel.endswith(".tar")):
            log(f"removed stale {path}")
    total = sum(sizes.values())
    log(f"exported {total:,} samples in {len(sizes)} tars to {dest}; txt is the recaption for {recaptions:,}")
    return manifest

