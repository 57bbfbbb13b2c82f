"""Run-level behaviour: resume, data parallel equivalence, per-image evaluation, cache, errors."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clipcl.checkpoint import CheckpointError, load_checkpoint
from clipcl.cli import main
from clipcl.config import ConfigError, config_fingerprint, load_config
from clipcl.data.base import SubsetDataset
from clipcl.data.streams import build_stream
from clipcl.engine.runtime import Runtime
from clipcl.eval.cache import FeatureCache
from clipcl.eval.evaluator import evaluate_row, predict
from clipcl.models import build_backend
from clipcl.run import RunError, run_experiment, seed_everything
from clipcl.strategies import build_strategy

FINETUNE = {"name": "finetune", "train": "all"}


def test_resume_after_interruption_gives_same_results(tiny_run_config, tmp_path):
    full = run_experiment(tiny_run_config(FINETUNE, output_dir=str(tmp_path / "full")), show_progress=False)
    config = tiny_run_config(FINETUNE, output_dir=str(tmp_path / "resumed"))
    stopped = run_experiment(config, show_progress=False, stop_after_task=0)
    assert stopped["interrupted"]
    assert not (tmp_path / "resumed" / "results.json").exists()
    assert (tmp_path / "resumed" / "checkpoints" / "after_task_00.safetensors").exists()
    resumed = run_experiment(config, show_progress=False)
    assert resumed["accuracy"]["matrix"] == full["accuracy"]["matrix"]
    assert resumed["metrics"] == full["metrics"]
    assert [{key: value for key, value in entry.items() if not key.endswith("_seconds")}
            for entry in resumed["compute"]["per_task"]] == \
        [{key: value for key, value in entry.items() if not key.endswith("_seconds")}
         for entry in full["compute"]["per_task"]]


def test_two_processes_give_the_same_matrix_as_one(tiny_run_config, tmp_path):
    # Two gloo processes on global batches of 16 (8 each) against one process that accumulates the
    # same two micro-batches of 8: the same optimisation, so the matrices must be exactly equal.
    # (One process on whole batches of 16 differs only by float rounding, which Adam can amplify
    # into a different prediction on a near-tie.)
    one = run_experiment(tiny_run_config(FINETUNE, output_dir=str(tmp_path / "one"),
                                         train={"batch_size": 8, "grad_accumulation": 2}), show_progress=False)
    two = run_experiment(tiny_run_config(FINETUNE, output_dir=str(tmp_path / "two"),
                                         train={"batch_size": 16, "devices": 2}), show_progress=False)
    assert two["accuracy"]["matrix"] == one["accuracy"]["matrix"]
    assert two["accuracy"]["zero_shot_row"] == one["accuracy"]["zero_shot_row"]
    assert np.allclose(two["losses_first_last"], one["losses_first_last"], rtol=1e-6)
    # Compute accounting sums both processes' tower passes: the same spending as the one process.
    counters = ("samples_seen", "optimizer_steps", "image_forward", "image_backward", "text_forward", "text_backward")
    assert [{key: entry[key] for key in counters} for entry in two["compute"]["per_task"]] == \
        [{key: entry[key] for key in counters} for entry in one["compute"]["per_task"]]
    # Stronger than equal accuracies: the trained weights after every task are bitwise equal.
    for task in range(3):
        name = f"checkpoints/after_task_{task:02d}.safetensors"
        weights_one, weights_two = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert weights_one.keys() == weights_two.keys() and len(weights_one) > 0
        for key in weights_one:
            assert torch.equal(weights_one[key], weights_two[key]), key


def _strategy_and_stream(config):
    seed_everything(config.seed)
    backend = build_backend(config.model)
    return build_strategy(backend, config.strategy).eval(), build_stream(config.stream, config.seed)


def test_predictions_do_not_depend_on_batch_size_or_composition(tiny_run_config):
    strategy, stream = _strategy_and_stream(tiny_run_config({"name": "zero_shot"}))
    runtime = Runtime(torch.device("cpu"))
    task = stream.tasks[1]
    classes, _ = stream.eval_label_space(2, 1)
    reference, _ = predict(strategy, task.test, classes, 1, runtime, batch_size=1)
    for batch_size in (7, 64):
        predictions, _ = predict(strategy, task.test, classes, 1, runtime, batch_size=batch_size)
        assert torch.equal(predictions, reference)
    # Same images, shuffled and mixed with another task's images: each keeps its prediction.
    order = np.random.default_rng(0).permutation(len(task.test))
    shuffled, _ = predict(strategy, SubsetDataset(task.test, order), classes, 1, runtime, batch_size=16)
    assert torch.equal(shuffled, reference[order])


def test_feature_cache_is_used_and_changes_nothing(tiny_run_config, tmp_path):
    strategy, stream = _strategy_and_stream(tiny_run_config({"name": "zero_shot"}))
    runtime = Runtime(torch.device("cpu"))
    cache = FeatureCache(tmp_path / "cache")
    # One entry per task's test images plus one for the row's class text features (clipcl.eval.text_cache).
    first = evaluate_row(strategy, stream, 0, runtime, 32, cache, show_progress=False)[0]
    assert cache.misses == 4 and cache.hits == 0
    second = evaluate_row(strategy, stream, 1, runtime, 32, cache, show_progress=False)[0]
    assert cache.hits == 4
    uncached = evaluate_row(strategy, stream, 1, runtime, 32, None, show_progress=False)[0]
    assert second == uncached
    # A fresh cache object reads the same features back from disk.
    disk = FeatureCache(tmp_path / "cache")
    assert evaluate_row(strategy, stream, 0, runtime, 32, disk, show_progress=False)[0] == first
    assert disk.hits == 4
    # Changing the image tower's weights changes the image keys: no stale features (the text still hits).
    with torch.no_grad():
        next(strategy.backend.image_tower.parameters()).add_(1.0)
    evaluate_row(strategy, stream, 0, runtime, 32, disk, show_progress=False)
    assert disk.misses == 3 and disk.hits == 5


def test_checkpoint_from_another_config_is_refused(tiny_run_config, tmp_path):
    config = tiny_run_config(FINETUNE)
    run_experiment(config, show_progress=False, stop_after_task=0)
    other = tiny_run_config({"name": "finetune", "train": "image"})
    with pytest.raises(RunError, match="another config"):
        run_experiment(other, show_progress=False)
    strategy, _ = _strategy_and_stream(other)
    with pytest.raises(CheckpointError, match="another config"):
        load_checkpoint(tmp_path / "run" / "checkpoints" / "after_task_00.safetensors", strategy,
                        config_fingerprint(other))


def test_config_errors_are_one_line(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.lrr'.*train.lr"):
        load_config(path, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="unknown strategy 'nope'.*finetune"):
        load_config(path, ["strategy.name=nope"])
    with pytest.raises(ConfigError, match="unknown key 'strategy.alpha'"):
        load_config(path, ["strategy.name=finetune", "strategy.alpha=0.3"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(path, ["train.batch_size=big"])
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(path, ["train.lr=fast"])
    assert load_config(path, ["train.lr=1e-4"]).train.lr == pytest.approx(1e-4)  # YAML reads this as text
    assert main(["run", str(path), "model.nme=x"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "unknown key 'model.nme'" in error[0]


def test_cli_run_report_and_unknown_dataset(tiny_run_config, tiny_config_path, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({
        "model": {"backend": "open_clip", "name": tiny_config_path},
        "stream": {"protocol": "xtail", "datasets": ["synthetic-0", "synthetic-1"], "test_samples_per_task": 30},
        "strategy": {"name": "finetune", "train": "text"},
        "train": {"batch_size": 8, "max_steps_per_task": 2},
        "eval": {"cache_dir": ""},
        "output_dir": str(tmp_path / "cli-run"),
    }))
    assert main(["run", str(config), "--quiet"]) == 0
    run_dir = tmp_path / "cli-run"
    for name in ("config.yaml", "results.json", "summary.md", "accuracy_matrix.png", "task_accuracy.png",
                 "checkpoints/after_task_00.safetensors", "checkpoints/after_task_01.safetensors"):
        assert (run_dir / name).exists(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["accuracy"]["columns"] == ["synthetic-0", "synthetic-1"]
    assert {"transfer", "avg", "last", "bwt", "forgetting"} <= set(results["metrics"])
    capsys.readouterr()
    assert main(["report", str(run_dir), str(run_dir), "--output", str(tmp_path / "cmp.md")]) == 0
    assert "# Comparison" in (tmp_path / "cmp.md").read_text()
    assert main(["run", str(config), "--quiet", "stream.datasets=[no_such_dataset]",
                 f"output_dir={tmp_path / 'x'}"]) == 2
    assert "no_such_dataset" in capsys.readouterr().err


def test_bf16_autocast_run_is_finite(tiny_run_config, tmp_path):
    config = tiny_run_config(FINETUNE, train={"precision": "bf16", "max_steps_per_task": 2},
                             stream={"datasets": ["synthetic-0", "synthetic-1"]})
    results = run_experiment(config, show_progress=False)
    assert all(np.isfinite(row).all() for row in results["accuracy"]["matrix"])
    assert all(np.isfinite(pair).all() for pair in results["losses_first_last"])


def test_dont_stop_learning_protocol_in_a_run(tiny_run_config, tmp_path):
    # Multi-session class-incremental run with held-out data and a templated retrieval set: results
    # carry UT/ZS/A-Acc and retrieval before and after every phase, and survive a resume unchanged.
    sections = {"stream": {"protocol": "class_incremental", "datasets": ["synthetic-0"], "num_tasks": 2,
                           "heldout": ["synthetic-5"], "test_samples_per_task": 24},
                "eval": {"retrieval": ["synthetic-7"], "retrieval_images": 12}}
    full = run_experiment(tiny_run_config(FINETUNE, output_dir=str(tmp_path / "full"), **sections),
                          show_progress=False)
    retrieval = full["retrieval"]
    assert retrieval["sets"] == ["synthetic-7-templated"] and len(retrieval["after_each_task"]) == 2
    for row in [retrieval["zero_shot"], *retrieval["after_each_task"]]:
        assert set(row["synthetic-7-templated"]) == {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image")
                                                     for k in (1, 5, 10)}
    final = retrieval["after_each_task"][-1]["synthetic-7-templated"]["image_to_text_R@1"]
    start = retrieval["zero_shot"]["synthetic-7-templated"]["image_to_text_R@1"]
    assert full["metrics"]["i2t_r1_change"] == pytest.approx(final - start)
    matrix, sizes = full["accuracy"]["matrix"], full["task_test_sizes"]
    after_second = (matrix[1][0] * sizes[0] + matrix[1][1] * sizes[1]) / (sizes[0] + sizes[1])
    assert full["metrics"]["ut_acc"] == pytest.approx((matrix[0][0] + after_second) / 2)
    assert full["metrics"]["zs_acc"] == pytest.approx(full["heldout"]["after_each_task"][-1][0])

    config = tiny_run_config(FINETUNE, output_dir=str(tmp_path / "resumed"), **sections)
    assert run_experiment(config, show_progress=False, stop_after_task=0)["interrupted"]
    resumed = run_experiment(config, show_progress=False)
    assert resumed["retrieval"] == retrieval and resumed["metrics"] == full["metrics"]


def test_shipped_configs_load_by_name():
    from clipcl.config import load_config, shipped_configs

    names = set(shipped_configs())
    assert {"vr_lwf", "vr_lwf_zscl", "lwf", "zscl", "sit", "demo_multi_domain", "moe_adapters_mtil",
            "moe_adapters_cil"} <= names
    for name in names:
        config = load_config(name)
        assert config.model.backend == "starter"
    assert load_config("vr_lwf", ["stream.num_tasks=5"]).stream.num_tasks == 5
    assert load_config("vr_lwf_zscl").strategy["variant"] == "zscl"
    assert load_config("moe_adapters_mtil").strategy["num_experts"] == 22
    assert load_config("moe_adapters_cil").strategy["routers"] == "shared"
    with pytest.raises(ConfigError, match="shipped configs: .*vr_lwf"):
        load_config("no_such_config")
