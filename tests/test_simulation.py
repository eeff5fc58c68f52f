"""The commit protocol under the deterministic simulation (tests/simulation.py): thousands of seeded schedules of
drivers, workers and cleanups against a faulty in-memory S3 keep every row exactly once; and the simulation has
teeth: each rule whose absence lost rows before (issue 19, cases 1-4), taken away, is caught within a few seeds.
A failing seed replays exactly: `python -m tests.simulation --scenario NAME --seed N --verbose`."""
from __future__ import annotations

import contextlib

import pytest
import simulation

from dataset import claims, protocol, storage

# Per scenario: schedules in every `make test` (about 25 ms each on the 2-core machine).
SEEDS = {"random": 1200, "drivers-end": 200, "zombies": 200, "stalled-writers": 200, "refused-creates": 200}
# A defect must be found within this many schedules of the scenario shaped for it (each is found in under 40).
HUNT = 150


@pytest.mark.parametrize("scenario", simulation.SCENARIOS)
def test_every_row_exactly_once_across_seeded_schedules(scenario):
    summary = simulation.run_seeds(range(SEEDS[scenario]), name=scenario)
    print(f"{scenario}: {summary.line()}")
    assert summary.schedules == SEEDS[scenario] and summary.faults > summary.schedules
    assert not summary.failed, "\n".join(
        f"seed {r.seed} (replay: python -m tests.simulation --scenario {scenario} --seed {r.seed} --verbose):\n  "
        + "\n  ".join(r.violations[:5]) for r in summary.failed[:3])


@contextlib.contextmanager
def listing_view_of_ledgers():
    """Case 1, as the old sweep had it: a shard's ledgers as the cleaner's early listing saw them (a commit made
    since looks like leftovers) and a claim that is not held taken for 'nobody can commit'."""
    original = protocol.ShardStore._clean_shard

    def stale(self, listing, shard, attempts, cutoff):
        read = self.read_ledger
        self.read_ledger = lambda s, g=None: read(s, g) if g in listing.ledgers.get(s, {}) else None
        try:
            return original(self, listing, shard, attempts, cutoff)
        finally:
            del self.read_ledger

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(protocol.ShardStore, "_clean_shard", stale)
        patch.setattr(claims, "may_commit", lambda claim, attempt_id: claim is not None and claim["state"] == "held")
        yield


@contextlib.contextmanager
def cleanup_ignores_registrations():
    """Cases 1-2: files of attempts that can still commit are taken for leftovers."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(claims, "may_commit", lambda claim, attempt_id: False)
        yield


@contextlib.contextmanager
def commits_are_not_fenced():
    """Case 2: a retry shared its attempt's fence, so a worker reported lost could still commit."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(claims, "begin_commit", lambda base, shard, attempt_id: True)
        yield


@contextlib.contextmanager
def takeovers_forget_commit_intents():
    """Case 3: a writer stalled inside its commit past the ttl was not protected from the taker's cleanup."""
    record = claims._record
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(claims, "_record", lambda holder, token, state, ttl, attempts, committing:
                      record(holder, token, state, ttl, attempts, {}))
        yield


@contextlib.contextmanager
def own_ledger_taken_for_a_loss():
    """Case 4: a ledger create that landed but answered 'exists' (NFS EEXIST, S3 412 on a retry) made the attempt
    delete the files its own ledger names."""
    def commit(self, ledger):
        if not claims.begin_commit(self.store.base, self.shard, self.attempt_id):
            self.abandon()
            return "fenced"
        if storage.put_if_absent(self.store.ledger_path(self.shard, self.generation), protocol.dump(ledger)):
            return "committed"
        self.abandon()
        return "lost"

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(protocol.Attempt, "_commit", commit)
        yield


DEFECTS = {
    "the old sweep's view (case 1)": (listing_view_of_ledgers, "drivers-end"),
    "cleanup ignores registrations (cases 1-2)": (cleanup_ignores_registrations, "drivers-end"),
    "commits are not fenced (case 2)": (commits_are_not_fenced, "zombies"),
    "takeovers forget commit intents (case 3)": (takeovers_forget_commit_intents, "stalled-writers"),
    "own ledger taken for a loss (case 4)": (own_ledger_taken_for_a_loss, "refused-creates"),
}


@pytest.mark.parametrize("defect", DEFECTS)
def test_the_simulation_catches_each_defect_that_lost_rows_before(defect):
    mutation, scenario = DEFECTS[defect]
    with mutation():
        summary = simulation.run_seeds(range(HUNT), name=scenario, first_failure=True)
    assert summary.failed, f"{defect}: no violation in {HUNT} schedules of {scenario!r}: the simulation lost its teeth"
    found = summary.failed[0]
    assert any("gone" in v or "names" in v or "keys committed" in v for v in found.violations), found.violations
