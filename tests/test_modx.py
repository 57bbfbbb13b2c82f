"""Mod-X and the contrastive (image-caption) paths of finetune, LwF and ZSCL.

The expected values are written out with explicit formulas here, not by calling the functions
under test; the official code's form (in-place row replacement, ``kl_div`` of ``softmax().log()``)
is rebuilt in :func:`official_modx_term` to check value and gradient against it.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from clipcl.config import ConfigError
from clipcl.data.streams import build_stream
from clipcl.engine.context import batch_by_hand
from clipcl.engine.runtime import Runtime
from clipcl.engine.tasks import standalone_context
from clipcl.losses import cognition_align, contrastive_loss, similarity_distillation
from clipcl.models import build_backend
from clipcl.run import seed_everything
from clipcl.strategies import build_strategy
from clipcl.strategies.mod_x import modx_distillation

PHASE = SimpleNamespace(index=0, name="captions-phase-0", classes=[])
CAPTIONS = ["a red circle on white", "a blue square in a field", "two green dots", "a yellow star at night",
            "a black cat on a mat", "an orange boat at sea", "a purple flower", "a grey cloud over hills"]


def unit(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def caption_batch(count=8, ids=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"images": torch.rand(count, 3, 32, 32, generator=generator), "captions": CAPTIONS[:count],
            "image_ids": torch.arange(count) if ids is None else torch.tensor(ids)}


def build(tiny_run_config, section):
    # The tiny run's stream is labelled, which a run config refuses for a caption-only method; the
    # strategy is built on its own here, to be fed caption batches by hand.
    config = tiny_run_config()
    seed_everything(config.seed)
    backend = build_backend(config.model)
    stream = build_stream(config.stream, config.seed)
    strategy = build_strategy(backend, section)
    standalone_context(config, strategy, stream, Runtime(torch.device("cpu")), None)
    return strategy, stream


# --- the losses ------------------------------------------------------------------------------------
def test_contrastive_loss_is_clips_loss_with_distinct_ids():
    images, texts, scale = unit(6, 16, seed=1), unit(6, 16, seed=2), torch.tensor(2.5)
    logits = scale.exp() * images @ texts.t()
    labels = torch.arange(6)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    assert torch.allclose(contrastive_loss(images, texts, scale), expected)
    assert torch.allclose(contrastive_loss(images, texts, scale, torch.tensor([9, 3, 4, 0, 7, 1])), expected)


def test_contrastive_loss_multi_positive_targets_are_uniform_over_the_positives():
    images, texts, scale = unit(4, 8, seed=3), unit(4, 8, seed=4), torch.tensor(1.0)
    ids = [5, 5, 2, 7]  # rows 0 and 1: two captions of one image
    logits = scale.exp() * images @ texts.t()
    total = 0.0
    for matrix in (logits, logits.t()):
        log_p = matrix.log_softmax(dim=-1)
        for i in range(4):
            positives = [j for j in range(4) if ids[j] == ids[i]]
            total += -sum(log_p[i, j] for j in positives) / len(positives) / 4
    assert torch.allclose(contrastive_loss(images, texts, scale, torch.tensor(ids)), (total / 2).reshape(()))


def kl_rows(student, teacher):
    """sum_i sum_j p_ij (log p_ij - log q_ij), p = softmax(teacher_i), q = softmax(student_i), by hand."""
    total = 0.0
    for i in range(student.shape[0]):
        p = torch.exp(teacher[i]) / torch.exp(teacher[i]).sum()
        q = torch.exp(student[i]) / torch.exp(student[i]).sum()
        total = total + (p * (p.log() - q.log())).sum()
    return total


def official_modx_term(student, teacher):
    """The official code's steps (continue_train_model.py:226-233,309-330,337): in-place replacement
    of the wrong teacher rows by the student's (not detached), then kl_div(log softmax, softmax, sum)."""
    terms = []
    for s, t in ((student, teacher), (student.t(), teacher.t())):
        t = t.clone()
        index = t.max(1)[1]
        for i in range(t.shape[0]):
            if index[i] != i:
                t[i] = s[i]
        terms.append(F.kl_div(s.softmax(dim=-1).log(), t.softmax(dim=-1), reduction="sum"))
    return (terms[0] + terms[1]) / 2


def test_modx_distillation_by_hand_and_as_the_official_code():
    images, texts = unit(5, 8, seed=5), unit(5, 8, seed=6)
    old_images, old_texts = unit(5, 8, seed=7), unit(5, 8, seed=8)
    student, teacher = images @ texts.t(), old_images @ old_texts.t()
    expected = 0.0
    for s, t in ((student, teacher), (student.t(), teacher.t())):
        aligned = torch.stack([t[i] if int(t[i].argmax()) == i else s[i] for i in range(5)])
        expected = expected + kl_rows(s, aligned)
    term, replaced = modx_distillation(images, texts, old_images, old_texts)
    assert torch.allclose(term, expected / 2)
    assert replaced["replaced_image_rows"].tolist() == [int(teacher[i].argmax()) != i for i in range(5)]
    assert replaced["replaced_text_rows"].tolist() == [int(teacher[:, i].argmax()) != i for i in range(5)]
    assert replaced["replaced_image_rows"].any()  # the seeds give a case with replaced rows

    # The official form: same value, same gradient (a replaced row's KL(p || p) has zero gradient
    # whether or not the copied row is detached).
    mine_images, theirs_images = images.clone().requires_grad_(), images.clone().requires_grad_()
    mine, _ = modx_distillation(mine_images, texts, old_images, old_texts)
    theirs = official_modx_term(theirs_images @ texts.t(), teacher)
    mine.backward()
    theirs.backward()
    assert torch.allclose(mine, theirs) and torch.allclose(mine_images.grad, theirs_images.grad, atol=1e-6)
    # Without alignment, and with the batchmean reduction.
    plain, _ = modx_distillation(images, texts, old_images, old_texts, align=False, reduction="batchmean")
    assert torch.allclose(plain, (kl_rows(student, teacher) + kl_rows(student.t(), teacher.t())) / 2 / 5)


def test_cognition_align_replaces_exactly_the_wrong_rows_and_they_get_no_gradient():
    teacher = torch.tensor([[0.9, 0.1, 0.0, 0.2],    # right
                            [0.8, 0.3, 0.1, 0.0],    # wrong: best is column 0
                            [0.0, 0.1, 0.7, 0.2],    # right
                            [0.1, 0.6, 0.2, 0.5]])   # wrong: best is column 1
    student = torch.randn(4, 4).requires_grad_()
    aligned, replaced = cognition_align(teacher, student, torch.eye(4, dtype=torch.bool))
    assert replaced.tolist() == [False, True, False, True]
    assert torch.equal(aligned[[0, 2]], teacher[[0, 2]]) and torch.equal(aligned[[1, 3]], student.detach()[[1, 3]])
    similarity_distillation(student, aligned).backward()
    # Zero up to rounding (the softmax's sum is 1 to within float eps), against O(0.1) on the kept rows.
    assert student.grad[[1, 3]].abs().max() < 1e-6
    assert student.grad[0].abs().max() > 1e-3 and student.grad[2].abs().max() > 1e-3
    # Several captions of one image: a best match on another caption of the same image is right.
    positives = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    _, replaced = cognition_align(teacher, student, positives)
    assert replaced.tolist() == [False, False, False, True]


def test_off_diagonal_distils_only_the_other_pairs():
    student, teacher = torch.randn(3, 3), torch.randn(3, 3)
    keep = ~torch.eye(3, dtype=torch.bool)
    expected = sum(kl_rows(student[i][keep[i]][None], teacher[i][keep[i]][None]) for i in range(3))
    assert torch.allclose(similarity_distillation(student, teacher, keep=keep), expected)


# --- the strategies on a tiny open_clip model ---------------------------------------------------------
def train(strategy, batch, steps=25, lr=3e-4):
    strategy.before_task(PHASE)
    optimizer = torch.optim.AdamW(strategy.trainable_parameters(), lr=lr)
    strategy.train()
    outputs = []
    for step in range(steps):
        result = strategy(batch, PHASE)
        optimizer.zero_grad()
        result["loss"].backward()
        optimizer.step()
        strategy.after_step(step)
        outputs.append({key: float(value.detach()) for key, value in result.items()})
    return outputs


def test_mod_x_overfits_a_caption_batch_with_a_frozen_teacher(tiny_run_config):
    strategy, _ = build(tiny_run_config, {"name": "mod_x"})
    batch = caption_batch()
    strategy.before_task(PHASE)
    teacher = strategy._teacher.backend
    before = {name: p.detach().clone() for name, p in teacher.state_dict().items()}
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in strategy.parameters()}
    outputs = train(strategy, batch)
    assert outputs[-1]["loss"] < 0.6 * outputs[0]["loss"], [o["loss"] for o in outputs]
    assert outputs[0]["distill"] == pytest.approx(0.0, abs=1e-5)  # the teacher is the phase's start
    assert outputs[-1]["distill"] > 0
    assert all(torch.equal(tensor, before[name]) for name, tensor in teacher.state_dict().items())
    with torch.no_grad():  # the official clamp of the trained temperature, after each step
        strategy.backend.logit_scale.fill_(5.0)
    strategy.after_step(99)
    assert float(strategy.backend.logit_scale.detach()) == pytest.approx(4.6052)


def test_mod_x_loss_is_contrastive_plus_alpha_times_the_distillation(tiny_run_config):
    strategy, _ = build(tiny_run_config, {"name": "mod_x"})
    batch = caption_batch(ids=[0, 0, 1, 2, 3, 4, 5, 6])
    train(strategy, batch, steps=3)  # student and teacher now differ
    with torch.no_grad():
        twenty = strategy(batch, PHASE)
        strategy.config.alpha = 40.0
        forty = strategy(batch, PHASE)
        image, text = strategy._teacher.image_features(batch["images"]), strategy._teacher.caption_features(CAPTIONS)
        student_image = F.normalize(strategy.backend.encode_image(batch["images"]), dim=-1)
        student_text = F.normalize(strategy.backend.encode_texts(CAPTIONS), dim=-1)
        term, _ = modx_distillation(student_image, student_text, image, text, batch["image_ids"])
    assert float(twenty["distill"]) > 0
    assert torch.allclose(forty["loss"] - twenty["loss"], 20 * twenty["distill"], rtol=1e-4)
    assert torch.allclose(twenty["distill"], term)
    assert torch.allclose(twenty["loss"], twenty["contrastive"] + 20 * term, rtol=1e-5)


@pytest.mark.parametrize("section", [{"name": "finetune"}, {"name": "finetune", "train": "image"}, {"name": "lwf"},
                                     {"name": "zscl", "reference_dataset": "synthetic-9", "reference_samples": 8,
                                      "reference_texts_dataset": "cifar10", "l2_weight": 0.01}],
                         ids=["finetune", "finetune-image", "lwf", "zscl"])
def test_caption_paths_train(section, tiny_run_config):
    strategy, stream = build(tiny_run_config, section)
    batch = caption_batch()
    if strategy.source_data:  # ZSCL: its reference draw, as the trainer adds it
        drawn = batch_by_hand(strategy, batch["images"], torch.zeros(8, dtype=torch.long), task=stream.tasks[0])
        batch["reference"] = drawn["reference"]
    outputs = train(strategy, batch)
    assert outputs[-1]["loss"] < 0.7 * outputs[0]["loss"], [o["loss"] for o in outputs]
    assert 0.0 <= outputs[-1]["accuracy"] <= 1.0
    if section.get("train") == "image":
        assert all(p.grad is None or not p.grad.any() for p in strategy.backend.text_tower.parameters())


@pytest.mark.parametrize("section", [{"name": "er", "memory_size": 16}, {"name": "vr_lwf", "pseudo_texts": 8},
                                     {"name": "moe_adapters", "num_experts": 2, "top_k": 2}],
                         ids=["er", "vr_lwf", "moe_adapters"])
def test_methods_without_a_caption_path_refuse_caption_batches_in_one_line(section, tiny_run_config):
    strategy, _ = build(tiny_run_config, section)
    strategy.before_task(PHASE)
    with pytest.raises(ConfigError, match="stream.protocol: captions") as error:
        strategy(caption_batch(), PHASE)
    assert "\n" not in str(error.value)


def test_mod_x_refuses_labelled_batches_in_one_line(tiny_run_config):
    strategy, stream = build(tiny_run_config, {"name": "mod_x"})
    strategy.before_task(stream.tasks[0])
    with pytest.raises(ConfigError, match=r"mod_x trains on image-caption streams \(stream.protocol: captions\)"):
        strategy({"images": torch.rand(4, 3, 32, 32), "targets": torch.zeros(4, dtype=torch.long)}, stream.tasks[0])


def test_a_run_config_refuses_mod_x_on_a_labelled_stream(tiny_run_config):
    with pytest.raises(ConfigError, match="'mod_x' cannot train on a labelled stream"):
        tiny_run_config({"name": "mod_x"})


def test_mod_x_config_checks():
    from clipcl.strategies import strategy_config

    config = strategy_config({"name": "mod_x"})
    assert (config.alpha, config.distill, config.kl_reduction, config.cognition_align) == (20.0, "whole_rows", "sum", True)
    for key, value in [("distill", "diagonal"), ("kl_reduction", "mean"), ("alpha", -1.0)]:
        with pytest.raises(ConfigError, match=f"strategy.{key}"):
            strategy_config({"name": "mod_x", key: value})


def test_a_labelled_batch_with_a_captions_source_is_still_labelled():
    from clipcl.strategies.base import batch_kind

    assert batch_kind(caption_batch()) == "captions"
    assert batch_kind({"images": None, "targets": None, "captions": {"images": None, "captions": ["a"]}}) == "labels"
