"""The strategy contract, for every strategy in STRATEGIES (one line per strategy in CASES)."""

import math

import pytest
import torch

from clipcl.checkpoint import load_checkpoint, save_checkpoint, snapshot_state
from clipcl.config import config_fingerprint
from clipcl.data.streams import build_stream
from clipcl.engine.context import batch_by_hand
from clipcl.engine.runtime import Runtime
from clipcl.engine.tasks import standalone_context
from clipcl.models import build_backend
from clipcl.run import run_experiment, seed_everything
from clipcl.strategies import STRATEGIES, build_strategy

# name, strategy section, whether it trains
CASES = [
    ("zero_shot", {"name": "zero_shot"}, False),
    ("finetune", {"name": "finetune", "train": "all"}, True),
    ("finetune-image", {"name": "finetune", "train": "image"}, True),
    ("finetune-text", {"name": "finetune", "train": "text"}, True),
    ("wise_ft", {"name": "wise_ft", "train": "all", "alpha": 0.5}, True),
    ("lwf", {"name": "lwf", "train": "all"}, True),
    ("vr_lwf", {"name": "vr_lwf", "train": "all", "pseudo_texts": 16}, True),
    ("vr_lwf-zscl", {"name": "vr_lwf", "variant": "zscl", "train": "all", "pseudo_texts": 32}, True),
    ("er", {"name": "er", "memory_size": 16}, True),
    ("sit", {"name": "sit"}, True),
    ("finetune-adapter-image", {"name": "finetune", "train": "image", "peft": "adapter"}, True),
    ("zscl", {"name": "zscl", "train": "all", "reference_dataset": "synthetic-9", "reference_samples": 24,
              "reference_texts_dataset": "cifar10", "l2_weight": 0.01, "average_every": 2}, True),
    ("moe_adapters", {"name": "moe_adapters", "num_experts": 4, "top_k": 4, "ddas_steps": 20, "label_smoothing": 0.0,
                      "dropout": 0.0}, True),
    ("moe_adapters-shared", {"name": "moe_adapters", "num_experts": 2, "routers": "shared", "selector": "none",
                             "freeze_experts_per_task": 0, "train": "image", "label_smoothing": 0.0}, True),
    ("coleclip", {"name": "coleclip"}, True),
]


# Strategies that train on image-caption streams only (stream.protocol: captions or languages), which
# the matrix's labelled tasks cannot run; tests/test_modx.py and tests/test_languages.py cover their
# mechanics and their one-line refusal.
CAPTION_ONLY = {"mod_x", "cll_clip"}


def test_every_strategy_is_in_the_matrix():
    assert {section["name"] for _, section, _ in CASES} | CAPTION_ONLY == set(STRATEGIES)
    assert all(STRATEGIES[name].batch_kinds == ("captions",) for name in CAPTION_ONLY)


def build(config):
    """The strategy and stream of ``config``, with the strategy's sources built and attached."""
    seed_everything(config.seed)
    backend = build_backend(config.model)
    stream = build_stream(config.stream, config.seed)
    strategy = build_strategy(backend, config.strategy)
    standalone_context(config, strategy, stream, Runtime(torch.device("cpu")), None)
    return strategy, stream


def batch_of(strategy, images, targets, task):
    return batch_by_hand(strategy, images, targets, task=task)


@pytest.mark.parametrize("case, section, trains", CASES, ids=[case[0] for case in CASES])
def test_three_task_run_gives_finite_matrix(case, section, trains, tiny_run_config):
    results = run_experiment(tiny_run_config(section), show_progress=False)
    matrix = results["accuracy"]["matrix"]
    assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
    assert all(math.isfinite(value) and 0.0 <= value <= 100.0 for row in matrix for value in row)
    assert results["parameters"]["trainable"] > 0 if trains else results["parameters"]["trainable"] == 0


@pytest.mark.parametrize("case, section, trains", [c for c in CASES if c[2]], ids=[c[0] for c in CASES if c[2]])
def test_overfits_one_batch_and_leaves_frozen_parameters(case, section, trains, tiny_run_config):
    strategy, stream = build(tiny_run_config(section))
    task = stream.tasks[0]
    view = task.training_view(strategy.backend.train_preprocess)
    picks = list(range(16))
    if getattr(strategy.config, "label_space", "task") == "batch":
        # SIT's batch label space makes a one-class batch's loss zero: take two classes.
        picks = list(range(8)) + list(range(len(view) // 2, len(view) // 2 + 8))
    images = torch.stack([view[i][0] for i in picks])
    targets = torch.tensor([view[i][1] for i in picks])
    frozen = {name: p.detach().clone() for name, p in strategy.named_parameters() if not p.requires_grad}
    strategy.before_task(task)
    optimizer = torch.optim.AdamW(strategy.trainable_parameters(), lr=3e-3)
    strategy.train()
    losses = []
    for _ in range(30):
        loss = strategy(batch_of(strategy, images, targets, task), task)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # A clear drop, not a small one. (With the text tower frozen, the tiny random model's class
    # prompts differ by one token, so their embeddings are close and the loss has a floor near 1.3.)
    assert losses[-1] < 0.7 * losses[0], losses
    strategy.after_task(task)
    for name, parameter in strategy.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), f"frozen parameter {name} changed"


@pytest.mark.parametrize("case, section, trains", CASES, ids=[case[0] for case in CASES])
def test_checkpoint_round_trip(case, section, trains, tiny_run_config, tmp_path):
    config = tiny_run_config(section)
    strategy, stream = build(config)
    reference = snapshot_state(strategy)
    task = stream.tasks[0]
    strategy.before_task(task)
    if trains:
        view = task.training_view(strategy.backend.train_preprocess)
        images = torch.stack([view[i][0] for i in range(8)])
        targets = torch.tensor([view[i][1] for i in range(8)])
        optimizer = torch.optim.SGD(strategy.trainable_parameters(), lr=0.1)
        strategy(batch_of(strategy, images, targets, task), task)["loss"].backward()
        optimizer.step()
    strategy.after_task(task)
    path = tmp_path / "after_task_00.safetensors"
    save_checkpoint(path, strategy, reference, config_fingerprint(config), 0)

    fresh, _ = build(config)
    fresh.restore_structure(stream.tasks[:1])  # as the runner does before loading on resume
    assert load_checkpoint(path, fresh, config_fingerprint(config)) == 0
    for (name, tensor), (_, other) in zip(strategy.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(tensor, other), name
    strategy.eval()
    fresh.eval()
    probe = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(strategy.encode_images(probe, 0), fresh.encode_images(probe, 0))
