"""The flags every stage's command shares (workers, scheduling, claims, progress), with defaults from the
stage's `RunnerConfig`, and the config they make."""
from __future__ import annotations

import argparse
from dataclasses import replace

from runner.pool import DEFAULT_CPUS_WITH_GPU
from runner.run import RunnerConfig


def add_runner_arguments(group: argparse._ArgumentGroup, defaults: RunnerConfig) -> None:
    pool, schedule = defaults.pool, defaults.schedule
    group.add_argument("--num-workers", type=int, default=pool.num_workers,
                       help="actors, requested from the autoscaler on a cluster "
                            "(default: cluster GPUs / GPUs per worker; 1 without GPUs)")
    group.add_argument("--gpus-per-worker", type=float, default=pool.gpus_per_worker,
                       help="GPUs per actor (default: the engine's tensor-parallel size; 0 only on a local Ray "
                            "without GPUs)")
    group.add_argument("--cpus-per-worker", type=float, default=pool.cpus_per_worker,
                       help=f"CPUs per actor for reading and decoding (default: {DEFAULT_CPUS_WITH_GPU} with a GPU, "
                            "else 1)")
    group.add_argument("--start-timeout", type=float, default=pool.start_timeout,
                       help="seconds to wait for the first worker to start (no GPUs free, autoscaler slow) before "
                            "stopping with an error that names the resource (0: wait for ever)")
    group.add_argument("--max-attempts", type=int, default=schedule.max_attempts,
                       help="tries per shard before it is reported failed (a dead engine charges only the shards "
                            "it was working on)")
    group.add_argument("--worker-deaths-per-hour", type=float, default=pool.deaths_per_hour,
                       help="dead workers replaced per hour before the pool stops replacing (default: max(4, 2 x "
                            "workers))")
    group.add_argument("--claim-ttl", type=float, default=schedule.claim_ttl,
                       help="seconds without a renewal (by the storage's clock) after which another driver may take "
                            "a claimed shard (at least 5 on remote storage)")
    group.add_argument("--shard-deadline", type=float, default=schedule.deadline_factor,
                       help="abandon and retry a shard running longer than this many times the median shard time "
                            "(0: never)")
    group.add_argument("--speculate-after", type=float, default=schedule.speculate_after,
                       help="near the end, start a second attempt of a shard running longer than this many times "
                            "the median on an idle worker; the first commit wins (0: never)")
    group.add_argument("--cleanup-grace", type=float, default=schedule.cleanup_grace,
                       help="seconds a replaced generation's files stay readable before cleanup removes them")
    group.add_argument("--single-writer", action="store_true",
                       help="run on storage that ignores conditional writes (refused otherwise), with ONE driver only")
    group.add_argument("--progress-every", type=float, default=defaults.progress_every,
                       help="seconds between progress lines (and lines saying what the run waits for)")
    group.add_argument("--verbose", action="store_true",
                       help="show library warnings and worker output on the console (else in OUTPUT/_logs/)")


def runner_config(a: argparse.Namespace, defaults: RunnerConfig) -> RunnerConfig:
    pool = replace(defaults.pool, num_workers=a.num_workers, gpus_per_worker=a.gpus_per_worker,
                   cpus_per_worker=a.cpus_per_worker, deaths_per_hour=a.worker_deaths_per_hour,
                   start_timeout=a.start_timeout)
    schedule = replace(defaults.schedule, max_attempts=a.max_attempts, claim_ttl=a.claim_ttl,
                       deadline_factor=a.shard_deadline, speculate_after=a.speculate_after,
                       cleanup_grace=a.cleanup_grace)
    return replace(defaults, pool=pool, schedule=schedule, single_writer=a.single_writer,
                   progress_every=a.progress_every, verbose=a.verbose,
                   gpu_hour_price=getattr(a, "gpu_hour_price", defaults.gpu_hour_price))
