"""The committed CLIP scores of an output version: layout, schema, which shards are current, lookup by key.

The score stage lives beside the captions it scores, `Output.stage("clip_scores")`, so each output
version (fingerprint) has its own scores:

    BASE/clip_scores/_scorer.json                        the model every score of this version comes from
    BASE/clip_scores/parquet/{shard}~{gen}.{attempt}.parquet   one row per ok row of the shard (SCORE_SCHEMA)
    BASE/clip_scores/_ledger/{shard}[~n].json            the commit, naming the recaption commit it scored

A shard's scores are current when its latest score ledger's `source` is the shard's latest recaption
commit (generation and attempt id): a `--retry-errors` generation makes them stale until rescored.
This module only reads (no torch): publish and the report join what scoring/stage.py writes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TypedDict, cast

import pyarrow as pa
import pyarrow.compute as pc

from dataset import outputs, storage
from dataset.protocol import Ledger, ShardStore
from dataset.versions import Output

STAGE = "clip_scores"
SCORE_KINDS = {outputs.PARQUET_DIR: "parquet"}
SCORER_FILE = "_scorer.json"
SCORE_COLUMNS = ["re_clip_score", "org_clip_score"]
SCORE_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("re_clip_score", pa.float64()),    # cosine(image, re_caption) in [-1, 1]; null when `error`
    ("org_clip_score", pa.float64()),   # cosine(image, org_caption)
    ("error", pa.string()),             # 'reason: detail' when the image could not be scored
])




def score_name(column: str) -> str:
    """The CLIP score of a caption column: Recap-DataComp-1B's `re_clip_score` for `re_caption`."""
    return "re_clip_score" if column == "re_caption" else f"{column}_clip_score"


def score_schema(columns: tuple[str, ...] = ("re_caption",)) -> pa.Schema:
    """The score rows of an output version with these caption columns: SCORE_SCHEMA, with a score per other
    caption column before `error`."""
    extra = [pa.field(score_name(c), pa.float64()) for c in columns if c != "re_caption"]
    return pa.schema([*SCORE_SCHEMA.remove(SCORE_SCHEMA.get_field_index("error")), *extra,
                      SCORE_SCHEMA.field("error")])


class ScoresIncomplete(ValueError):
    """Some of the shards to publish have current CLIP scores and some do not."""


class ScorerMismatch(ValueError):
    """The version's scores come from another model; scores of two models never mix in one version."""


def score_store(output: Output) -> ShardStore:
    return output.stage(STAGE, SCORE_KINDS)


def read_scorer(store: ShardStore) -> dict | None:
    """The model this version's scores come from, None before the first score run."""
    try:
        return json.loads(storage.read_bytes(storage.join(store.base, SCORER_FILE)))
    except FileNotFoundError:
        return None


def describe_scorer(identity: dict | None) -> str:
    """A scorer identity as text: `model (pretrained)`."""
    if not identity:
        return "no model recorded"
    return identity.get("model", "?") + (f" ({identity['pretrained']})" if identity.get("pretrained") else "")


def register_scorer(store: ShardStore, identity: dict) -> None:
    """Record the model of this version's scores (first run), or refuse another model's."""
    path = storage.join(store.base, SCORER_FILE)
    if storage.put_if_absent(path, json.dumps(identity, indent=1, sort_keys=True).encode()):
        return
    recorded = read_scorer(store)
    if recorded != identity:
        raise ScorerMismatch(f"{store.base} holds scores from {recorded}; this run's model is {identity}. "
                             f"Score with the same model, or move {store.base} away to rescore everything.")


class ScoreSource(TypedDict):
    """The recaption commit a score ledger scored."""
    generation: int
    attempt_id: str
    parquet: str


class ScoreLedger(Ledger, total=False):
    """A score shard's commit: the protocol's fields, the model, the commit scored, counts, timings."""
    scorer: dict
    source: ScoreSource
    rows_out: int
    scored: int
    error: int
    errors_by_reason: dict[str, int]
    started_at: float
    finished_at: float
    seconds: float
    rows_per_s: float
    worker: str


def is_current(score_ledger: ScoreLedger, recaption_ledger: Ledger) -> bool:
    """The score ledger scored exactly this recaption commit."""
    source = score_ledger.get("source")
    return (source is not None and source.get("generation") == recaption_ledger.get("generation")
            and source.get("attempt_id") == recaption_ledger.get("attempt_id"))


@dataclass
class ScoreCoverage:
    """Which of a run's shards have current scores, from which model."""
    scorer: dict | None
    current: dict[str, ScoreLedger] = field(default_factory=dict)   # shard -> its score ledger
    missing: list[str] = field(default_factory=list)          # shards without current scores

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def none(self) -> bool:
        return not self.current


def coverage(run: outputs.FinishedRun) -> ScoreCoverage:
    """Score coverage of the run's committed shards: the listings, then one read per scored shard; scores whose
    files are not as committed count as missing."""
    store = score_store(run.output)
    listing = store.listing()
    done = listing.done()
    ledgers = store.read_ledgers({shard: done[shard] for shard in sorted(done.keys() & run.by_shard.keys())})
    result = ScoreCoverage(read_scorer(store))
    for ledger in run.ledgers:
        shard = ledger["shard"]
        score = cast("ScoreLedger | None", ledgers.get(shard))
        if (score is not None and is_current(score, ledger) and score.get("scorer") == result.scorer
                and not store.check(score, listing)):
            result.current[shard] = score
        else:
            result.missing.append(shard)
    return result


class ScoreLookup:
    """One shard's committed scores, looked up by key in the order the caller's rows come."""

    def __init__(self, store: ShardStore, ledger: Ledger):
        path = store.files(ledger)[outputs.PARQUET_DIR]
        names = outputs.open_parquet(path).schema_arrow.names
        self.names = [name for name in names if name not in ("key", "error")]   # score_schema's scores
        table = pa.Table.from_batches(list(outputs.iter_batches(path, ["key", *self.names])))
        self.path = path
        self.columns = {name: table[name].combine_chunks() for name in ["key", *self.names]}

    def take(self, keys: pa.Array | pa.ChunkedArray) -> dict[str, pa.Array]:
        """Every score column for `keys`; a key without a score row is an error (scores cover every ok row)."""
        index = pc.index_in(keys, value_set=self.columns["key"])
        if index.null_count:
            missing = pc.filter(keys, pc.is_null(index))[0].as_py()
            raise ValueError(f"{self.path}: no score row for key {missing!r} (and {index.null_count - 1} more)")
        return {name: self.columns[name].take(index) for name in self.names}

    def by_key(self) -> dict[str, dict[str, float | None]]:
        """Key -> {score column: value} for the whole shard."""
        values = {name: self.columns[name].to_pylist() for name in self.names}
        return {key: {name: values[name][i] for name in self.names}
                for i, key in enumerate(self.columns["key"].to_pylist())}


def scores_to_join(run: outputs.FinishedRun, shards: list[str], wanted: bool) -> tuple[ScoreCoverage | None, str]:
    """Whether rows of `shards` get CLIP scores, and the decision as a line for the log.

    All shards current: the coverage. None: no scores (the line says how to add them). Some but not
    all: ScoresIncomplete naming the unscored shards, never a silent mix of scored and unscored rows.
    """
    if not wanted:
        return None, "CLIP scores: not joined (--no-scores)"
    found = coverage(run)
    missing = [shard for shard in shards if shard not in found.current]
    if len(missing) == len(shards):
        return None, (f"CLIP scores: none for these shards (run pipelines/score.py --input {run.out} to add "
                      "re_clip_score and org_clip_score)")
    if missing:
        raise ScoresIncomplete(
            f"{run.out}: {len(shards) - len(missing)} of {len(shards)} shards have current CLIP scores, "
            f"{len(missing)} do not (first: {', '.join(missing[:5])}). Finish scoring with "
            f"`python pipelines/score.py --input {run.out}` and {describe_scorer(found.scorer)}, "
            "or leave the scores out (--no-scores).")
    return found, (f"CLIP scores: joined for all {len(shards)} shards with ok rows, "
                   f"model {describe_scorer(found.scorer)}")
