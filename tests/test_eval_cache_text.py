"""Class text features: one canonical encode per model state, cached with no stale hit, and the
matrices with and without the caches identical."""

import pytest
import torch

from clipcl.data.streams import build_stream
from clipcl.engine.runtime import Runtime
from clipcl.engine.tasks import model_states, standalone_context, train_one_task
from clipcl.eval.cache import FeatureCache
from clipcl.eval.evaluator import evaluate_row
from clipcl.eval.text_cache import RowText, cacheable_text_key, stream_classes
from clipcl.models import build_backend
from clipcl.run import seed_everything, task_seed
from clipcl.strategies import build_strategy
from clipcl.strategies.finetune import Finetune

CPU = Runtime(torch.device("cpu"))


def _setup(tiny_run_config, strategy, protocol="class_incremental"):
    datasets = ["synthetic-0"] if protocol == "class_incremental" else ["synthetic-0", "synthetic-1"]
    config = tiny_run_config(strategy, stream={"protocol": protocol, "datasets": datasets, "num_tasks": 3,
                                               "test_samples_per_task": 10, "heldout": ["synthetic-3"],
                                               "heldout_samples": 10},
                             train={"max_steps_per_task": 1, "batch_size": 8})
    seed_everything(0)
    strategy = build_strategy(build_backend(config.model), config.strategy)
    stream = build_stream(config.stream, config.seed)
    return config, strategy, stream, standalone_context(config, strategy, stream, CPU, None)


def _matrices(config, strategy, stream, context, caches):
    """Every row on the same model states, once per cache (None: uncached)."""
    matrices = [[] for _ in caches]
    for after_task in model_states(context):
        for matrix, cache in zip(matrices, caches):
            row, heldout, _ = evaluate_row(strategy, stream, after_task, CPU, 7, cache, show_progress=False)
            matrix.append((row, heldout))
    return matrices


@pytest.mark.parametrize("train, protocol", [("image", "class_incremental"), ("text", "multi_domain"),
                                             ("all", "class_incremental")])
def test_matrices_are_identical_with_and_without_the_caches(tiny_run_config, tmp_path, train, protocol):
    config, strategy, stream, context = _setup(tiny_run_config, {"name": "finetune", "train": train}, protocol)
    memory, disk = FeatureCache(None), FeatureCache(tmp_path / "cache")
    uncached, in_memory, on_disk = _matrices(config, strategy, stream, context, [None, memory, disk])
    assert uncached == in_memory == on_disk
    rows = len(stream.tasks) + 1
    text_entries = [key for key in memory._memory if memory._memory[key].shape[0] == len(stream_classes(stream))]
    # A frozen text tower: one text entry for the whole run; a trained one: a new entry per row.
    assert len(set(text_entries)) == (1 if train == "image" else rows)


def test_each_distinct_class_is_encoded_once_per_row(tiny_run_config, monkeypatch):
    _, strategy, stream, _ = _setup(tiny_run_config, {"name": "finetune", "train": "text"})
    encoded = []
    original = type(strategy).encode_classes

    def counting(self, classes, task_index):
        encoded.append([class_text.name for class_text in classes])
        return original(self, classes, task_index)

    monkeypatch.setattr(type(strategy), "encode_classes", counting)
    evaluate_row(strategy, stream, 1, CPU, 16, None, show_progress=False)
    assert len(encoded) == 1 and len(encoded[0]) == len(set(encoded[0])) == len(stream_classes(stream))
    encoded.clear()
    evaluate_row(strategy, stream, 1, CPU, 16, None, show_progress=False, shared_text=False)
    assert len(encoded) == len(stream.tasks) + len(stream.heldout)  # the old way: one encode per label space


def test_a_changed_text_tower_gets_no_stale_hit(tiny_run_config):
    _, strategy, stream, _ = _setup(tiny_run_config, {"name": "finetune", "train": "text"})
    cache, classes = FeatureCache(None), stream_classes(stream)
    before = RowText(strategy, classes, CPU, cache).features(classes, None)
    with torch.no_grad():
        next(strategy.backend.text_tower.parameters()).add_(0.05)
    after = RowText(strategy, classes, CPU, cache).features(classes, None)
    fresh = RowText(strategy, classes, CPU, None).features(classes, None)
    assert torch.equal(after, fresh) and not torch.equal(after, before)
    assert cache.hits == 0 and cache.misses == 2


def test_the_text_cache_persists_on_disk_and_keys_the_template(tiny_run_config, tmp_path):
    _, strategy, stream, _ = _setup(tiny_run_config, {"name": "finetune", "train": "image"})
    classes = stream_classes(stream)
    first = RowText(strategy, classes, CPU, FeatureCache(tmp_path)).features(classes, None)
    reread = FeatureCache(tmp_path)
    assert torch.equal(RowText(strategy, classes, CPU, reread).features(classes, None), first)
    assert reread.hits == 1
    ensemble_key = cacheable_text_key(strategy, None)
    strategy.config.template = "a photo of a {}."
    assert cacheable_text_key(strategy, None) != ensemble_key


def test_an_encode_override_without_a_key_is_not_cached(tiny_run_config):
    _, strategy, _, _ = _setup(tiny_run_config, {"name": "finetune"})

    class Shifted(Finetune):
        def encode_classes(self, classes, task_index):
            return super().encode_classes(classes, task_index) * 0.5

    assert cacheable_text_key(strategy, None) is not None
    strategy.__class__ = Shifted
    assert cacheable_text_key(strategy, None) is None


def test_the_image_key_holds_the_batch_size(tiny_run_config):
    _, strategy, stream, _ = _setup(tiny_run_config, {"name": "finetune"})
    dataset, image_key = stream.tasks[0].test, strategy.image_cache_key(None)
    assert FeatureCache.key_for(image_key, dataset, CPU, 16) != FeatureCache.key_for(image_key, dataset, CPU, 32)


def test_the_evaluation_batch_size_is_the_users_or_the_devices():
    from clipcl.eval.evaluator import AUTO_BATCH_SIZE, eval_batch_size

    assert eval_batch_size(7, torch.device("cpu")) == 7
    assert eval_batch_size(None, torch.device("cpu")) == AUTO_BATCH_SIZE["cpu"]
    assert eval_batch_size(None, torch.device("cuda")) == AUTO_BATCH_SIZE["cuda"]


def test_reading_the_loss_every_few_steps_records_the_same_losses(tiny_run_config):
    losses = []
    for read_every in (1, 3):
        config, strategy, stream, context = _setup(tiny_run_config, {"name": "finetune"})
        config.train.max_steps_per_task = 4
        context.trainer.read_every = read_every
        task = stream.tasks[0]
        strategy.before_task(task)
        seed_everything(task_seed(config.seed, 0))
        losses.append(train_one_task(context, task).losses)
    assert len(losses[0]) == 4 and losses[0] == losses[1]
