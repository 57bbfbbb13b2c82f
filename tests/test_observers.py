"""Observers read the run's events, write only on the main process, and never raise into the run."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from clipcl.engine.observers import (
    ObserveConfig,
    Observer,
    Observers,
    ObserverWarning,
    ProgressObserver,
    build_observers,
)

RESULTS = {"metrics": {"avg_last": 62.5, "forgetting": 3.25, "per_task": {"mnist": 81.0}, "note": "text",
                       "rows": [1.0, 2.0], "converged": True}, "config": {"seed": 0}}


class Recorder(Observer):
    """Keeps every event it receives, in order."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def run_started(self, output_dir, config, resumed_from, *, global_step=0):
        self.events.append(("run_started", output_dir, config, resumed_from, global_step))

    def experience_started(self, name, index, total_steps):
        self.events.append(("experience_started", name, index, total_steps))

    def step(self, experience, step, global_step, values):
        self.events.append(("step", experience, step, global_step, values))

    def evaluated(self, kind, global_step, values):
        self.events.append(("evaluated", kind, global_step, values))

    def experience_finished(self, name, index, summary):
        self.events.append(("experience_finished", name, index, summary))

    def run_finished(self, results):
        self.events.append(("run_finished", results))

    def close(self):
        self.events.append(("close",))


def send_run(observers: Observer, output_dir: str = "runs/x", *, start: int = 0, steps: int = 4,
             resumed_from: str | None = None, loss_offset: float = 0.0) -> None:
    """A two-experience run; losses are exact in float32 (k + offset + 0.5)."""
    observers.run_started(output_dir, {"seed": 0, "train": {"lr": 0.001}}, resumed_from, global_step=start)
    global_step = start
    for index, name in enumerate(["mnist", "digits"]):
        if global_step >= (index + 1) * steps:
            continue
        observers.experience_started(name, index, steps)
        for step in range(global_step - index * steps + 1, steps + 1):
            global_step += 1
            observers.step(name, step, global_step, {"loss": global_step + loss_offset + 0.5, "lr": 0.25})
        observers.evaluated("row", global_step, {"task/mnist": 80.0 + index, "task/digits": 40.5 + index})
        observers.experience_finished(name, index, {"steps": float(steps), "last_loss": 1.5})
    observers.run_finished(RESULTS)
    observers.close()


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def float32(value: float) -> float:
    """TensorBoard stores scalars as float32."""
    return float(np.float32(value))


def no_trackers(**overrides) -> ObserveConfig:
    return ObserveConfig(**{"progress": False, "tensorboard": False, **overrides})


def test_events_reach_every_observer_in_order():
    first, second = Recorder(), Recorder()
    send_run(Observers([first, second]))
    names = [event[0] for event in first.events]
    assert names == ["run_started", "experience_started", *["step"] * 4, "evaluated", "experience_finished",
                     "experience_started", *["step"] * 4, "evaluated", "experience_finished", "run_finished",
                     "close"]
    assert first.events == second.events
    assert [event[3] for event in first.events if event[0] == "step"] == list(range(1, 9))


def test_an_observer_gets_its_own_copy_of_each_event():
    class Meddler(Observer):
        def step(self, experience, step, global_step, values):
            values["loss"] = -1.0

    recorder = Recorder()
    values = {"loss": 2.5}
    Observers([Meddler(), recorder]).step("mnist", 1, 1, values)
    assert values == {"loss": 2.5}
    assert recorder.events[0][-1] == {"loss": 2.5}


def test_a_raising_observer_is_dropped_with_one_warning_and_the_others_go_on():
    class Broken(Observer):
        calls = 0

        def step(self, experience, step, global_step, values):
            Broken.calls += 1
            raise RuntimeError("disk full")

    recorder = Recorder()
    observers = Observers([Broken(), recorder])
    with pytest.warns(ObserverWarning, match="Broken failed in step.*disk full") as caught:
        send_run(observers)
    assert len([warning for warning in caught if issubclass(warning.category, ObserverWarning)]) == 1
    assert Broken.calls == 1
    assert len([event for event in recorder.events if event[0] == "step"]) == 8
    assert recorder.events[-1] == ("close",)


def test_tensorboard_scalars_read_back_exactly_as_sent(tmp_path):
    observers = build_observers(ObserveConfig(progress=False), str(tmp_path), is_main=True, show_progress=False)
    send_run(observers, str(tmp_path))
    scalars = read_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(step, float32(step + 0.5)) for step in range(1, 9)]
    assert scalars["train/lr"] == [(step, 0.25) for step in range(1, 9)]
    assert scalars["row/task/mnist"] == [(4, 80.0), (8, 81.0)]
    assert scalars["row/task/digits"] == [(4, 40.5), (8, 41.5)]
    assert scalars["experience/steps"] == [(4, 4.0), (8, 4.0)]
    # Only the numeric metrics (nested ones flattened); text, lists and booleans are left out.
    finals = {tag: points for tag, points in scalars.items() if tag.startswith("final/")}
    assert finals == {"final/avg_last": [(8, 62.5)], "final/forgetting": [(8, 3.25)],
                      "final/per_task/mnist": [(8, 81.0)]}


def test_tensorboard_logs_every_nth_step(tmp_path):
    observers = build_observers(ObserveConfig(progress=False, log_every=3), str(tmp_path), is_main=True,
                                show_progress=False)
    send_run(observers, str(tmp_path))
    scalars = read_scalars(tmp_path / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == [3, 6]
    assert [step for step, _ in scalars["row/task/mnist"]] == [4, 8]


def test_a_resumed_run_appends_to_the_same_tensorboard_curves(tmp_path):
    config = ObserveConfig(progress=False)
    # The first attempt logged 6 steps, then died; its last checkpoint was after step 4.
    first = build_observers(config, str(tmp_path), is_main=True, show_progress=False)
    first.run_started(str(tmp_path), {}, None)
    first.experience_started("mnist", 0, 4)
    for global_step in range(1, 7):
        first.step("mnist", global_step, global_step, {"loss": global_step + 0.5})
    first.close()
    resumed = build_observers(config, str(tmp_path), is_main=True, show_progress=False)
    send_run(resumed, str(tmp_path), start=4, resumed_from="checkpoint-4", loss_offset=100.0)
    assert [path.name for path in tmp_path.iterdir()] == ["tensorboard"]
    losses = read_scalars(tmp_path / "tensorboard")["train/loss"]
    # Steps 5 and 6 of the first attempt are hidden; the resumed run's take their place.
    assert losses == [(1, 1.5), (2, 2.5), (3, 3.5), (4, 4.5)] + [(step, step + 100.5) for step in range(5, 9)]


def test_nothing_is_written_off_the_main_process(tmp_path):
    config = ObserveConfig(wandb=True, mlflow=True)
    observers = build_observers(config, str(tmp_path), is_main=False, show_progress=True)
    assert len(observers) == 0
    send_run(observers, str(tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_that_is_not_installed_is_one_warning(tmp_path, monkeypatch, tracker):
    for module in (tracker, f"{tracker}.tracking"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import <tracker>` raise ImportError
    with pytest.warns(ObserverWarning, match=f"observe.{tracker}=true but {tracker} cannot be imported"):
        observers = build_observers(no_trackers(**{tracker: True}), str(tmp_path), is_main=True,
                                    show_progress=False)
    assert len(observers) == 0
    send_run(observers, str(tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_log_every_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match=r"^observe\.log_every must be an integer >= 1, got [^\n]*$"):
        ObserveConfig(log_every=value)


def test_the_progress_bar_follows_the_steps_and_leaves_nothing(capsys):
    progress = ProgressObserver()
    progress.experience_started("mnist", 0, 4)
    for step in (1, 2, 3):
        progress.step("mnist", step, step, {"loss": 0.75})
    assert (progress._bar.n, progress._bar.total, progress._bar.leave) == (3, 4, False)
    progress.experience_finished("mnist", 0, {})
    assert progress._bar is None
    # A bar resumed mid-experience starts at the step the run resumed from.
    progress.experience_started("digits", 1, 4)
    progress.step("digits", 3, 7, {"loss": 0.5})
    assert progress._bar.n == 3
    progress.close()
    assert "train digits" in capsys.readouterr().err


def test_observing_changes_no_random_state(tmp_path, capsys):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    send_run(build_observers(ObserveConfig(), str(tmp_path), is_main=True, show_progress=True), str(tmp_path))
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])


def fake_wandb(calls: list) -> types.ModuleType:
    """A stand-in for wandb that records calls and, like a careless tracker, draws random numbers."""

    class Run:
        def __init__(self):
            self.summary = {}

        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish", self.summary))

    def init(**keywords):
        random.random(), np.random.rand(), torch.rand(1)
        calls.append(("init", keywords))
        return Run()

    return types.SimpleNamespace(init=init)


def test_wandb_goes_offline_by_default_and_a_resume_keeps_its_run(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    send_run(build_observers(no_trackers(wandb=True), str(tmp_path), is_main=True, show_progress=False))
    assert torch.equal(torch.get_rng_state(), state)
    init = calls[0][1]
    assert (init["mode"], init["project"], init["resume"]) == ("offline", "clipcl", "allow")
    assert ("log", {"train/loss": 1.5, "train/lr": 0.25}, 1) in calls
    assert ("log", {"row/task/mnist": 80.0, "row/task/digits": 40.5}, 4) in calls
    assert calls[-1] == ("finish", {"final/avg_last": 62.5, "final/forgetting": 3.25, "final/per_task/mnist": 81.0})
    monkeypatch.setenv("WANDB_MODE", "online")
    send_run(build_observers(no_trackers(wandb=True), str(tmp_path), is_main=True, show_progress=False),
             start=8, resumed_from="checkpoint-8")
    resumed = [call[1] for call in calls if call[0] == "init"][1]
    assert resumed["mode"] is None and resumed["id"] == init["id"]


def test_mlflow_logs_through_its_client_to_a_store_in_the_run_directory(tmp_path, monkeypatch):
    calls: list = []

    class Client:
        def __init__(self, tracking_uri):
            calls.append(("client", tracking_uri))

        def get_experiment_by_name(self, name):
            return None

        def create_experiment(self, name, artifact_location=None):
            calls.append(("experiment", name, artifact_location))
            return "7"

        def create_run(self, experiment_id, run_name=None):
            calls.append(("run", experiment_id, run_name))
            return types.SimpleNamespace(info=types.SimpleNamespace(run_id="run-1"))

        def update_run(self, run_id, status):
            calls.append(("update", run_id, status))

        def log_dict(self, run_id, dictionary, artifact_file):
            calls.append(("dict", run_id, artifact_file))

        def log_metric(self, run_id, key, value, step):
            calls.append(("metric", key, value, step))

        def set_terminated(self, run_id, status):
            calls.append(("terminated", run_id, status))

    monkeypatch.setitem(sys.modules, "mlflow", types.ModuleType("mlflow"))
    monkeypatch.setitem(sys.modules, "mlflow.tracking", types.SimpleNamespace(MlflowClient=Client))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    send_run(build_observers(no_trackers(mlflow=True), str(tmp_path), is_main=True, show_progress=False))
    store = (tmp_path / "mlflow").resolve()
    assert calls[0] == ("client", f"sqlite:///{store / 'mlflow.db'}")
    assert ("experiment", "clipcl", (store / "artifacts").as_uri()) in calls
    assert ("metric", "train/loss", 1.5, 1) in calls and ("metric", "final/avg_last", 62.5, 8) in calls
    assert calls[-1] == ("terminated", "run-1", "FINISHED")
    calls.clear()
    send_run(build_observers(no_trackers(mlflow=True), str(tmp_path), is_main=True, show_progress=False),
             start=8, resumed_from="checkpoint-8")
    assert ("update", "run-1", "RUNNING") in calls and not [call for call in calls if call[0] == "run"]


def test_importing_the_observers_imports_no_tracker_or_torch():
    code = ("import sys, clipcl.engine.observers, clipcl.engine.trackers; "
            "print(sorted({'torch', 'tqdm', 'tensorboard', 'wandb', 'mlflow'} & set(sys.modules)))")
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env=environment).stdout
    assert output.strip() == "[]"
