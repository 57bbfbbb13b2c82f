"""Compute accounting (clipcl.engine.compute): every run records what it spent, exactly."""

import torch

from clipcl.engine.compute import Compute, measuring
from clipcl.engine.run import run_experiment


def test_a_finetune_run_counts_its_samples_steps_and_passes(tiny_run_config):
    # finetune: one student pass per tower and sample, each with a backward (every tower trains).
    results = run_experiment(tiny_run_config(), show_progress=False)
    compute = results["compute"]
    assert len(compute["per_task"]) == 3
    for entry in compute["per_task"]:
        assert entry["optimizer_steps"] == 4
        assert entry["samples_seen"] == 4 * 16
        assert entry["image_forward"] == entry["image_backward"] == 4 * 16
        # The text tower encodes each step's class prompts (all the task's classes) with a gradient.
        assert entry["text_forward"] == entry["text_backward"] > 0
        assert entry["train_seconds"] > 0 and entry["eval_seconds"] > 0
    assert compute["samples_seen_cumulative"] == [64, 128, 192]
    assert compute["total"]["samples_seen"] == 192


def test_a_teacher_pass_counts_without_a_backward(tiny_run_config):
    # ZSCL distils from a frozen teacher on reference images: forward passes beyond the student's,
    # none of them with a gradient.
    plain = run_experiment(tiny_run_config(), show_progress=False)["compute"]["per_task"][0]
    config = tiny_run_config({"name": "zscl", "reference_dataset": "synthetic-9", "reference_samples": 32})
    config.output_dir += "-zscl"
    zscl = run_experiment(config, show_progress=False)["compute"]["per_task"][0]
    assert zscl["samples_seen"] == plain["samples_seen"]
    assert zscl["image_forward"] > zscl["image_backward"]
    assert zscl["image_backward"] >= plain["image_backward"]


def test_a_zero_shot_run_spends_nothing(tiny_run_config):
    compute = run_experiment(tiny_run_config({"name": "zero_shot"}), show_progress=False)["compute"]["total"]
    assert {key: compute[key] for key in ("samples_seen", "optimizer_steps", "image_forward", "text_forward")} == \
        {"samples_seen": 0, "optimizer_steps": 0, "image_forward": 0, "text_forward": 0}


def test_nested_encoders_count_once_and_only_while_measuring():
    from clipcl.models.tiny import TINY_IMAGE_SIZE, tiny_open_clip_backend

    backend = tiny_open_clip_backend()
    images = torch.zeros(3, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    tokens = backend.tokenize(["a", "b"])
    backend.encode_image(images)  # not measured: nothing counts
    compute = Compute()
    with measuring(compute):
        backend.encode_image(images)
        with torch.no_grad():
            backend.encode_text(tokens)
        # encode_text_embeddings runs encode_text inside: one text pass, not two
        backend.encode_text_embeddings(backend.embed_tokens(tokens), tokens)
    assert compute.image_forward == 3 and compute.image_backward == 3
    assert compute.text_forward == 4 and compute.text_backward == 2
