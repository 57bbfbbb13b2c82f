"""Observers: progress bars and experiment trackers read the run's events and change nothing.

The trainer sends every event to one :class:`Observers` (built by :func:`build_observers`), which fans
it out. An observer only reads: each one gets its own copy of the event's dicts, an observer that
raises is reported once and dropped (training goes on), and trackers that draw ids from a random
generator are constructed with the global random states saved and restored. So turning an observer
on or off never changes a number of the run.

Steps are counted as completed optimizer steps: the first step of an experience reports ``step=1``
and ``global_step`` continues across experiences and across a resume.

The trackers (TensorBoard, Weights & Biases, MLflow) live in :mod:`clipcl.engine.trackers`. Importing
either module is cheap: tqdm and each tracker's package are imported when its observer is built.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipcl.config import ObserveConfig


class ObserverWarning(UserWarning):
    """An observer failed or could not start; the run goes on without it."""


class Observer:
    """Reads events; must never change a number or raise into the run. Every method is optional."""

    def run_started(self, output_dir: str, config: dict, resumed_from: str | None, *,
                    global_step: int = 0) -> None:
        """The run begins, or resumes from checkpoint ``resumed_from`` after ``global_step`` steps."""

    def experience_started(self, name: str, index: int, total_steps: int | None) -> None:
        """Training on experience ``index`` (0-based) begins; ``total_steps`` is None when unknown."""

    def step(self, experience: str, step: int, global_step: int, values: dict[str, float]) -> None:
        """One optimizer step finished: ``values`` holds ``loss``, ``lr`` and named loss terms."""

    def evaluated(self, kind: str, global_step: int, values: dict[str, float]) -> None:
        """An evaluation finished; ``kind`` is ``row``, ``anytime``, ``heldout`` or ``retrieval`` and
        ``values`` maps names such as ``task/mnist`` to numbers (accuracies in percent)."""

    def experience_finished(self, name: str, index: int, summary: dict[str, float]) -> None:
        """Training on experience ``index`` ended; ``summary`` holds its numbers (steps, seconds, losses)."""

    def run_finished(self, results: dict) -> None:
        """The run ended; ``results`` is the results.json content (final numbers under ``metrics``)."""

    def close(self) -> None:
        """Release files and connections; safe to call twice."""



def _private_copy(value: Any) -> Any:
    """A deep copy of an event's arguments, or the arguments themselves if they cannot be copied."""
    try:
        return copy.deepcopy(value)
    except Exception:  # noqa: BLE001 - an uncopyable config must not turn the observers off
        return value


class Observers(Observer):
    """Fans every event out to a list of observers, each with its own copy of the event's dicts.

    An exception in one observer is reported once, as an :class:`ObserverWarning`, and that observer
    is dropped for the rest of the run; it never reaches training.
    """

    def __init__(self, observers: list[Observer] | None = None) -> None:
        self._observers: list[Observer] = list(observers or [])

    @property
    def observers(self) -> list[Observer]:
        """The observers still receiving events (a copy)."""
        return list(self._observers)

    def __len__(self) -> int:
        return len(self._observers)

    def _dispatch(self, event: str, *arguments: Any, **keywords: Any) -> None:
        for observer in list(self._observers):
            # A copy per observer: no observer can change what the trainer or another observer sees.
            own_arguments, own_keywords = _private_copy(arguments), _private_copy(keywords)
            try:
                getattr(observer, event)(*own_arguments, **own_keywords)
            except Exception as error:  # noqa: BLE001 - an observer must never stop training
                self._drop(observer, event, error)

    def _drop(self, observer: Observer, event: str, error: Exception) -> None:
        self._observers.remove(observer)
        warnings.warn(f"observer {type(observer).__name__} failed in {event} ({type(error).__name__}: {error}); "
                      "it is turned off for the rest of the run", ObserverWarning, stacklevel=3)
        with contextlib.suppress(Exception):
            observer.close()

    def run_started(self, output_dir: str, config: dict, resumed_from: str | None, *,
                    global_step: int = 0) -> None:
        self._dispatch("run_started", output_dir, config, resumed_from, global_step=global_step)

    def experience_started(self, name: str, index: int, total_steps: int | None) -> None:
        self._dispatch("experience_started", name, index, total_steps)

    def step(self, experience: str, step: int, global_step: int, values: dict[str, float]) -> None:
        self._dispatch("step", experience, step, global_step, values)

    def evaluated(self, kind: str, global_step: int, values: dict[str, float]) -> None:
        self._dispatch("evaluated", kind, global_step, values)

    def experience_finished(self, name: str, index: int, summary: dict[str, float]) -> None:
        self._dispatch("experience_finished", name, index, summary)

    def run_finished(self, results: dict) -> None:
        self._dispatch("run_finished", results)

    def close(self) -> None:
        for observer in list(self._observers):
            try:
                observer.close()
            except Exception as error:  # noqa: BLE001
                self._drop(observer, "close", error)
        self._observers.clear()


# --- the progress bar ------------------------------------------------------------------------------


class ProgressObserver(Observer):
    """A tqdm bar per experience on stderr, with the last loss as its postfix; it leaves no trace."""

    def __init__(self) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self._bar = None

    def experience_started(self, name: str, index: int, total_steps: int | None) -> None:
        self._close_bar()
        self._bar = self._tqdm(total=total_steps, desc=f"train {name}", leave=False, dynamic_ncols=True)

    def step(self, experience: str, step: int, global_step: int, values: dict[str, float]) -> None:
        if self._bar is None:
            return
        if "loss" in values and math.isfinite(float(values["loss"])):
            self._bar.set_postfix(loss=f"{float(values['loss']):.3f}", refresh=False)
        # ``step`` counts completed steps, so a bar resumed mid-experience starts where the run was.
        self._bar.update(max(step - self._bar.n, 0))

    def experience_finished(self, name: str, index: int, summary: dict[str, float]) -> None:
        self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self._close_bar()




def _optional_observer(label: str, key: str, package: str, build: Callable[[], Observer]) -> Observer | None:
    """Build an observer whose package may be missing or broken: that is one warning, never an error."""
    try:
        return build()
    except ImportError as error:
        warnings.warn(f"observe.{key}=true but {package} cannot be imported ({error}; pip install {package}); "
                      f"{label} logging is off for this run", ObserverWarning, stacklevel=3)
    except Exception as error:  # noqa: BLE001 - a tracker must never stop the run
        warnings.warn(f"{label} could not start ({type(error).__name__}: {error}); its logging is off for this run",
                      ObserverWarning, stacklevel=3)
    return None


def build_observers(config: ObserveConfig, output_dir: str, *, is_main: bool, show_progress: bool) -> Observers:
    """The observers ``config`` asks for. Only the main process observes: elsewhere this is empty, so
    other processes write nothing and every process can send the same events."""
    if not is_main:
        return Observers([])
    from clipcl.engine import trackers

    output = Path(output_dir)
    candidates = [
        ("progress bar", "progress", "tqdm", config.progress and show_progress, ProgressObserver),
        ("TensorBoard", "tensorboard", "tensorboard", config.tensorboard,
         lambda: trackers.TensorBoardObserver(output / "tensorboard", config.log_every)),
        ("Weights & Biases", "wandb", "wandb", config.wandb,
         lambda: trackers.WandbObserver(output, config.wandb_project, config.log_every)),
        ("MLflow", "mlflow", "mlflow", config.mlflow,
         lambda: trackers.MLflowObserver(output, config.mlflow_experiment, config.log_every)),
    ]
    observers = [observer for label, key, package, wanted, build in candidates
                 if wanted and (observer := _optional_observer(label, key, package, build)) is not None]
    return Observers(observers)
