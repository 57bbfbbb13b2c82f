"""Runs started by torchrun (env:// initialisation): the same numbers as one process."""

import json
import os
import subprocess
import sys

import yaml

from clipcl.config import to_dict
from clipcl.run import run_experiment

FINETUNE = {"name": "finetune", "train": "all"}


def test_torchrun_with_two_gloo_processes_gives_the_one_process_matrix(tiny_run_config, tmp_path):
    # As tests/test_run.py's spawned pair: two processes on global batches of 16 (8 each) against one
    # process accumulating the same two micro-batches of 8, so the matrices are exactly equal. Here
    # torchrun starts the processes and clipcl joins its group through env://; train.devices is
    # left at 1 and takes torchrun's world size.
    one = run_experiment(tiny_run_config(FINETUNE, output_dir=str(tmp_path / "one"),
                                         train={"batch_size": 8, "grad_accumulation": 2}), show_progress=False)
    config = tiny_run_config(FINETUNE, output_dir=str(tmp_path / "torchrun"), train={"batch_size": 16})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "clipcl.cli", "run", str(path), "--quiet"],
        capture_output=True, text=True, env=environment, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    two = json.loads((tmp_path / "torchrun" / "results.json").read_text())
    assert two["accuracy"]["matrix"] == one["accuracy"]["matrix"]
    assert two["accuracy"]["zero_shot_row"] == one["accuracy"]["zero_shot_row"]
    assert two["config"]["train"]["devices"] == 2
    counters = ("samples_seen", "optimizer_steps", "image_forward", "image_backward", "text_forward", "text_backward")
    assert [[entry[key] for key in counters] for entry in two["compute"]["per_task"]] == \
        [[entry[key] for key in counters] for entry in one["compute"]["per_task"]]


def test_torchrun_and_a_different_device_count_is_one_line(tiny_run_config, tmp_path, monkeypatch):
    import pytest

    from clipcl.config import ConfigError

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    config = tiny_run_config(FINETUNE, train={"batch_size": 12, "devices": 3})
    with pytest.raises(ConfigError, match="train.devices=3 but torchrun started 2 processes"):
        run_experiment(config, show_progress=False)
