"""The public entry point of a run: ``run_experiment`` (see :mod:`clipcl.engine.run`)."""

from clipcl.engine.context import RunDirectory, RunError, seed_everything, task_seed
from clipcl.engine.run import run_experiment

__all__ = ["RunDirectory", "RunError", "run_experiment", "seed_everything", "task_seed"]
