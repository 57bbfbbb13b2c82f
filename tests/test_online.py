"""Online (Si-Blurry) runs end to end, SIT's batch label space, and the ER reservoir."""

import json

import pytest
import torch

from clipcl.config import ConfigError, StreamConfig
from clipcl.data.memory import ReservoirMemory
from clipcl.data.online_stream import build_online_stream
from clipcl.data.streams import build_stream
from clipcl.eval.text_cache import RowText, stream_classes
from clipcl.models.tiny import tiny_open_clip_backend
from clipcl.run import RunError, run_experiment
from clipcl.strategies.finetune import Finetune, FinetuneConfig

ONLINE = {"protocol": "si_blurry", "datasets": ["synthetic-0", "synthetic-1"], "num_tasks": 3,
          "disjoint_class_ratio": 0.5, "blurry_sample_ratio": 0.1, "train_samples_per_task": 48,
          "test_samples_per_task": 60, "heldout": ["synthetic-5"]}


def online_config(tiny_run_config, strategy, tmp_path, name="run", **train):
    return tiny_run_config(strategy, stream=ONLINE, train={"batch_size": 8, "lr": 1e-3, "online_iter": 2, **train},
                           eval={"eval_period": 32, "batch_size": 32, "cache_dir": ""}, output_dir=str(tmp_path / name))


def test_online_run_gives_an_anytime_curve(tiny_run_config, tmp_path):
    config = online_config(tiny_run_config, {"name": "er", "memory_size": 16}, tmp_path)
    results = run_experiment(config, show_progress=False)
    anytime = results["anytime"]
    total = results["stream"]["samples"]
    assert total == 96  # 48 per dataset
    assert anytime["samples"] == [32, 64, 96]
    assert all(0.0 <= value <= 100.0 for value in anytime["accuracy"])
    assert results["metrics"]["a_last"] == anytime["accuracy"][-1]
    # 12 batches of 8 new samples, each used twice (online_iter = 2)
    assert results["timing"]["train_steps"] == 24
    # the first batch has no memory to replay; later ones replay up to 8 from the memory of 16
    assert 96 * 2 < results["timing"]["train_examples"] <= 2 * (96 + 88)
    # every class of the stream has arrived by its end, each once in the arrival order
    arrived = results["stream"]["arrival_order_of_classes"]
    assert len(arrived) == len(set(arrived)) == results["stream"]["classes"]
    assert results["heldout"]["datasets"] == ["synthetic-5"]
    assert (tmp_path / "run" / "results.json").exists() and (tmp_path / "run" / "summary.md").exists()
    assert "Anytime accuracy" in (tmp_path / "run" / "summary.md").read_text()
    # A finished online run is not trained again.
    assert run_experiment(config, show_progress=False) == json.loads((tmp_path / "run" / "results.json").read_text())
    # The same folder with another config is refused, not answered with the old results.
    with pytest.raises(RunError, match="another config"):
        run_experiment(online_config(tiny_run_config, {"name": "er", "memory_size": 8}, tmp_path), show_progress=False)
    # Same seed, same stream and same curve.
    again = run_experiment(online_config(tiny_run_config, {"name": "er", "memory_size": 16}, tmp_path, "again"),
                           show_progress=False)
    assert again["anytime"] == anytime


def test_strategies_that_need_task_boundaries_are_refused_online(tiny_run_config, tmp_path):
    # Refused by the config, before any model or data loads.
    with pytest.raises(ConfigError, match="needs task boundaries"):
        run_experiment(online_config(tiny_run_config, {"name": "vr_lwf"}, tmp_path), show_progress=False)


def test_sit_batch_label_space_on_a_hand_built_batch():
    stream = build_stream(StreamConfig(protocol="class_incremental", datasets=["synthetic-0"], num_tasks=1,
                                       test_samples_per_task=12), seed=0)
    task = stream.tasks[0]
    backend = tiny_open_clip_backend(seed=0)
    images = torch.stack([task.training_view(backend.preprocess)[i][0] for i in range(3)])
    targets = torch.tensor([3, 1, 3])
    strategy = Finetune(backend, FinetuneConfig(name="finetune", label_space="batch"))
    strategy.before_task(task)
    with torch.no_grad():
        loss = strategy({"images": images, "targets": targets}, task)["loss"]
        image_features = backend.encode_image(images)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        prompts = backend.tokenize([task.classes[i].templates[0].format(task.classes[i].name) for i in (1, 3)])
        text = backend.encode_text(prompts)
        text = text / text.norm(dim=-1, keepdim=True)
        logits = backend.logit_scale.exp() * image_features @ text.t()  # 2 columns: classes 1 and 3
        expected = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0, 1]))
        everything = Finetune(backend, FinetuneConfig(name="finetune"))
        everything.before_task(task)
        all_seen = everything({"images": images, "targets": targets}, task)["loss"]
    assert abs(loss.item() - expected.item()) < 1e-5
    assert abs(all_seen.item() - loss.item()) > 1e-4  # the 6-class loss differs


def test_er_reservoir_keeps_a_bounded_uniform_memory():
    memory = ReservoirMemory(10, seed=0)
    counts = torch.zeros(200)
    for start in range(0, 200, 8):
        replayed = memory.sample(8)
        assert len(replayed) == min(8, len(memory))
        assert set(replayed) <= set(memory.items)
        memory.add([(0, index) for index in range(start, start + 8)], [0] * 8)
        assert len(memory) == min(10, start + 8) and len(set(memory.items)) == len(memory)
    indices = [index for _, index in memory.items]
    for index in indices:
        counts[index] += 1
    assert memory.seen == 200 and all(0 <= index < 200 for index in indices)
    # Not simply the first or the last ten samples.
    assert sorted(indices) != list(range(10)) and sorted(indices) != list(range(190, 200))


@pytest.mark.parametrize("train", ["image", "all"])
def test_online_text_features_come_from_one_canonical_encode_cached_or_not(tiny_run_config, tmp_path, monkeypatch,
                                                                          train):
    encodes = []
    original = RowText._encode
    monkeypatch.setattr(RowText, "_encode", lambda self, classes, *rest: encodes.append(len(classes))
                        or original(self, classes, *rest))
    results = {}
    for cached in (True, False):
        config = online_config(tiny_run_config, {"name": "finetune", "train": train}, tmp_path, f"run-{cached}")
        config.eval.feature_cache = cached
        encodes.clear()
        results[cached] = run_experiment(config, show_progress=False)
        evaluations = len(results[cached]["anytime"]["samples"]) + 2  # the curve, held-out before and after
        assert set(encodes) == {len(stream_classes(build_online_stream(config.stream, config.seed)))}
        # With the cache, a frozen text tower is encoded once per run, and a trained one once per model
        # state (the held-out sets after the stream see the curve's last state).
        assert len(encodes) == (evaluations if not cached else 1 if train == "image" else evaluations - 1)
    for result in results.values():
        result["metrics"].pop("train_samples_per_second")  # a timing
    for key in ("anytime", "heldout", "metrics"):
        assert results[True][key] == results[False][key]
