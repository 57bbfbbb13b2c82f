"""The engine: one trainer for task and online streams, named batch sources, runtime-owned inner fits."""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from clipcl.data.memory import ClassBalancedMemory, ReplaySpec, build_memory
from clipcl.data.sources import CaptionSpec, ReferenceSpec
from clipcl.engine.runtime import DistributedRuntime, Runtime, free_port, rendezvous_environment
from clipcl.losses import classification_loss, clip_logits, normalize
from clipcl.run import run_experiment
from clipcl.strategies import STRATEGIES
from clipcl.strategies.ddas import FeatureAutoencoder, fit_autoencoder
from clipcl.strategies.finetune import Finetune, FinetuneConfig

ONLINE = {"protocol": "si_blurry", "datasets": ["synthetic-0", "synthetic-1"], "num_tasks": 3,
          "disjoint_class_ratio": 0.5, "blurry_sample_ratio": 0.1, "train_samples_per_task": 48,
          "test_samples_per_task": 60, "heldout": ["synthetic-5"]}


def online_config(tiny_run_config, strategy, tmp_path, name, **train):
    return tiny_run_config(strategy, stream=ONLINE, train={"batch_size": 8, "lr": 1e-3, "online_iter": 2, **train},
                           eval={"eval_period": 32, "batch_size": 32, "cache_dir": ""}, output_dir=str(tmp_path / name),
                           observe={"progress": False, "tensorboard": False})


def measured(results: dict) -> dict:
    """What a run measured, without wall-clock times, dates and paths (compute: its counters only)."""
    return {key: value for key, value in results.items()
            if key not in ("timing", "created", "config", "host", "compute")} | {"compute": spent(results)} | {
        "metrics": {k: v for k, v in results["metrics"].items() if k != "train_samples_per_second"},
        "steps": results["timing"]["train_steps"], "examples": results["timing"]["train_examples"]}


@dataclass
class ToyConfig(FinetuneConfig):
    pass


# --- online streams: resume, data parallel ------------------------------------------------------------


def spent(results):
    """The compute counters of a run, without its wall times."""
    return [{key: value for key, value in entry.items() if not key.endswith("_seconds")}
            for entry in results["compute"]["per_task"]]


@pytest.mark.parametrize("strategy", [
    {"name": "er", "memory_size": 16},
    {"name": "lwf", "teacher_refresh_every": 3},
    {"name": "sit"},
], ids=["er", "lwf-refreshed-teacher", "sit"])
def test_online_run_killed_mid_stream_resumes_to_the_same_results(strategy, tiny_run_config, tmp_path):
    full = run_experiment(online_config(tiny_run_config, strategy, tmp_path, "full"), show_progress=False)
    config = online_config(tiny_run_config, strategy, tmp_path, "resumed")
    first = run_experiment(config, show_progress=False, stop_after_samples=40)
    assert first["interrupted"] and first["progress"]["chunks"] == 8  # stopped after the evaluation at 64
    checkpoints = sorted(path.name for path in (tmp_path / "resumed" / "checkpoints").iterdir())
    # The latest mid-stream pair, and the zero-shot features the end-of-stream alignment compares with.
    assert checkpoints == ["alignment_zero_shot.safetensors", "online_model_000008.safetensors",
                           "online_state_000008.safetensors"]
    resumed = run_experiment(config, show_progress=False)
    assert measured(resumed) == measured(full)
    assert resumed["alignment"] == full["alignment"]
    # The resumed run's spending is the uninterrupted run's, teacher refreshes and replay included.
    assert spent(resumed) == spent(full)


def test_online_resume_restores_the_learning_rate_schedule(tiny_run_config, tmp_path):
    section = {"name": "finetune"}
    train = {"lr_schedule": "cosine", "warmup_steps": 5}
    full = run_experiment(online_config(tiny_run_config, section, tmp_path, "full", **train), show_progress=False)
    config = online_config(tiny_run_config, section, tmp_path, "resumed", **train)
    assert run_experiment(config, show_progress=False, stop_after_samples=40)["interrupted"]
    assert measured(run_experiment(config, show_progress=False)) == measured(full)


class ToyDropout(Finetune):
    """Fine-tuning with dropout on the image features: its masks come from the global random state."""

    Config = ToyConfig

    def forward(self, batch, task):
        images = normalize(torch.nn.functional.dropout(self.backend.encode_image(batch["images"]), 0.5))
        logits = clip_logits(images, self.task_text_features(task), self.backend.logit_scale)
        return {"loss": classification_loss(logits, batch["targets"])}


def test_online_results_do_not_depend_on_a_warm_feature_cache(tiny_run_config, tmp_path, monkeypatch):
    # Evaluation draws nothing from the global random state (dropout's), so a second run whose
    # evaluations all hit the disk cache trains exactly as the first.
    monkeypatch.setitem(STRATEGIES, "toy_dropout", ToyDropout)
    section = {"name": "toy_dropout", "train": "text"}  # a frozen image tower: its features are cached
    runs = []
    for name in ("cold", "warm"):
        config = online_config(tiny_run_config, section, tmp_path, name)
        config.eval.cache_dir = str(tmp_path / "cache")
        runs.append(run_experiment(config, show_progress=False))
    assert measured(runs[0]) == measured(runs[1])


def _sync_in_process(rank: int, world_size: int, output: str) -> None:
    torch.set_num_threads(1)
    runtime = DistributedRuntime(rank, world_size, torch.device("cpu"))
    try:
        parameters = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
        # Each process has a gradient on its own parameter only (an expert only its images chose);
        # the third parameter has none anywhere.
        parameters[rank].grad = torch.full((3,), float(rank + 1))
        runtime.sync_gradients(parameters)
        if rank == 0:
            torch.save([p.grad for p in parameters], output)
    except BaseException:
        runtime.close(synchronise=False)
        raise
    runtime.close()


def test_gradient_average_covers_parameters_that_only_one_process_has(tmp_path):
    import torch.multiprocessing as mp

    output = str(tmp_path / "grads.pt")
    with rendezvous_environment(free_port()):
        mp.spawn(_sync_in_process, args=(2, output), nprocs=2, join=True)
    grads = torch.load(output, weights_only=True)
    assert torch.equal(grads[0], torch.full((3,), 0.5)) and torch.equal(grads[1], torch.full((3,), 1.0))
    assert grads[2] is None  # no gradient anywhere: left alone, as in one process


def test_two_processes_give_the_same_online_run_as_one(tiny_run_config, tmp_path):
    # Two gloo processes on chunks of 8 (4 each) against one process that accumulates the same two
    # chunks of 4: the same optimisation, so the curves must be exactly equal (see the task-stream test).
    finetune = {"name": "finetune", "train": "all"}
    one = run_experiment(online_config(tiny_run_config, finetune, tmp_path, "one", batch_size=4, grad_accumulation=2),
                         show_progress=False)
    two = run_experiment(online_config(tiny_run_config, finetune, tmp_path, "two", batch_size=8, devices=2),
                         show_progress=False)
    assert two["anytime"] == one["anytime"]
    assert two["heldout"] == one["heldout"]
    assert two["timing"]["train_steps"] == one["timing"]["train_steps"] == 24
    counters = ("samples_seen", "optimizer_steps", "image_forward", "image_backward", "text_forward", "text_backward")
    assert {key: two["compute"]["total"][key] for key in counters} == {key: one["compute"]["total"][key] for key in counters}
    assert two["compute"]["total"]["image_backward"] == 24 * 8  # 24 steps of 8 images, over both processes


def test_online_runs_take_grad_accumulation_and_a_schedule(tiny_run_config, tmp_path):
    constant = run_experiment(online_config(tiny_run_config, {"name": "finetune"}, tmp_path, "constant",
                                            grad_accumulation=2), show_progress=False)
    cosine = run_experiment(online_config(tiny_run_config, {"name": "finetune"}, tmp_path, "cosine",
                                          grad_accumulation=2, lr_schedule="cosine"), show_progress=False)
    assert constant["timing"]["train_steps"] == cosine["timing"]["train_steps"] == 12  # 12 chunks / 2 * 2 iters
    assert constant["losses_first_last"][0] == cosine["losses_first_last"][0]  # the first step is the same
    assert constant["losses_first_last"][1] != cosine["losses_first_last"][1]


# --- a method that declares a replay memory and a reference set ----------------------------------------


class ToyReplayAndReference(Finetune):
    """Fine-tuning plus a term on replayed images and one on reference images: the smallest method
    that needs both kinds of source. It records what it was given."""

    Config = ToyConfig
    seen: typing.ClassVar[list] = []

    def sources(self) -> dict:
        return {"replay": ReplaySpec(capacity=12, kind="class_balanced"),
                "reference": ReferenceSpec(dataset="synthetic-9", samples=10, texts_dataset="cifar10")}

    def forward(self, batch, task):
        outputs = super().forward(batch, task)
        reference = self.backend.encode_image(batch["reference"]["images"])
        replayed = len(batch["replay"]["images"])
        type(self).seen.append((len(batch["images"]), len(batch["reference"]["images"]), replayed,
                                len(batch["replay"]["classes"])))
        loss = outputs["loss"] + 1e-3 * reference.pow(2).mean()
        if replayed:
            loss = loss + 1e-3 * self.backend.encode_image(batch["replay"]["images"]).pow(2).mean()
        return {**outputs, "loss": loss}


@pytest.mark.parametrize("stream", ["task", "online"])
def test_a_method_with_a_replay_memory_and_a_reference_set_runs_on_both_kinds_of_stream(
        stream, tiny_run_config, tmp_path, monkeypatch):
    monkeypatch.setitem(STRATEGIES, "toy", ToyReplayAndReference)
    monkeypatch.setattr(ToyReplayAndReference, "seen", [])
    section = {"name": "toy"}
    if stream == "task":
        config = tiny_run_config(section, output_dir=str(tmp_path / "task"), observe={"tensorboard": False})
    else:
        config = online_config(tiny_run_config, section, tmp_path, "online")
    results = run_experiment(config, show_progress=False)
    seen = ToyReplayAndReference.seen
    assert len(seen) == (3 * 4 if stream == "task" else 12 * 2)  # one forward per micro-batch and repeat
    assert all(reference == images for images, reference, _, _ in seen)  # a reference image per image
    assert seen[0][2] == 0 and any(replayed for _, _, replayed, _ in seen)  # the memory fills, then replays
    assert all(replayed == classes and replayed <= 12 for _, _, replayed, classes in seen)
    assert all(0 <= value <= 100 for value in (results["accuracy"]["matrix"][-1] if stream == "task"
                                               else results["anytime"]["accuracy"]))


class ToyCaptions(Finetune):
    """Fine-tuning plus CLIP's contrastive loss on image-caption pairs from a caption file."""

    Config = ToyConfig
    path = ""
    seen: typing.ClassVar[list] = []

    def sources(self) -> dict:
        return {"captions": CaptionSpec(path=type(self).path)}

    def forward(self, batch, task):
        outputs = super().forward(batch, task)
        pairs = batch["captions"]
        type(self).seen.append((len(batch["images"]), list(pairs["captions"]), pairs["image_ids"].tolist()))
        images = normalize(self.backend.encode_image(pairs["images"]))
        texts = normalize(self.backend.encode_text(self.backend.tokenize(pairs["captions"]).to(images.device)))
        logits = clip_logits(images, texts, self.backend.logit_scale)
        positives = torch.arange(len(images), device=images.device)
        contrastive = (classification_loss(logits, positives) + classification_loss(logits.t(), positives)) / 2
        return {**outputs, "loss": outputs["loss"] + contrastive}


def test_a_method_trains_on_image_caption_pairs_from_a_caption_file(tiny_run_config, tmp_path, monkeypatch):
    from PIL import Image

    folder = tmp_path / "captions"
    folder.mkdir()
    rows = ["image,caption"]
    for index in range(6):
        Image.new("RGB", (40, 40), (40 * index, 255 - 40 * index, 90)).save(folder / f"{index}.png")
        rows += [f"{index}.png,a drawing number {index}", f"{index}.png,picture {index} of the set"]
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.setitem(STRATEGIES, "toy_captions", ToyCaptions)
    monkeypatch.setattr(ToyCaptions, "seen", [])
    monkeypatch.setattr(ToyCaptions, "path", "captions/pairs.csv")  # relative: found under stream.data_root
    config = tiny_run_config({"name": "toy_captions"}, stream={"data_root": str(tmp_path)},
                             observe={"tensorboard": False}, output_dir=str(tmp_path / "run"))
    run_experiment(config, show_progress=False)
    seen = ToyCaptions.seen
    assert len(seen) == 12
    captions = {row.split(",", 1)[1] for row in rows[1:]}
    for images, drawn, image_ids in seen:
        assert len(drawn) == images == 16 and set(drawn) <= captions  # 16 of the 12 rows: with replacement
        assert all(drawn[i].endswith(str(image_ids[i])) or f" {image_ids[i]} " in drawn[i] for i in range(16))


@pytest.mark.parametrize("kind, expected", [("budget_equal", [4, 4, 4]), ("budget_exponential", [3, 3, 6])])
def test_budgeted_memory_splits_its_budget_over_experiences(kind, expected):
    memory = build_memory(ReplaySpec(capacity=12, kind=kind), seed=0)
    for experience in range(3):
        memory.add([(experience, index) for index in range(40)], [experience] * 40)
        counts = [sum(1 for item in memory.items if item[0] == e) for e in range(experience + 1)]
        # Every experience offered more than its share, so each holds exactly its share.
        assert counts == [memory.shares()[e] for e in range(experience + 1)] and sum(counts) == 12
    assert [sum(1 for item in memory.items if item[0] == e) for e in range(3)] == expected
    assert len(set(memory.items)) == 12  # distinct samples
    again = build_memory(ReplaySpec(capacity=12, kind=kind), seed=0)
    for experience in range(3):
        again.add([(experience, index) for index in range(40)], [experience] * 40)
    assert again.items == memory.items  # seeded: the same memory every time


def test_class_balanced_memory_keeps_classes_equal():
    memory = ClassBalancedMemory(6, seed=0)
    memory.add([(0, index) for index in range(6)], [0] * 6)
    memory.add([(0, index) for index in range(6, 12)], [1] * 3 + [2] * 3)
    assert sorted(memory.labels) == [0, 0, 1, 1, 2, 2]


# --- inner fits through the runtime ---------------------------------------------------------------------


def _fit_in_process(rank: int, world_size: int, output: str) -> None:
    torch.set_num_threads(1)
    runtime = DistributedRuntime(rank, world_size, torch.device("cpu"))
    try:
        features = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        autoencoder = FeatureAutoencoder(16, 8)
        autoencoder.requires_grad_(True)
        fit_autoencoder(autoencoder, features, steps=15, lr=1e-2, batch_size=16, seed=2, runtime=runtime)
        if rank == 0:
            torch.save(autoencoder.state_dict(), output)
    except BaseException:
        runtime.close(synchronise=False)
        raise
    runtime.close()


def test_ddas_autoencoder_fit_under_two_processes_equals_one(tmp_path):
    import torch.multiprocessing as mp

    features = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    single = FeatureAutoencoder(16, 8)
    single.requires_grad_(True)
    losses = fit_autoencoder(single, features, steps=15, lr=1e-2, batch_size=16, seed=2, runtime=Runtime(torch.device("cpu")))
    assert losses[1] < losses[0]
    output = str(tmp_path / "two.pt")
    with rendezvous_environment(free_port()):
        mp.spawn(_fit_in_process, args=(2, output), nprocs=2, join=True)
    two = torch.load(output, weights_only=True)  # our own file of plain tensors
    for name, tensor in single.state_dict().items():
        assert torch.equal(tensor, two[name]), name  # (g + g) / 2 == g exactly: equal by construction


def test_strategies_never_touch_the_optimizer_or_processes():
    """Methods compute losses; the engine owns backward, steps and communication."""
    import clipcl.strategies as package

    folder = os.path.dirname(package.__file__)
    for name in os.listdir(folder):
        if name.endswith(".py"):
            text = Path(folder, name).read_text()
            for forbidden in (".backward(", "optimizer.step(", "torch.optim.", "torch.distributed.", "Runtime(",
                              "load_dataset("):
                assert forbidden not in text, f"strategies/{name} uses {forbidden}"


def test_no_module_level_import_cycles_and_no_module_over_400_lines():
    """The package's shape: modules import each other in one direction; none grows past ~400 lines."""
    import ast

    import clipcl

    root = Path(clipcl.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        name = ".".join(("clipcl", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        lines = path.read_text().count("\n")
        assert lines <= 420, f"{name} has {lines} lines"
        imported = set()
        for node in ast.parse(path.read_text()).body:  # module level only: lazy imports inside functions are fine
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clipcl"):
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name.startswith("clipcl")}
        graph[name] = imported

    def visit(module: str, trail: list[str]) -> None:
        for target in graph.get(module, ()):
            assert target not in trail, "import cycle: " + " -> ".join([*trail, target])
            visit(target, [*trail, target])

    for module in graph:
        visit(module, [module])
