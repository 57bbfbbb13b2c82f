"""Experiment trackers: TensorBoard, Weights & Biases and MLflow as observers of the run's events.

Each imports its package when it is built (by :func:`clipcl.engine.observers.build_observers`), so
importing this module costs nothing extra. They share one scheme of tags (:class:`ScalarTracker`).
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import random
import re
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from clipcl.engine.observers import Observer

# --- helpers --------------------------------------------------------------------------------


def numeric_values(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The entries of ``values`` that are numbers, as floats under ``prefix + key``; nested mappings are
    flattened with ``/`` and anything else (text, lists, None) is left out."""
    flat: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(numeric_values(value, f"{prefix}{key}/"))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def final_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """``final/<metric>`` for every numeric entry of ``results["metrics"]``."""
    metrics = results.get("metrics") or {}
    return numeric_values(metrics, "final/") if isinstance(metrics, Mapping) else {}


@contextlib.contextmanager
def random_states_preserved() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's CPU random states on exit, so a tracker that draws a run
    id from them cannot shift the run's random numbers."""
    import numpy as np
    import torch

    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)


def read_run_id(path: Path) -> str | None:
    """The tracker run id kept in ``path`` by an earlier start of this run, if any."""
    text = path.read_text().strip() if path.is_file() else ""
    return text or None


def write_run_id(path: Path, run_id: str) -> str:
    """Keep a tracker's run id in the run directory, so a resumed run appends to the same tracker run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


class ScalarTracker(Observer):
    """The event-to-scalar scheme every tracker shares; a tracker supplies :meth:`start` and
    :meth:`log_scalars`.

    Tags: ``train/<value>`` for every ``log_every``-th step, ``<kind>/<name>`` for evaluations,
    ``experience/<value>`` for an experience's summary and ``final/<metric>`` for the results' metrics,
    all at the global step (the last one seen, for the events that carry none).
    """

    def __init__(self, log_every: int = 1) -> None:
        self.log_every = log_every
        self.global_step = 0

    def start(self, config: dict, resumed_from: str | None) -> None:
        """Open the tracker's run (``self.global_step`` is already the step the run starts at)."""

    def log_scalars(self, values: dict[str, float], global_step: int) -> None:
        raise NotImplementedError

    def log_final(self, metrics: dict[str, float]) -> None:
        """The run's final metrics; by default scalars at the last step."""
        self.log_scalars(metrics, self.global_step)

    def flush(self) -> None:
        """Write what is buffered (called at the end of each experience and of the run)."""

    def _log(self, values: dict[str, float], global_step: int) -> None:
        self.global_step = max(self.global_step, global_step)
        if values:
            self.log_scalars(values, global_step)

    def run_started(self, output_dir: str, config: dict, resumed_from: str | None, *,
                    global_step: int = 0) -> None:
        self.global_step = global_step
        self.start(config, resumed_from)

    def step(self, experience: str, step: int, global_step: int, values: dict[str, float]) -> None:
        if global_step % self.log_every == 0:
            self._log(numeric_values(values, "train/"), global_step)
        else:
            self.global_step = max(self.global_step, global_step)

    def evaluated(self, kind: str, global_step: int, values: dict[str, float]) -> None:
        self._log(numeric_values(values, f"{kind}/"), global_step)

    def experience_finished(self, name: str, index: int, summary: dict[str, float]) -> None:
        self._log(numeric_values(summary, "experience/"), self.global_step)
        self.flush()

    def run_finished(self, results: dict) -> None:
        metrics = final_metrics(results)
        if metrics:
            self.log_final(metrics)
        self.flush()


class TensorBoardObserver(ScalarTracker):
    """TensorBoard event files in ``log_dir``, plus the config as text. A resumed run appends to the same
    directory and hides what was logged after its checkpoint (TensorBoard's purge step), so each curve
    reads as one run. TensorBoard stores scalars as float32."""

    def __init__(self, log_dir: str | Path, log_every: int = 1) -> None:
        from torch.utils.tensorboard import SummaryWriter

        super().__init__(log_every)
        self.log_dir = Path(log_dir)
        self._summary_writer = SummaryWriter
        self._writer = None

    def _open(self, purge_step: int | None = None):
        if self._writer is None:  # also when an event arrives without run_started
            self._writer = self._summary_writer(log_dir=str(self.log_dir), purge_step=purge_step)
        return self._writer

    def start(self, config: dict, resumed_from: str | None) -> None:
        # Steps after the checkpoint were maybe logged before the interruption; they are logged again.
        writer = self._open(purge_step=self.global_step + 1 if resumed_from is not None else None)
        if resumed_from is None:
            text = json.dumps(config, indent=2, sort_keys=True, default=str)
            writer.add_text("config", "    " + text.replace("\n", "\n    "), self.global_step)

    def log_scalars(self, values: dict[str, float], global_step: int) -> None:
        writer = self._open()
        for tag, value in values.items():
            writer.add_scalar(tag, value, global_step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbObserver(ScalarTracker):
    """Weights & Biases, offline unless ``WANDB_MODE`` or ``WANDB_API_KEY`` is set; files under
    ``<output_dir>/wandb``. The run id is kept in ``<output_dir>/wandb/clipcl_run_id``, so a resume
    appends to the same wandb run. Final metrics go to the run summary."""

    def __init__(self, output_dir: str | Path, project: str, log_every: int = 1) -> None:
        import wandb  # ImportError when not installed: build_observers turns it into one warning

        super().__init__(log_every)
        self._wandb = wandb
        self.output_dir = Path(output_dir)
        self.project = project
        self._run = None

    def start(self, config: dict, resumed_from: str | None) -> None:
        id_file = self.output_dir / "wandb" / "clipcl_run_id"
        # uuid4 reads os.urandom, not a seeded generator.
        run_id = read_run_id(id_file) or write_run_id(id_file, uuid.uuid4().hex[:16])
        configured = "WANDB_MODE" in os.environ or "WANDB_API_KEY" in os.environ
        with random_states_preserved():
            self._run = self._wandb.init(project=self.project, dir=str(self.output_dir), config=config,
                                         name=self.output_dir.name, id=run_id, resume="allow",
                                         mode=None if configured else "offline")

    def log_scalars(self, values: dict[str, float], global_step: int) -> None:
        if self._run is not None:
            self._run.log(values, step=global_step)

    def log_final(self, metrics: dict[str, float]) -> None:
        if self._run is not None:
            self._run.summary.update(metrics)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


_MLFLOW_UNSAFE = re.compile(r"[^\w\-. /:]")


class MLflowObserver(ScalarTracker):
    """MLflow through its client (no global active run): tracking URI from ``MLFLOW_TRACKING_URI``, else
    ``<output_dir>/mlflow/mlflow.db`` with artifacts beside it (MLflow 3 keeps the plain file store for
    legacy use only). The run id is kept in ``<output_dir>/mlflow/clipcl_run_id``, so a resume appends."""

    def __init__(self, output_dir: str | Path, experiment: str, log_every: int = 1) -> None:
        from mlflow.tracking import MlflowClient  # ImportError when not installed: see build_observers

        super().__init__(log_every)
        self.output_dir = Path(output_dir)
        self.experiment = experiment
        self._client_class = MlflowClient
        self._client = None
        self._run_id: str | None = None

    def start(self, config: dict, resumed_from: str | None) -> None:
        directory = (self.output_dir / "mlflow").resolve()
        uri, artifacts = os.environ.get("MLFLOW_TRACKING_URI"), None
        if not uri:
            directory.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{directory / 'mlflow.db'}", (directory / "artifacts").as_uri()
        id_file = directory / "clipcl_run_id"
        with random_states_preserved():
            client = self._client_class(tracking_uri=uri)
            self._run_id = read_run_id(id_file)
            if self._run_id is not None:
                client.update_run(self._run_id, status="RUNNING")
            else:
                experiment = client.get_experiment_by_name(self.experiment)
                experiment_id = (experiment.experiment_id if experiment is not None
                                 else client.create_experiment(self.experiment, artifact_location=artifacts))
                run = client.create_run(experiment_id, run_name=self.output_dir.name)
                self._run_id = write_run_id(id_file, run.info.run_id)
                client.log_dict(self._run_id, config, "config.json")
        self._client = client

    def log_scalars(self, values: dict[str, float], global_step: int) -> None:
        if self._client is not None and self._run_id is not None:
            for key, value in values.items():
                self._client.log_metric(self._run_id, _MLFLOW_UNSAFE.sub("_", key), value, step=global_step)

    def close(self) -> None:
        if self._client is not None and self._run_id is not None:
            self._client.set_terminated(self._run_id, status="FINISHED")
        self._client = None
