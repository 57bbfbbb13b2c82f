"""Nothing lost, nothing stale, one clear line for every bad input (the run folder, resume, the CLI).

Small runs of the tiny open_clip model on synthetic data; each test states the case it guards.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from clipcl.checkpoint import DamagedCheckpoint, load_checkpoint
from clipcl.cli import main
from clipcl.config import ConfigError
from clipcl.data.base import DataError
from clipcl.data.captions import CaptionDataset
from clipcl.data.folders import ImageFolderDataset
from clipcl.engine.run_folder import LOCK_NAME, MARKER_NAME, RunLock
from clipcl.engine.trainer import TrainingDiverged
from clipcl.run import RunError, run_experiment

FINETUNE = {"name": "finetune", "train": "all"}
TWO_TASKS = {"datasets": ["synthetic-0", "synthetic-1"], "test_samples_per_task": 30}


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the lock file aside) with its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name != LOCK_NAME}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clipcl: error:"), err
    return err[0]


@pytest.fixture
def finished(tiny_run_config, tmp_path):
    """A finished two-task fine-tuning run, and the function that varies its config."""
    def make(**sections):
        sections.setdefault("stream", TWO_TASKS)
        sections.setdefault("train", {"max_steps_per_task": 2})
        return tiny_run_config(FINETUNE, **sections)

    config = make()
    results = run_experiment(config, show_progress=False)
    return config, results, make


# --- 1. --restart validates before it deletes ----------------------------------------------------


def test_restart_with_a_bad_config_keeps_the_finished_run(finished, tmp_path, tiny_config_path, capsys):
    config, _, make = finished
    run = Path(config.output_dir)
    before = _snapshot(run)
    assert {"results.json", "progress.json", "summary.md", "config.yaml", MARKER_NAME} <= set(before)
    # A dataset that does not exist: found only when the stream is built, after the config loaded.
    broken = make(stream={"datasets": ["synthetic-0", "no-such-dataset"]})
    with pytest.raises(DataError):
        run_experiment(broken, restart=True, show_progress=False)
    assert _snapshot(run) == before
    # The same through the command line, with a value the config check refuses.
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps({"model": {"backend": "open_clip", "name": tiny_config_path},
                                       "stream": TWO_TASKS, "output_dir": str(run)}))
    assert main(["run", str(config_file), "--restart", "--quiet", "train.lr=-1"]) == 2
    assert "train.lr" in _one_error_line(capsys)
    assert _snapshot(run) == before


def test_restart_replaces_the_run_once_the_new_one_is_built(finished):
    config, results, make = finished
    replaced = run_experiment(make(train={"max_steps_per_task": 2, "lr": 3e-3}), restart=True, show_progress=False)
    assert replaced["config"]["train"]["lr"] == 3e-3 and replaced["config_digest"] != results["config_digest"]
    run = Path(config.output_dir)
    assert not list(run.glob(".clipcl-replaced-*"))
    assert json.loads((run / MARKER_NAME).read_text())["config_digest"] == replaced["config_digest"]


def test_a_failed_first_run_leaves_no_folder(tiny_run_config, tmp_path):
    with pytest.raises(DataError):
        run_experiment(tiny_run_config(stream={"datasets": ["no-such-dataset"]}), show_progress=False)
    assert not (tmp_path / "run").exists()


# --- 2. a folder clipcl did not make --------------------------------------------------------------


@pytest.mark.parametrize("restart", [False, True])
def test_a_folder_clipcl_did_not_make_is_refused(tiny_run_config, tmp_path, restart):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.json").write_text('{"my": "own results"}')
    with pytest.raises(RunError, match="not made by clipcl"):
        run_experiment(tiny_run_config({"name": "zero_shot"}), restart=restart, show_progress=False)
    assert (folder / "results.json").read_text() == '{"my": "own results"}'
    assert sorted(path.name for path in folder.iterdir()) == ["results.json"]  # not even a lock file


# --- 3. two runs into one folder ------------------------------------------------------------------


def test_a_second_run_into_a_locked_folder_is_refused(tiny_run_config, tmp_path):
    config = tiny_run_config({"name": "zero_shot"}, stream=TWO_TASKS)
    holder = RunLock(config.output_dir).acquire()
    try:
        with pytest.raises(RunError, match="in use by another clipcl run"):
            run_experiment(config, show_progress=False)
    finally:
        holder.release()
    assert "matrix" in run_experiment(config, show_progress=False)["accuracy"]


def test_a_killed_run_does_not_leave_its_lock_stuck(tiny_run_config, tmp_path):
    config = tiny_run_config({"name": "zero_shot"}, stream=TWO_TASKS)
    script = ("import sys, time; from clipcl.engine.run_folder import RunLock; "
              f"lock = RunLock({config.output_dir!r}).acquire(); print('locked', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=f"pid {child.pid}"):
            run_experiment(config, show_progress=False)
    finally:
        os.kill(child.pid, signal.SIGKILL)  # as a crash would: no clean-up runs
        child.wait()
    assert "matrix" in run_experiment(config, show_progress=False)["accuracy"]


# --- 4. resume checks everything that changes a number --------------------------------------------


def test_resume_with_other_eval_settings_is_refused(tiny_run_config):
    config = tiny_run_config(FINETUNE, stream=TWO_TASKS, train={"max_steps_per_task": 2},
                             eval={"retrieval": ["synthetic-0"], "retrieval_images": 6})
    assert run_experiment(config, show_progress=False, stop_after_task=0)["interrupted"]
    config.eval.retrieval_images = 12
    with pytest.raises(RunError, match="another config"):
        run_experiment(config, show_progress=False)
    # What only changes how features are computed or stored does not block a resume.
    config.eval.retrieval_images = 6
    config.eval.batch_size = 7
    assert "matrix" in run_experiment(config, show_progress=False)["accuracy"]


def _image_folder(root: Path, colours: dict[str, tuple[int, int, int]], images: int = 4) -> None:
    for split in ("train", "test"):
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for number in range(images):
                shade = tuple(max(0, value - 20 * number) for value in colour)
                Image.new("RGB", (8, 8), shade).save(folder / f"{number}.png")


def test_resume_after_the_data_changed_is_refused(tiny_run_config, tmp_path):
    tree = tmp_path / "colours"
    _image_folder(tree, {"red": (250, 0, 0), "green": (0, 250, 0), "blue": (0, 0, 250)})
    config = tiny_run_config(FINETUNE, stream={"datasets": [f"imagefolder:{tree}", "synthetic-1"],
                                               "test_samples_per_task": 30},
                             train={"max_steps_per_task": 2})
    assert run_experiment(config, show_progress=False, stop_after_task=0)["interrupted"]
    # Swap two class folders: the same paths, other pixels behind them.
    for split in ("train", "test"):
        os.rename(tree / split / "red", tree / split / "swap")
        os.rename(tree / split / "green", tree / split / "red")
        os.rename(tree / split / "swap", tree / split / "green")
    with pytest.raises(RunError, match=r"the data of task imagefolder:.*changed"):
        run_experiment(config, show_progress=False)


# --- 5. damaged checkpoints -----------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte_of_the_data(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # the tensor data sits after the JSON header
    path.write_bytes(bytes(data))


def test_a_finished_run_with_a_truncated_last_checkpoint_still_returns_its_results(finished):
    config, results, _ = finished
    _truncate(Path(config.output_dir) / "checkpoints" / "after_task_01.safetensors")
    assert run_experiment(config, show_progress=False)["accuracy"] == results["accuracy"]


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte_of_the_data])
def test_a_damaged_checkpoint_is_named_and_the_run_can_go_back_to_an_intact_one(finished, tmp_path, damage,
                                                                                 capsys):
    _, results, make = finished
    config = make(output_dir=str(tmp_path / "interrupted"))
    run_experiment(config, show_progress=False, stop_after_task=0)
    checkpoint = Path(config.output_dir) / "checkpoints" / "after_task_00.safetensors"
    damage(checkpoint)
    with pytest.raises(RunError, match=r"after_task_00.safetensors is damaged.*--resume-from-intact"):
        run_experiment(config, show_progress=False)
    # Going back to the start (no earlier checkpoint) trains task 0 again from the same seed: the
    # numbers are those of the uninterrupted run.
    again = run_experiment(config, resume_from_intact=True, show_progress=False)
    assert again["accuracy"]["matrix"] == results["accuracy"]["matrix"]
    assert again["timing"]["train_steps"] == results["timing"]["train_steps"]


def test_a_checkpoint_whose_checksum_fails_is_refused_on_load(finished, tiny_run_config):
    config, _, _ = finished
    path = Path(config.output_dir) / "checkpoints" / "after_task_00.safetensors"
    _flip_a_byte_of_the_data(path)
    with pytest.raises(DamagedCheckpoint, match="checksum"):
        load_checkpoint(path, None, "")


# --- 7. one line for every bad input --------------------------------------------------------------


def test_zero_shot_row_false_measures_nothing_before_training(tiny_run_config):
    results = run_experiment(tiny_run_config(FINETUNE, stream=TWO_TASKS, train={"max_steps_per_task": 1},
                                             eval={"zero_shot_row": False}), show_progress=False)
    assert results["accuracy"]["zero_shot_row"] is None and results["timing"]["zero_shot_eval_seconds"] is None
    assert "zero_shot_avg" not in results["metrics"] and len(results["accuracy"]["matrix"]) == 2


def test_a_diverging_loss_is_one_line(tiny_run_config, capsys):
    with pytest.raises(TrainingDiverged, match="lower train.lr"):
        run_experiment(tiny_run_config(FINETUNE, stream=TWO_TASKS, train={"max_steps_per_task": 4, "lr": 1e30}),
                       show_progress=False)


def _write_config(path: Path, tiny_config_path: str, output_dir: Path, **extra) -> Path:
    path.write_text(json.dumps({"model": {"backend": "open_clip", "name": tiny_config_path},
                                "stream": TWO_TASKS, "strategy": {"name": "zero_shot"},
                                "eval": {"cache_dir": ""}, "output_dir": str(output_dir), **extra}))
    return path


def test_cli_errors_are_one_line_naming_the_file(tiny_config_path, tmp_path, capsys):
    config = _write_config(tmp_path / "ok.yaml", tiny_config_path, tmp_path / "run")
    cases = []
    # A folder given as the config.
    cases.append((["run", str(tmp_path), "--quiet"], "is a folder"))
    # A config that is not UTF-8.
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    cases.append((["run", str(latin), "--quiet"], "latin.yaml is not UTF-8"))
    # An output folder that cannot be made (its parent is a file).
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases.append((["run", str(config), "--quiet", f"output_dir={blocker / 'run'}"], "cannot write to output_dir"))
    # A usage mistake.
    cases.append((["run", str(config), "--no-such-flag"], "unrecognized arguments"))
    import torch

    if not torch.cuda.is_available():
        cases.append((["run", str(config), "--quiet", "train.accelerator=cuda"], "no CUDA device"))
    for argv, expected in cases:
        assert _exit_code(argv) == 2, argv
        assert expected in _one_error_line(capsys), argv
    assert not (tmp_path / "run").exists()


def _exit_code(argv: list[str]) -> int:
    """``main``'s exit code, whether it returns it or argparse raises it."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def test_damaged_progress_and_results_files_are_named(tiny_config_path, tmp_path, capsys):
    config = _write_config(tmp_path / "ok.yaml", tiny_config_path, tmp_path / "run")
    assert main(["run", str(config), "--quiet"]) == 0
    capsys.readouterr()
    for name in ("results.json", "progress.json"):
        path = tmp_path / "run" / name
        kept = path.read_bytes()
        path.write_bytes(b'{"rows": [[1, 2')
        assert main(["run", str(config), "--quiet"]) == 2
        assert f"{name} is damaged" in _one_error_line(capsys)
        path.write_bytes(kept)


def test_ctrl_c_and_internal_errors(tiny_config_path, tmp_path, capsys, monkeypatch):
    config = _write_config(tmp_path / "ok.yaml", tiny_config_path, tmp_path / "run")
    import clipcl.run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(clipcl.run, "run_experiment", interrupted)
    assert main(["run", str(config), "--quiet"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["clipcl: interrupted (rerun the same command to resume from the last checkpoint)"]

    def broken(*args, **kwargs):
        return {}["a bug"]

    monkeypatch.setattr(clipcl.run, "run_experiment", broken)
    assert main(["run", str(config), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err and "this is a bug in clipcl" in err


def test_an_empty_image_folder_class_is_refused(tmp_path):
    _image_folder(tmp_path / "tree", {"red": (250, 0, 0), "green": (0, 250, 0)})
    for image in (tmp_path / "tree" / "test" / "green").iterdir():
        image.unlink()
    with pytest.raises(DataError, match=r"class folder .*test/green holds no images"):
        ImageFolderDataset(tmp_path / "tree", "test")


def test_a_caption_file_that_is_not_utf8_is_named(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_bytes("image,caption\na.png,un caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="captions.csv is not UTF-8"):
        CaptionDataset(tmp_path / "captions.csv")


def test_config_error_is_still_a_value_error():
    # Code written against the old hierarchy keeps working.
    assert issubclass(ConfigError, ValueError) and issubclass(RunError, RuntimeError)


def test_a_user_error_in_a_worker_process_is_one_line(tiny_config_path, tmp_path, capsys):
    config = _write_config(tmp_path / "ok.yaml", tiny_config_path, tmp_path / "run")
    started = time.perf_counter()
    assert main(["run", str(config), "--quiet", "train.devices=2", "train.batch_size=2",
                 f"stream.datasets=[imagefolder:{tmp_path / 'absent'}]"]) == 2
    assert "does not exist" in _one_error_line(capsys)
    assert time.perf_counter() - started < 120


def test_a_damaged_mid_stream_checkpoint_is_named_and_the_stream_can_start_over(tiny_run_config, tmp_path):
    online = {"protocol": "si_blurry", "datasets": ["synthetic-0", "synthetic-1"], "num_tasks": 3,
              "disjoint_class_ratio": 0.5, "blurry_sample_ratio": 0.1, "train_samples_per_task": 48,
              "test_samples_per_task": 60}

    def config(name):
        return tiny_run_config({"name": "er", "memory_size": 16}, stream=online, output_dir=str(tmp_path / name),
                               train={"batch_size": 8, "lr": 1e-3}, eval={"eval_period": 32, "cache_dir": ""})

    full = run_experiment(config("full"), show_progress=False)
    interrupted = config("interrupted")
    assert run_experiment(interrupted, show_progress=False, stop_after_samples=40)["interrupted"]
    (state,) = (tmp_path / "interrupted" / "checkpoints").glob("online_state_*.safetensors")
    _flip_a_byte_of_the_data(state)
    with pytest.raises(DamagedCheckpoint, match=r"online_state_.*is damaged.*--resume-from-intact"):
        run_experiment(interrupted, show_progress=False)
    again = run_experiment(interrupted, resume_from_intact=True, show_progress=False)
    assert again["anytime"] == full["anytime"] and again["metrics"]["a_auc"] == full["metrics"]["a_auc"]


def test_an_unknown_dataset_is_refused_before_the_model_is_built(tiny_run_config, monkeypatch):
    import clipcl.models

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the dataset names were checked")

    monkeypatch.setattr(clipcl.models, "build_backend", never)
    with pytest.raises(DataError, match="unknown dataset 'no-such-dataset'"):
        run_experiment(tiny_run_config(stream={"datasets": ["synthetic-0", "no-such-dataset"]}), show_progress=False)


def test_run_outputs_get_the_mode_of_any_new_file(finished):
    config, _, _ = finished
    expected = 0o666 & ~_current_umask()
    for name in ("results.json", "progress.json", "config.yaml", "checkpoints/after_task_00.safetensors"):
        assert (Path(config.output_dir) / name).stat().st_mode & 0o777 == expected, name
    from clipcl.report import load_results, plot_run

    plots = plot_run(load_results(config.output_dir), config.output_dir)
    assert plots
    for path in plots:
        assert Path(path).stat().st_mode & 0o777 == expected, path


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_a_quiet_rerun_of_a_finished_run_says_so(finished, capsys):
    config, results, _ = finished
    capsys.readouterr()
    assert run_experiment(config, show_progress=False)["accuracy"] == results["accuracy"]
    assert "finished; its results are in" in capsys.readouterr().err


def test_restart_replaces_a_run_whose_progress_file_is_damaged(finished):
    config, results, _ = finished
    (Path(config.output_dir) / "progress.json").write_text('{"rows": [[1')
    with pytest.raises(RunError, match="progress.json is damaged"):
        run_experiment(config, show_progress=False)
    again = run_experiment(config, restart=True, show_progress=False)
    assert again["accuracy"]["matrix"] == results["accuracy"]["matrix"]


def test_eval_zero_shot_row_false_on_an_online_stream_with_heldout_sets(tiny_run_config, tmp_path, capsys):
    from clipcl.report import load_results, run_summary_markdown

    online = {"protocol": "si_blurry", "datasets": ["synthetic-0"], "num_tasks": 2, "train_samples_per_task": 24,
              "test_samples_per_task": 12, "heldout": ["synthetic-5"]}
    config = tiny_run_config({"name": "finetune"}, stream=online, train={"batch_size": 8},
                             eval={"eval_period": 16, "zero_shot_row": False})
    results = run_experiment(config, show_progress=False)
    assert results["heldout"]["zero_shot"] is None and "heldout_zero_shot" not in results["metrics"]
    assert "synthetic-5" in run_summary_markdown(load_results(config.output_dir))


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import clipcl.atomic_files
    from clipcl.atomic_files import atomic_path, atomic_write_text

    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="stopped"), atomic_path(target) as temporary:
        Path(temporary).write_text("half")
        raise RuntimeError("stopped")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]

    def refuse(source, destination):
        raise OSError("disk says no")

    monkeypatch.setattr(clipcl.atomic_files.os, "replace", refuse)
    with pytest.raises(OSError, match="disk says no"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
