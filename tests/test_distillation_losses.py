"""The distillation strategies' losses against independent computations, plus their bookkeeping.

The expected values are written out with plain torch ops (log_softmax, sums), not with
``clipcl.losses``, on a fixed tiny model, batch and seed.
"""

import copy
from types import SimpleNamespace

import pytest
import torch

from clipcl.config import ConfigError, StreamConfig
from clipcl.data.base import DataError
from clipcl.data.resources import classnames_and_templates
from clipcl.data.sources import CURRENT_TASK, ReferenceSource
from clipcl.data.streams import build_stream
from clipcl.engine.runtime import Runtime
from clipcl.models.tiny import tiny_open_clip_backend
from clipcl.run import run_experiment
from clipcl.strategies.lwf import LwF, LwFConfig
from clipcl.strategies.vr_lwf import VRLwF, VRLwFConfig, random_token_texts
from clipcl.strategies.zscl import ZSCL, ZSCLConfig

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def stream():
    config = StreamConfig(protocol="multi_domain", datasets=["synthetic-0", "synthetic-1"], test_samples_per_task=12)
    return build_stream(config, seed=0)


def batch(backend, task, size=8):
    view = task.training_view(backend.preprocess)  # the evaluation transform: no random crops
    images = torch.stack([view[i * 7][0] for i in range(size)])
    targets = torch.tensor([view[i * 7][1] for i in range(size)])
    return images, targets


@torch.no_grad()
def perturb(backend, seed, scale=0.01):
    """Move every trained weight but the (large) token embedding: a stand-in for some training."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in backend.named_parameters():
        if parameter.requires_grad and "token_embedding" not in name:
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


# --- independent computations ----------------------------------------------------------------------


def unit(features):
    return features / features.norm(dim=-1, keepdim=True)


def cross_entropy(logits, targets, smoothing=0.0):
    """With label smoothing eps the target is (1 - eps) on the label plus eps spread evenly over all classes."""
    log_probabilities = torch.log_softmax(logits, dim=1)
    picked = -log_probabilities[torch.arange(len(targets)), targets]
    uniform = -log_probabilities.mean(dim=1)
    return ((1 - smoothing) * picked + smoothing * uniform).mean()


def kl_teacher_student(student_logits, teacher_logits, temperature):
    """Mean over rows of sum_j p_teacher log(p_teacher / p_student), times T^2."""
    log_teacher = torch.log_softmax(teacher_logits / temperature, dim=1)
    log_student = torch.log_softmax(student_logits / temperature, dim=1)
    per_row = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1)
    return per_row.mean() * temperature**2


def first_prompts(backend, classes):
    return backend.tokenize([c.templates[0].format(c.name) for c in classes])


# --- LwF ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("distill_classes", ["seen", "task"])
def test_lwf_loss_matches_independent_computation(stream, distill_classes):
    """Ding et al.'s LwF (``seen``): the KL over every class seen so far; ``task``: the task's classes."""
    torch.manual_seed(0)
    first, second = stream.tasks
    backend = tiny_open_clip_backend(seed=0)
    strategy = LwF(backend, LwFConfig(name="lwf", alpha=0.5, temperature=1.0, distill_classes=distill_classes))
    strategy.before_task(first)
    perturb(backend, seed=1)
    strategy.after_task(first)
    teacher = copy.deepcopy(backend).eval()  # the model after the first task
    strategy.before_task(second)
    perturb(backend, seed=2)
    images, targets = batch(backend, second)
    with torch.no_grad():
        outputs = strategy({"images": images, "targets": targets}, second)
        student_images, teacher_images = unit(backend.encode_image(images)), unit(teacher.encode_image(images))
        student_scale, teacher_scale = backend.logit_scale.exp(), teacher.logit_scale.exp()
        current = unit(backend.encode_text(first_prompts(backend, second.classes)))
        ce = cross_entropy(student_scale * student_images @ current.t(), targets)
        distilled = (first.classes if distill_classes == "seen" else []) + second.classes
        tokens = first_prompts(backend, distilled)
        distill = kl_teacher_student(student_scale * student_images @ unit(backend.encode_text(tokens)).t(),
                                     teacher_scale * teacher_images @ unit(teacher.encode_text(tokens)).t(), 1.0)
    assert distill > 1e-3  # the check is not vacuous
    assert abs(outputs["ce"].item() - ce.item()) < TOLERANCE
    assert abs(outputs["distill"].item() - distill.item()) < TOLERANCE
    assert abs(outputs["loss"].item() - (ce + 0.5 * distill).item()) < TOLERANCE


# --- VR-LwF -------------------------------------------------------------------------------------


def test_vr_lwf_loss_matches_independent_computation(stream):
    torch.manual_seed(0)
    first, second = stream.tasks
    backend = tiny_open_clip_backend(seed=0)
    strategy = VRLwF(backend, VRLwFConfig(name="vr_lwf"))  # ding2022: P=100, 8 ids, alpha=0.5, T=1
    strategy.before_task(first)
    perturb(backend, seed=1)  # "training" on the first task
    strategy.after_task(first)
    teacher = copy.deepcopy(backend).eval()  # the model after the first task
    strategy.before_task(second)
    perturb(backend, seed=2)  # some training on the second task
    images, targets = batch(backend, second)
    state = strategy._generator.get_state()
    with torch.no_grad():
        outputs = strategy({"images": images, "targets": targets}, second)
        tokens = random_token_texts(backend, 100, 8, torch.Generator().set_state(state))

        student_images, teacher_images = unit(backend.encode_image(images)), unit(teacher.encode_image(images))
        student_scale, teacher_scale = backend.logit_scale.exp(), teacher.logit_scale.exp()
        current = unit(backend.encode_text(first_prompts(backend, second.classes)))
        ce = cross_entropy(student_scale * student_images @ current.t(), targets)
        replay = kl_teacher_student(student_scale * student_images @ unit(backend.encode_text(tokens)).t(),
                                    teacher_scale * teacher_images @ unit(teacher.encode_text(tokens)).t(), 1.0)
        seen_tokens = first_prompts(backend, first.classes + second.classes)
        seen = kl_teacher_student(student_scale * student_images @ unit(backend.encode_text(seen_tokens)).t(),
                                  teacher_scale * teacher_images @ unit(teacher.encode_text(seen_tokens)).t(), 1.0)
        expected = ce + 0.5 * (replay + seen)

    assert replay > 1e-3 and seen > 1e-3  # the check is not vacuous
    assert abs(outputs["ce"].item() - ce.item()) < TOLERANCE
    assert abs(outputs["replay"].item() - replay.item()) < TOLERANCE
    assert abs(outputs["seen"].item() - seen.item()) < TOLERANCE
    assert abs(outputs["loss"].item() - expected.item()) < TOLERANCE


def test_vr_lwf_zscl_variant_matches_lwf_vr(stream):
    """ZSCL's LwF-VR: one vocabulary per task, label smoothing 0.2 on the training batch, and the
    distillation on a separate batch of the current task's images under the evaluation transform."""
    torch.manual_seed(0)
    task = stream.tasks[0]
    backend = tiny_open_clip_backend(seed=0)
    strategy = VRLwF(backend, VRLwFConfig(name="vr_lwf", variant="zscl"))
    spec = strategy.sources()["current_images"]
    assert spec.dataset == CURRENT_TASK and spec.preprocess == "eval"
    source = ReferenceSource(spec, root=None)
    strategy.attach(Runtime(torch.device("cpu")), None, {"current_images": source})
    strategy.before_task(task)
    teacher = copy.deepcopy(backend).eval()
    tokens = strategy._fixed_tokens
    assert tokens.shape == (1000, backend.context_length)
    perturb(backend, seed=3)
    images, targets = batch(backend, task)
    source.use_dataset(task.train)  # what the engine does when the task starts
    source.start(backend, seed=7, count=len(images))
    separate = source.next_batch()["images"]
    # The separate batch is task images under the evaluation transform, not the training batch.
    assert any(torch.equal(separate[0], backend.preprocess(task.train[index][0])) for index in range(len(task.train)))
    assert not torch.equal(separate, images)
    with torch.no_grad():
        outputs = strategy({"images": images, "targets": targets, "current_images": {"images": separate}}, task)
        assert torch.equal(strategy._fixed_tokens, tokens)
        classes = unit(backend.encode_text(first_prompts(backend, task.classes)))
        ce = cross_entropy(backend.logit_scale.exp() * unit(backend.encode_image(images)) @ classes.t(), targets, 0.2)
        pseudo = unit(teacher.encode_text(tokens))  # ZSCL's code: the teacher encodes the texts
        student = backend.logit_scale.exp() * unit(backend.encode_image(separate)) @ pseudo.t()
        reference = teacher.logit_scale.exp() * unit(teacher.encode_image(separate)) @ pseudo.t()
        replay = kl_teacher_student(student, reference, 2.0) + kl_teacher_student(student.t(), reference.t(), 2.0)
    assert replay > 1e-4
    assert abs(outputs["ce"].item() - ce.item()) < TOLERANCE
    assert abs(outputs["replay"].item() - replay.item()) < TOLERANCE
    assert abs(outputs["loss"].item() - (ce + replay).item()) < TOLERANCE


def test_vr_lwf_distill_images_batch_needs_no_source():
    backend = tiny_open_clip_backend(seed=0)
    assert VRLwF(backend, VRLwFConfig(name="vr_lwf", variant="zscl", distill_images="batch")).sources() == {}
    with pytest.raises(ConfigError, match="distill_images"):
        VRLwFConfig(name="vr_lwf", distill_images="reference")


# --- ZSCL ---------------------------------------------------------------------------------------


def with_sources(strategy):
    """The strategy with its declared sources built and attached, as the engine does."""
    built = {name: ReferenceSource(spec, root=None) for name, spec in strategy.sources().items()}
    strategy.attach(Runtime(torch.device("cpu")), None, built)
    return strategy


@pytest.mark.parametrize("distill_text_tower", [False, True])
def test_zscl_loss_matches_independent_computation(stream, distill_text_tower):
    torch.manual_seed(0)
    task = stream.tasks[0]
    backend = tiny_open_clip_backend(seed=0)
    zero_shot = copy.deepcopy(backend).eval()
    config = ZSCLConfig(name="zscl", reference_dataset="synthetic-9", reference_samples=20,
                        reference_texts_dataset="cifar10", distill_text_tower=distill_text_tower)
    strategy = ZSCL(backend, config)
    # The engine builds the declared reference source and draws a batch of it for every step.
    source = ReferenceSource(strategy.sources()["reference"], root=None)
    strategy.attach(Runtime(torch.device("cpu")), None, {"reference": source})
    perturb(backend, seed=4)  # weights after earlier tasks: the task starts away from zero-shot
    strategy.before_task(task)
    anchors = {name: p.detach().clone() for name, p in backend.named_parameters() if p.requires_grad}
    perturb(backend, seed=5)  # some training on this task
    images, targets = batch(backend, task)
    source.start(backend, seed=123, count=len(images))
    reference = source.next_batch()["images"]
    with torch.no_grad():
        outputs = strategy({"images": images, "targets": targets, "reference": {"images": reference}}, task)

        classnames, templates = classnames_and_templates("cifar10")
        texts = backend.tokenize([templates[0].format(name) for name in classnames])
        student_scale, teacher_scale = backend.logit_scale.exp(), zero_shot.logit_scale.exp()
        current = unit(backend.encode_text(first_prompts(backend, task.classes)))
        ce = cross_entropy(student_scale * unit(backend.encode_image(images)) @ current.t(), targets, smoothing=0.2)
        teacher_texts = unit(zero_shot.encode_text(texts))
        student_texts = unit(backend.encode_text(texts)) if distill_text_tower else teacher_texts
        student = student_scale * unit(backend.encode_image(reference)) @ student_texts.t()
        teacher = teacher_scale * unit(zero_shot.encode_image(reference)) @ teacher_texts.t()
        distill = kl_teacher_student(student, teacher, 2.0) + kl_teacher_student(student.t(), teacher.t(), 2.0)
        l2 = sum(((p - anchors[name]) ** 2).sum() for name, p in backend.named_parameters() if p.requires_grad)
        expected = ce + 1.0 * distill + 1.0 * l2

    assert distill > 1e-3 and l2 > 1e-3
    assert reference.shape == images.shape
    assert abs(outputs["ce"].item() - ce.item()) < TOLERANCE  # ZSCL's label smoothing 0.2 is the default
    assert abs(outputs["distill"].item() - distill.item()) < TOLERANCE
    assert abs(outputs["l2"].item() - l2.item()) < TOLERANCE
    assert abs(outputs["loss"].item() - expected.item()) < TOLERANCE


def test_zscl_weight_average_is_the_mean_of_start_and_folded_weights(stream):
    torch.manual_seed(0)
    task = stream.tasks[0]
    backend = tiny_open_clip_backend(seed=0)
    strategy = with_sources(ZSCL(backend, ZSCLConfig(name="zscl", reference_dataset="synthetic-9", reference_samples=8,
                                                     reference_texts_dataset="cifar10", average_every=2)))
    strategy.before_task(task)
    parameter = backend.model.visual.proj
    snapshots = [parameter.detach().clone()]
    for step in range(6):
        perturb(backend, seed=10 + step)
        strategy.after_step(step)
        # Folded at steps 0, 2, 4 and, as ZSCL folds at its final iteration, after the last step (5).
        if step % 2 == 0 or step == 5:
            snapshots.append(parameter.detach().clone())
    strategy.after_task(task)
    assert len(snapshots) == 5
    assert torch.allclose(parameter, torch.stack(snapshots).mean(dim=0), atol=1e-6)


def test_zscl_refuses_a_reference_dataset_from_the_stream(stream):
    strategy = with_sources(ZSCL(tiny_open_clip_backend(seed=0), ZSCLConfig(name="zscl", reference_dataset="synthetic-1")))
    strategy.before_task(stream.tasks[0])
    strategy.after_task(stream.tasks[0])
    with pytest.raises(DataError, match="also a task of the stream"):
        strategy.before_task(stream.tasks[1])


# --- bookkeeping --------------------------------------------------------------------------------


def test_random_token_texts_layout():
    backend = tiny_open_clip_backend(seed=0)
    tokens = random_token_texts(backend, 50, 8, torch.Generator().manual_seed(0))
    assert tokens.shape == (50, backend.context_length) and tokens.dtype == torch.long
    assert (tokens[:, 0] == backend.sot_token_id).all() and (tokens[:, 9] == backend.eot_token_id).all()
    assert (tokens[:, 10:] == backend.pad_token_id).all()
    middle = tokens[:, 1:9]
    special = torch.tensor([backend.sot_token_id, backend.eot_token_id, backend.pad_token_id])
    assert not torch.isin(middle, special).any() and (middle < backend.vocab_size).all()
    assert (tokens.argmax(dim=-1) == 9).all()  # where open_clip's text tower pools
    assert torch.equal(tokens, random_token_texts(backend, 50, 8, torch.Generator().manual_seed(0)))

    # A BERT-like vocabulary (start 101, end 102, pad 0, more specials) and one without a start token.
    bert = SimpleNamespace(sot_token_id=101, eot_token_id=102, pad_token_id=0, context_length=12, vocab_size=120,
                           special_token_ids=frozenset({0, 100, 101, 102, 103}))
    tokens = random_token_texts(bert, 2000, 6, torch.Generator().manual_seed(1))
    assert not torch.isin(tokens[:, 1:7], torch.tensor([0, 100, 101, 102, 103])).any()
    assert set(tokens[:, 1:7].unique().tolist()) == set(range(120)) - {0, 100, 101, 102, 103}  # all others drawn
    siglip = SimpleNamespace(sot_token_id=None, eot_token_id=1, pad_token_id=1, context_length=8, vocab_size=50,
                             special_token_ids=frozenset({1}))
    tokens = random_token_texts(siglip, 3, 5, torch.Generator().manual_seed(2))
    assert (tokens[:, 5:] == 1).all() and not (tokens[:, :5] == 1).any()
    with pytest.raises(ValueError, match="positions"):
        random_token_texts(backend, 1, 15)


def test_teachers_stay_out_of_the_state_dict(stream):
    backend = tiny_open_clip_backend(seed=0)
    keys = {f"backend.{key}" for key in backend.state_dict()}
    count = sum(p.numel() for p in backend.parameters())
    for strategy in (VRLwF(backend, VRLwFConfig(name="vr_lwf", pseudo_texts=4)),
                     with_sources(ZSCL(backend, ZSCLConfig(name="zscl", reference_dataset="synthetic-9",
                                                           reference_samples=4, reference_texts_dataset="cifar10")))):
        strategy.before_task(stream.tasks[0])
        assert set(strategy.state_dict()) == keys
        assert sum(p.numel() for p in strategy.parameters()) == count


@pytest.mark.parametrize("section", [
    {"name": "vr_lwf", "pseudo_texts": 8},
    {"name": "zscl", "reference_dataset": "synthetic-9", "reference_samples": 16, "reference_texts_dataset": "cifar10",
     "average_every": 2},
], ids=["vr_lwf", "zscl"])
def test_resume_gives_the_same_results(section, tiny_run_config, tmp_path):
    full = run_experiment(tiny_run_config(section, output_dir=str(tmp_path / "full")), show_progress=False)
    config = tiny_run_config(section, output_dir=str(tmp_path / "resumed"))
    assert run_experiment(config, show_progress=False, stop_after_task=0)["interrupted"]
    resumed = run_experiment(config, show_progress=False)
    assert resumed["accuracy"]["matrix"] == full["accuracy"]["matrix"]


def test_zscl_reference_cache_changes_nothing(stream):
    task = stream.tasks[0]
    batches = []
    for cache_mb in (0, 64):
        torch.manual_seed(0)
        strategy = with_sources(ZSCL(tiny_open_clip_backend(seed=0),
                        ZSCLConfig(name="zscl", reference_dataset="synthetic-9", reference_samples=12,
                                   reference_texts_dataset="cifar10", reference_cache_mb=cache_mb)))
        strategy.before_task(task)
        source = strategy.source_data["reference"]
        source.start(strategy.backend, seed=0, count=8)
        batches.append([source.next_batch()["images"] for _ in range(3)])  # 24 draws from 12 images
        assert bool(source._images.cache) == (cache_mb > 0)
    for cached, uncached in zip(*batches):
        assert torch.equal(cached, uncached)
