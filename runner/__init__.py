"""What every distributed stage shares: planning, claims, the scheduler, the actor pool, progress and cost
lines, Ray start-up and log capture, and `run_stage`. A stage (recaption/stage.py, scoring/stage.py) is a
plug-in that says what its workers do with one shard (runner/stage.py has the interface)."""
