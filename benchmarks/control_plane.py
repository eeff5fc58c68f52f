"""The recaption job's control plane at DataComp-1B scale (about 140,000 img2dataset shards), by simulation.

For each size N, on a local folder and (with --s3) on SeaweedFS S3 on loopback (tests/s3server.py):
N input shards (one tiny img2dataset tar, hard-linked N times locally, with its `.parquet` and
`_stats.json` beside each, as img2dataset writes them) and one output taken through these states:

  half      every other shard committed                      planning only (a rerun would caption)
  done      every shard committed                            the no-op rerun, and planning
  errors    done, the latest ledger of 1 % with error rows   planning with --retry-errors
  versions  done under the first fingerprint, and done again under a second one (--new-version, a
            prompt of its own) in OUT/versions/FP             the no-op rerun, and planning

Outputs are written through the commit protocol, one shard at a time on a thread pool: the version
through `Output.register`, each shard as an `Attempt` registered in its claim that puts a Parquet and a
WebDataset file (hard links of one tiny file) and commits its ledger (`make_ledger`, generation 0, and 1 for
the shards with errors): what a real run leaves, with real names, claims and commits.

Each measurement runs in a fresh process (--rounds times; the medians count), so the peak memory (RSS,
imports included) is the driver's own:
- import: `pipelines/recaption.py`'s modules (paid once per rerun, before main());
- no-op rerun: `pipelines/recaption.py`'s main() in-process with the null backend, up to "nothing pending";
- planning alone: `recaption.stage.plan_captions()` on the output's version;
- the storage requests of each, by kind (`dataset.storage.REQUESTS`; 'list' counts listing pages).
Then a run with pending shards (--throughput-shards, a smaller N) on the null backend with 2 workers on a
local Ray: shards/s over the span from the first shard's start to the last commit (Ray's start-up aside);
locally, alternately for --rounds rounds, without (the baseline) and with --latency-ms added to each of
the driver's storage requests (the workers' are left alone), as a driver far from its S3 sees them:
what the claims taken on threads are for.
Last, for each timing and the memory, the least-squares line y = a + b N, the per-shard cost between
consecutive sizes (the last over the first is about 1 when the growth is linear, (N3 + N2) / (N2 + N1)
when quadratic), and the projection to 140,000 shards against the goals.

    python -m benchmarks.control_plane                            # local: 1k, 10k, 50k
    python -m benchmarks.control_plane --s3 --s3-sizes 1000 10000  # and SeaweedFS S3 at 1k and 10k
    python -m benchmarks.control_plane --smoke                     # 10 and 20 shards: the code paths
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import io
import itertools
import os
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

from benchmarks.record import Record, alternate, parse

PROJECT_TO = 140_000
GOALS = {"local": 30.0, "s3": 120.0}   # seconds for a no-op rerun over 140,000 done shards
MEMORY_GOAL_MB = 1024.0
THROUGHPUT_GOAL = 50.0                 # shards/s per driver with 2 workers, null backend
SHARD_SAMPLES = 4                      # samples in the one tiny tar every input links to
IMAGE_SIZE = 64
ERROR_SHARE = 0.01                     # shards whose latest ledger has error rows, in state 'errors'
BUILD_THREADS = 16
OTHER_PROMPT = "Describe the image in one sentence."   # the second version's prompt (a second fingerprint)
STATES = ("half", "done", "errors", "versions")
NO_OP_STATES = ("done", "versions")
SMOKE = {"sizes": [10, 20], "throughput_shards": 4, "latency_ms": 5.0, "rounds": 1}


@dataclass
class Measured:
    storage: str
    n: int
    state: str
    plan_s: float
    plan_requests: dict
    peak_rss_mb: float
    import_s: float                    # importing pipelines/recaption.py in the fresh process
    noop_s: float | None = None
    noop_requests: dict = field(default_factory=dict)
    pending: int = 0


# ----- building inputs and outputs

class Template:
    """One tiny img2dataset shard ('.tar', '.parquet', '_stats.json'), the source of every input and output file.

    Files are hard links to it; ext4 allows 65,000 links to one file, so a fresh copy takes over when they run out.
    """

    def __init__(self, folder: Path):
        from dataset.synthetic.input_shards import write_shard

        folder.mkdir(parents=True, exist_ok=True)
        write_shard(folder, 0, SHARD_SAMPLES, image_size=IMAGE_SIZE)
        self.folder = folder
        self.files = {suffix: folder / f"00000{suffix}" for suffix in (".tar", ".parquet", "_stats.json")}
        self.copies = 0
        self.lock = threading.Lock()

    def data(self, suffix: str) -> bytes:
        return self.files[suffix].read_bytes()

    def link(self, suffix: str, target: str | Path) -> None:
        source = self.files[suffix]
        try:
            os.link(source, target)
        except OSError as e:
            if e.errno != errno.EMLINK:
                raise
            with self.lock:
                if self.files[suffix] == source:
                    self.copies += 1
                    copy = self.folder / f"copy{self.copies}{suffix}"
                    shutil.copyfile(source, copy)
                    self.files[suffix] = copy   # other threads link to it from now on
            self.link(suffix, target)


def shard_names(n: int) -> list[str]:
    return [f"{i:06d}" for i in range(n)]


def write_inputs(folder: str, n: int, template: Template) -> None:
    """N input shards with their img2dataset files: hard links locally, one PUT each on S3."""
    from dataset import storage

    jobs = [(suffix, storage.join(folder, f"{name}{suffix}")) for name in shard_names(n) for suffix in template.files]
    if storage.is_remote(folder):
        data = {suffix: template.data(suffix) for suffix in template.files}
        with ThreadPoolExecutor(BUILD_THREADS) as pool:
            list(pool.map(lambda job: storage.write_bytes(job[1], data[job[0]]), jobs))
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    for suffix, path in jobs:
        template.link(suffix, path)


def fake_rows(errors: int) -> list[dict]:
    """The fields of a shard's rows that `make_ledger` counts: SHARD_SAMPLES rows, `errors` of them errors."""
    ok = {"status": "ok", "error": None, "num_tokens": 3, "quality": ""}
    bad = {"status": "error", "error": "decode: benchmark", "num_tokens": 0, "quality": None}
    return [ok] * (SHARD_SAMPLES - errors) + [bad] * errors


def commit_shards(store, inputs: str, names: list[str], job, staging: Path, template: Template,
                  generation: int = 0, errors: int = 0) -> None:
    """Commit each shard as a run would: an Attempt puts its files (hard links of one file) and commits a ledger."""
    from dataset import storage
    from dataset.outputs import make_ledger
    from dataset.protocol import claimed_attempt

    files = {"parquet": ".parquet", "wds": ".tar"}   # kind -> the template file it links to

    def commit(name: str) -> None:
        with claimed_attempt(store, name, generation, holder="benchmark") as attempt:
            for kind, source in files.items():
                local = staging / f"{name}.{attempt.attempt_id}.{kind}"
                template.link(source, local)   # put() consumes its local file
                attempt.put(kind, str(local), rows=SHARD_SAMPLES)
            now = time.time()
            ledger = make_ledger(fake_rows(errors), input=storage.join(inputs, f"{name}.tar"),
                                 fingerprint=job.fingerprint, caption_config=job.caption_config(),
                                 samples_in=SHARD_SAMPLES, started_at=now - 1, finished_at=now, worker="benchmark",
                                 attempt=1)
            if attempt.commit(ledger) != "committed":
                raise RuntimeError(f"shard {name}: generation {generation} was committed already")

    staging.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(BUILD_THREADS) as pool:
        list(pool.map(commit, names))


def run_argv(inputs: str, out: str, model: str, state: str) -> list[str]:
    """The users' command for a rerun in `state` (null backend, 2 workers)."""
    argv = ["--input", inputs, "--output", out, "--model", model, "--backend", "null", "--num-workers", "2",
            "--progress-every", "3600"]
    if state == "versions":
        argv += ["--prompt", OTHER_PROMPT, "--new-version"]
    if state == "errors":
        argv += ["--retry-errors"]
    return argv


def pinned_job(argv: list[str]):
    from pipelines.recaption import config_from_args, parse_args

    return config_from_args(parse_args(argv)).job.pinned()


# ----- measuring, each in a fresh process

def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmHWM in /proc/self/status")


def measure(argv: list[str], state: str, storage_name: str, n: int, fingerprint: str) -> Measured:
    """In a fresh process: the no-op rerun (states where it is one), then planning alone of the version
    `fingerprint` (pinned by the parent: pinning is part of the rerun, not of planning)."""
    started = time.perf_counter()
    from pipelines import recaption as recaption_cli

    import_s = time.perf_counter() - started
    from dataset import storage
    from dataset.versions import Output
    from recaption.stage import plan_captions as plan

    out = argv[argv.index("--output") + 1]
    result = Measured(storage_name, n, state, 0.0, {}, 0.0, import_s)
    if state in NO_OP_STATES:
        storage.REQUESTS.clear()
        printed = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            code = recaption_cli.main(argv)
        result.noop_s = time.perf_counter() - started
        result.noop_requests = dict(storage.REQUESTS)
        if code != 0 or "nothing pending" not in printed.getvalue():
            raise RuntimeError(f"the rerun was not a no-op (exit {code}):\n{printed.getvalue()[-3000:]}")
    store = Output.open(out, fingerprint).store
    storage.REQUESTS.clear()
    started = time.perf_counter()
    work = plan(argv[argv.index("--input") + 1], store, retry_errors=state == "errors")
    result.plan_s = time.perf_counter() - started
    result.plan_requests = dict(storage.REQUESTS)
    result.pending = len(work.tasks)
    result.peak_rss_mb = peak_rss_mb()
    return result


@dataclass
class Throughput:
    storage: str
    shards: int
    latency_ms: float
    wall_s: float
    span_s: float
    peak_rss_mb: float
    requests: dict

    @property
    def shards_per_s(self) -> float:
        return self.shards / self.span_s


def delay_requests(latency_s: float) -> None:
    """Every storage request of this process waits `latency_s` first, as on a distant S3 (storage counts each
    request once, through `_count`, before making it)."""
    from dataset import storage

    count = storage._count

    def delayed(kind: str) -> None:
        time.sleep(latency_s)
        count(kind)

    storage._count = delayed


def throughput(argv: list[str], storage_name: str, n: int, latency_ms: float = 0.0) -> Throughput:
    """In a fresh process: a run over N pending shards; the span is first shard started .. last committed.
    With `latency_ms`, each of the driver's storage requests takes that much longer (the workers' do not)."""
    import ray

    from dataset import storage
    from dataset.versions import Output
    from pipelines import recaption as recaption_cli

    if latency_ms:
        delay_requests(latency_ms / 1000)
    storage.REQUESTS.clear()
    printed = io.StringIO()
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            code = recaption_cli.main(argv)
    finally:
        ray.shutdown()   # a process-pool child ends without atexit handlers: Ray's would leave its processes
    wall = time.perf_counter() - started
    requests = dict(storage.REQUESTS)
    if code != 0:
        raise RuntimeError(f"the run failed (exit {code}):\n{printed.getvalue()[-3000:]}")
    store = Output.open(argv[argv.index("--output") + 1]).store
    with ThreadPoolExecutor(BUILD_THREADS) as pool:
        ledgers = list(pool.map(store.read_ledger, store.done()))
    if len(ledgers) != n:
        raise RuntimeError(f"{len(ledgers)} of {n} shards committed")
    span = max(ledger["finished_at"] for ledger in ledgers) - min(ledger["started_at"] for ledger in ledgers)
    return Throughput(storage_name, n, latency_ms, wall, span, peak_rss_mb(), requests)


def in_fresh_process(function, *args):
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


# ----- one storage, every size

@dataclass
class Site:
    name: str      # 'local' | 's3'
    root: str      # a local folder or an s3:// prefix
    staging: Path  # local folder for the files an Attempt puts (consumed)


def median_of(rounds: list[Measured]) -> Measured:
    """The rounds' median of each timing and of the memory (request counts and pending are the same each round)."""
    def median(name: str) -> float | None:
        values = [getattr(m, name) for m in rounds]
        return None if values[0] is None else statistics.median(values)

    first = rounds[0]
    return Measured(first.storage, first.n, first.state, median("plan_s"), first.plan_requests, median("peak_rss_mb"),
                    median("import_s"), median("noop_s"), first.noop_requests, first.pending)


def measure_size(site: Site, n: int, model: str, template: Template, rounds: int,
                 record: Record) -> list[Measured]:
    """N input shards, and their output taken through STATES, measured in each `rounds` times (the median counts)."""
    from dataset import storage
    from dataset.outputs import RECAPTION_KINDS
    from dataset.versions import Output

    inputs, out = storage.join(site.root, f"n{n}", "shards"), storage.join(site.root, f"n{n}", "out")
    started = time.perf_counter()
    write_inputs(inputs, n, template)
    names = shard_names(n)
    first = pinned_job(run_argv(inputs, out, model, "done"))
    second = pinned_job(run_argv(inputs, out, model, "versions"))   # another prompt: another fingerprint
    store = Output.register(out, first.fingerprint, first.caption_config(), False, RECAPTION_KINDS).store
    commit_shards(store, inputs, names[::2], first, site.staging, template)
    results = []
    for state in STATES:
        if state == "done":
            commit_shards(store, inputs, names[1::2], first, site.staging, template)
        elif state == "errors":
            failing = names[:: round(1 / ERROR_SHARE)]
            commit_shards(store, inputs, failing, first, site.staging, template, generation=1, errors=1)
        elif state == "versions":
            later = Output.register(out, second.fingerprint, second.caption_config(), True, RECAPTION_KINDS).store
            commit_shards(later, inputs, names, second, site.staging, template)
        fingerprint = (second if state == "versions" else first).fingerprint
        measured = [in_fresh_process(measure, run_argv(inputs, out, model, state), state, site.name, n, fingerprint)
                    for _ in range(rounds)]
        result = median_of(measured)
        print(row_line(result), flush=True)
        record.figures[f"{site.name} {n} {state}"] = {
            "rounds": [asdict(m) for m in measured], "median": asdict(result)}
        results.append(result)
    print(f"  ({site.name}, {n:,} shards: inputs and outputs built in {time.perf_counter() - started:.0f} s "
          "including the measurements)", flush=True)
    return results


def measure_throughput(site: Site, n: int, model: str, template: Template, latency_ms: float = 0.0,
                       attempt: int = 0) -> Throughput:
    from dataset import storage

    run = f"run{n}-{latency_ms:g}ms-{attempt}"
    inputs, out = storage.join(site.root, run, "shards"), storage.join(site.root, run, "out")
    write_inputs(inputs, n, template)
    return in_fresh_process(throughput, run_argv(inputs, out, model, "run"), site.name, n, latency_ms)


# ----- report

def requests_text(requests: dict) -> str:
    return ", ".join(f"{kind} {count:,}" for kind, count in sorted(requests.items())) or "none"


HEADER = (f"{'storage':<8}{'shards':>8}  {'state':<9}{'import s':>9}{'no-op s':>9}{'plan s':>8}{'pending':>9}"
          f"{'RSS MB':>8}   "
          "requests: no-op rerun | planning alone")


def row_line(m: Measured) -> str:
    noop = f"{m.noop_s:9.2f}" if m.noop_s is not None else f"{'-':>9}"
    noop_requests = requests_text(m.noop_requests) if m.noop_s is not None else "-"
    return (f"{m.storage:<8}{m.n:>8,}  {m.state:<9}{m.import_s:9.2f}{noop}{m.plan_s:8.2f}{m.pending:>9,}"
            f"{m.peak_rss_mb:8.0f}   {noop_requests} | {requests_text(m.plan_requests)}")


@dataclass
class Fit:
    intercept: float
    slope: float             # per shard
    r2: float
    marginal: list[float]    # per-shard cost between consecutive sizes

    def at(self, n: float) -> float:
        return self.intercept + self.slope * n

    @property
    def growth(self) -> float | None:
        """The last per-shard cost over the first: about 1 when linear, (N3 + N2) / (N2 + N1) when quadratic."""
        first, last = self.marginal[0], self.marginal[-1]
        return last / first if len(self.marginal) > 1 and first > 0 else None

    def verdict(self, sizes: list[int]) -> str:
        if self.growth is None:
            return "two sizes: linearity from the local sizes and the request counts"
        n1, n2, n3 = sizes[-3:]
        quadratic = (n3 + n2) / (n2 + n1)
        linear = self.growth < (1 + quadratic) / 2
        return (f"per-shard cost ratio {self.growth:.2f}, 1 if linear, {quadratic:.1f} if quadratic: "
                f"{'linear' if linear else 'NOT linear'}")


def fit(points: list[tuple[int, float]]) -> Fit:
    """Least squares y = a + b N over the sizes, and the per-shard cost between consecutive sizes."""
    points = sorted(points)
    xs, ys = [float(x) for x, _ in points], [y for _, y in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)
    intercept = mean_y - slope * mean_x
    total = sum((y - mean_y) ** 2 for y in ys)
    residual = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    marginal = [(y2 - y1) / (x2 - x1) for (x1, y1), (x2, y2) in itertools.pairwise(points)]
    return Fit(intercept, slope, 1.0 - residual / total if total > 0 else 1.0, marginal)


def goal_text(metric: str, storage_name: str, projected: float) -> str:
    goal = {"no-op s": GOALS[storage_name], "RSS MB": MEMORY_GOAL_MB}.get(metric)
    if goal is None:
        return ""
    return f"; goal <= {goal:.0f}: {'met' if projected <= goal else 'MISSED'}"


def report_fits(results: list[Measured], record: Record) -> None:
    print(f"\nfitted growth over N (least squares y = a + b N), projected to {PROJECT_TO:,} shards:")
    series: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
    for m in results:
        if m.noop_s is not None:
            series.setdefault((m.storage, m.state, "no-op s"), []).append((m.n, m.noop_s))
        series.setdefault((m.storage, m.state, "plan s"), []).append((m.n, m.plan_s))
        series.setdefault((m.storage, m.state, "RSS MB"), []).append((m.n, m.peak_rss_mb))
    for (storage_name, state, metric), points in series.items():
        if len(points) < 2:
            continue
        f = fit(points)
        unit = f"{f.slope * 1e3:.4f} ms" if metric.endswith(" s") else f"{f.slope * 1e3:.3f} KB"
        projected = f.at(PROJECT_TO)
        print(f"  {storage_name:<6}{state:<9}{metric:<8} a = {f.intercept:7.2f}, b = {unit} per shard, R2 {f.r2:.3f} "
              f"-> {projected:7.1f} at {PROJECT_TO // 1000}k{goal_text(metric, storage_name, projected)}")
        print(f"  {'':<23}{f.verdict(sorted(n for n, _ in points))}")
        record.figures[f"fit {storage_name} {state} {metric}"] = {
            "intercept": f.intercept, "per_shard": f.slope, "r2": f.r2, "marginal": f.marginal, "growth": f.growth,
            "projected_to": PROJECT_TO, "projected": projected,
            "goal": {"no-op s": GOALS[storage_name], "RSS MB": MEMORY_GOAL_MB}.get(metric)}


def report_throughput(t: Throughput, record: Record) -> None:
    ok = "met" if t.shards_per_s >= THROUGHPUT_GOAL else "MISSED"
    slower = f" + {t.latency_ms:g} ms per driver request" if t.latency_ms else ""
    print(f"\n{t.storage}{slower}: {t.shards} pending shards x {SHARD_SAMPLES} samples, null backend, 2 workers: "
          f"{t.shards_per_s:.1f} shards/s over {t.span_s:.1f} s (first start .. last commit; {t.wall_s:.1f} s with "
          f"Ray's start-up)   goal >= {THROUGHPUT_GOAL:.0f}: {ok}")
    per_shard = {kind: round(count / t.shards, 2) for kind, count in sorted(t.requests.items())}
    print(f"  driver: peak RSS {t.peak_rss_mb:.0f} MB; its storage requests per shard {per_shard} "
          "(workers' own requests not counted)")
    record.figures.setdefault(f"throughput {t.storage} +{t.latency_ms:g} ms", []).append(
        {**asdict(t), "shards_per_s": t.shards_per_s})


# ----- S3

@contextlib.contextmanager
def seaweed_bucket():
    """A SeaweedFS S3 server on loopback and a bucket on it, with this process's AWS environment pointed there
    (the measuring processes inherit it)."""
    from dataset import storage
    from tests.s3server import SeaweedS3

    saved = dict(os.environ)
    server = SeaweedS3()
    server.start()
    try:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            os.environ.pop(var, None)
        os.environ.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull, **server.env())
        server.client().create_bucket(Bucket="bench")
        storage.reset_s3_client()
        yield "s3://bench"
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved)
        storage.reset_s3_client()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000, 50000], help="local sizes (shards)")
    p.add_argument("--s3", action="store_true", help="also on SeaweedFS S3 (tests/s3server.py) on loopback")
    p.add_argument("--s3-sizes", type=int, nargs="*", default=[1000, 10000], help="S3 sizes (shards)")
    p.add_argument("--throughput-shards", type=int, default=500,
                   help="pending shards of the null-backend run with 2 workers (0: skip)")
    p.add_argument("--latency-ms", type=float, default=30.0,
                   help="run the local throughput run again with this much added to each of the driver's storage "
                        "requests, as on a distant S3 (0: skip)")
    p.add_argument("--rounds", type=int, default=3,
                   help="measurements of each state, and alternating throughput runs without / with the latency")
    p.add_argument("--workdir", help="build here instead of a temporary folder (kept afterwards)")
    a = parse(p, argv, SMOKE)
    record = Record("control_plane", a, argv)

    from recaption.tiny import build_tiny_llava

    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="ov-control-plane-"))
    try:
        model = str(build_tiny_llava(workdir / "model"))   # the null backend loads only its processor
        template = Template(workdir / "template")
        local = Site("local", str(workdir / "local"), workdir / "staging")
        print(f"{os.cpu_count()} cores; {SHARD_SAMPLES} samples of {IMAGE_SIZE} px per shard; outputs built through "
              f"Output.register + Attempt.put/commit; median of {a.rounds} fresh processes\n\n{HEADER}", flush=True)
        results = [m for n in a.sizes for m in measure_size(local, n, model, template, a.rounds, record)]
        runs = []
        if a.throughput_shards:
            latencies = sorted({0.0, a.latency_ms})
            attempts = iter(range(10**6))
            sides = {latency: lambda latency=latency: measure_throughput(local, a.throughput_shards, model, template,
                                                                         latency, next(attempts))
                     for latency in latencies}
            measured = alternate(a.rounds, sides)
            runs += [t for latency in latencies for t in measured[latency]]
            if a.latency_ms:
                record.compare(f"local null-backend throughput, {a.throughput_shards} shards, 2 workers", "shards/s",
                               ("no added latency", [t.shards_per_s for t in measured[0.0]]),
                               (f"+{a.latency_ms:g} ms per driver request",
                                [t.shards_per_s for t in measured[a.latency_ms]]))
        if a.s3:
            with seaweed_bucket() as bucket:
                s3 = Site("s3", f"{bucket}/bench", workdir / "staging")
                results += [m for n in a.s3_sizes for m in measure_size(s3, n, model, template, a.rounds, record)]
                if a.throughput_shards:
                    runs.append(measure_throughput(s3, a.throughput_shards, model, template))
        report_fits(results, record)
        for run in runs:
            report_throughput(run, record)
        record.write()
    finally:
        if not a.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
