"""Config checks: every bad value fails with one line naming its key, before any model or data is built."""

from __future__ import annotations

import pytest
import torch
import yaml

import clipcl.data.online_stream
import clipcl.data.streams
import clipcl.models
from clipcl.cli import main
from clipcl.config import (
    ConfigError,
    RunConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    shipped_configs,
    to_dict,
)
from clipcl.run import run_experiment
from clipcl.strategies import STRATEGIES, describe, presets, strategy_config

ONLINE = "stream.protocol=si_blurry"

# (overrides, the dotted key the one-line message must name)
BAD = [
    (["model.backend=tensorflow"], "model.backend"),
    (["model.name="], "model.name"),
    (["model.image_size=0"], "model.image_size"),
    (["model.backend=hf", "model.name=x", "model.pretrained=openai"], "model.pretrained"),
    (["model.backend=hf", "model.name=x", "model.image_size=64"], "model.image_size"),
    (["model.pretrained=openai"], "model.pretrained"),
    (["stream.protocol=online"], "stream.protocol"),
    (["stream.datasets=[]"], "stream.datasets"),
    (["stream.num_tasks=0"], "stream.num_tasks"),
    (["stream.class_order_seed=-1"], "stream.class_order_seed"),
    (["stream.train_samples_per_task=0"], "stream.train_samples_per_task"),
    (["stream.test_samples_per_task=-3"], "stream.test_samples_per_task"),
    (["stream.heldout_samples=0"], "stream.heldout_samples"),
    (["stream.disjoint_class_ratio=1.5"], "stream.disjoint_class_ratio"),
    (["stream.blurry_sample_ratio=-0.1"], "stream.blurry_sample_ratio"),
    (["train.epochs=0"], "train.epochs"),
    (["train.max_steps_per_task=0"], "train.max_steps_per_task"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.batch_size=-4"], "train.batch_size"),
    (["train.grad_accumulation=0"], "train.grad_accumulation"),
    (["train.lr=0"], "train.lr"),
    (["train.lr=-1"], "train.lr"),
    (["train.lr=nan"], "train.lr"),
    (["train.lr=inf"], "train.lr"),
    (["train.weight_decay=-0.1"], "train.weight_decay"),
    (["train.adam_betas=[0.9,1.0]"], "train.adam_betas"),
    (["train.adam_betas=0.9"], "train.adam_betas"),
    (["train.adam_betas=[0.9,soon]"], "train.adam_betas"),
    (["train.adam_eps=0"], "train.adam_eps"),
    (["train.warmup_steps=-1"], "train.warmup_steps"),
    (["train.precision=fp64"], "train.precision"),
    (["train.accelerator=tpu"], "train.accelerator"),
    (["train.devices=0"], "train.devices"),
    (["train.batch_size=5", "train.devices=2"], "train.batch_size"),
    (["train.num_workers=-1"], "train.num_workers"),
    (["train.max_grad_norm=0"], "train.max_grad_norm"),
    (["train.online_iter=0"], "train.online_iter"),
    (["eval.batch_size=0"], "eval.batch_size"),
    (["eval.eval_period=0"], "eval.eval_period"),
    (["eval.eval_period=-5"], "eval.eval_period"),
    (["eval.retrieval_images=0"], "eval.retrieval_images"),
    (["seed=-1"], "seed"),
    (["strategy.name=nope"], "strategy"),
    (["strategy.name=finetune", "strategy.label_space=all"], "strategy.label_space"),
    (["strategy.name=finetune", "strategy.peft=prefix"], "strategy.peft"),
    (["strategy.name=finetune", "strategy.peft=lora", "strategy.train=image_projection"], "strategy.train"),
    (["strategy.name=sit", "strategy.label_space=none"], "strategy.label_space"),
    (["strategy.name=er", "strategy.memory_size=-1"], "strategy.memory_size"),
    (["strategy.name=lwf", "strategy.alpha=-1"], "strategy.alpha"),
    (["strategy.name=lwf", "strategy.temperature=0"], "strategy.temperature"),
    (["strategy.name=lwf", "strategy.teacher_refresh_every=0"], "strategy.teacher_refresh_every"),
    (["strategy.name=lwf", "strategy.label_space=batch"], "strategy.label_space"),
    (["strategy.name=wise_ft", "strategy.alpha=1.5"], "strategy.alpha"),
    (["strategy.name=vr_lwf", "strategy.variant=paper"], "strategy.variant"),
    (["strategy.name=vr_lwf", "strategy.temperature=0"], "strategy.temperature"),
    (["strategy.name=vr_lwf", "strategy.pseudo_texts=0"], "strategy.pseudo_texts"),
    (["strategy.name=vr_lwf", "strategy.text_to_image=3"], "strategy.text_to_image"),
    (["strategy.name=zscl", "strategy.reference_preprocess=none"], "strategy.reference_preprocess"),
    (["strategy.name=zscl", "strategy.l2_weight=-1"], "strategy.l2_weight"),
    (["strategy.name=zscl", "strategy.average_every=0"], "strategy.average_every"),
    (["strategy.name=zscl", "strategy.reference_batch_size=0"], "strategy.reference_batch_size"),
    (["strategy.name=moe_adapters", "strategy.routers=one"], "strategy.routers"),
    (["strategy.name=moe_adapters", "strategy.selector=oracle"], "strategy.selector"),
    (["strategy.name=moe_adapters", "strategy.freeze_experts_per_task=30"], "strategy.freeze_experts_per_task"),
    (["strategy.name=moe_adapters", "strategy.ddas_quantile=0"], "strategy.ddas_quantile"),
    (["strategy.name=moe_adapters", "strategy.ddas_shape=linear"], "strategy.ddas_shape"),
    (["strategy.name=moe_adapters", "strategy.ddas_batch_size=0"], "strategy.ddas_batch_size"),
    (["strategy.name=moe_adapters", "strategy.ddas_lr=0"], "strategy.ddas_lr"),
    ([ONLINE, "strategy.name=vr_lwf"], "strategy.name"),
    (["train.lr_schedule=linear"], "train.lr_schedule"),
    (["strategy.name=er", "strategy.memory=fifo"], "strategy.memory"),
]


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("overrides, key", BAD, ids=[" ".join(overrides) for overrides, _ in BAD])
def test_a_bad_override_fails_with_one_line_naming_its_key(overrides, key):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert key in _one_line(error)


@pytest.mark.parametrize("overrides, key", BAD, ids=[" ".join(overrides) for overrides, _ in BAD])
def test_a_bad_yaml_file_fails_with_one_line_naming_its_key(overrides, key, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(apply_overrides({}, overrides)))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert key in _one_line(error)


def test_defaults_and_shipped_configs_are_valid_and_round_trip():
    assert to_dict(from_dict(RunConfig, {})) == to_dict(RunConfig())
    for name, path in shipped_configs().items():
        config = load_config(path)
        assert to_dict(from_dict(RunConfig, to_dict(config))) == to_dict(config), name
    for name, cls in STRATEGIES.items():
        assert strategy_config({"name": name}) == cls.Config(name=name, **presets().get(name, {}).get("defaults", {}))


def test_a_preset_is_its_base_method_with_other_defaults():
    assert STRATEGIES["sit"] is STRATEGIES["finetune"]
    config = strategy_config({"name": "sit"})
    assert (config.name, config.peft, config.label_space) == ("sit", "lora", "batch")
    assert strategy_config({"name": "sit", "label_space": "task"}).label_space == "task"  # the user's keys win
    with pytest.raises(ConfigError, match="unknown key 'strategy.memory_size'"):
        strategy_config({"name": "sit", "memory_size": 4})
    assert "SIT" in describe("sit") and "\n" not in describe("sit")


def test_edge_values_stay_valid():
    # The ends of each range are allowed: a config that was valid before the checks still is.
    load_config(None, ["stream.disjoint_class_ratio=0", "stream.blurry_sample_ratio=1", "train.warmup_steps=0",
                       "train.weight_decay=0", "train.max_grad_norm=null", "train.num_workers=0",
                       "eval.retrieval_images=null", "seed=0", "train.batch_size=6", "train.devices=3",
                       "strategy.name=wise_ft", "strategy.alpha=1"])
    load_config(None, ["strategy.name=er", "strategy.memory_size=0"])
    load_config(None, ["strategy.name=moe_adapters", "strategy.freeze_experts_per_task=0",
                       "strategy.ddas_calibration_fraction=0", "strategy.ddas_quantile=1"])


def test_constructing_a_section_directly_is_checked_too():
    with pytest.raises(ConfigError, match="train.grad_accumulation"):
        TrainConfig(grad_accumulation=0)
    with pytest.raises(ConfigError, match="strategy.alpha"):
        STRATEGIES["wise_ft"].Config(name="wise_ft", alpha=-0.5)


@pytest.fixture
def nothing_may_be_built(monkeypatch):
    """Make building a backend or a stream fail loudly, so a test sees whether one was attempted."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model or a dataset was built before the config was checked")

    monkeypatch.setattr(clipcl.models, "build_backend", refuse)
    monkeypatch.setattr(clipcl.data.streams, "build_stream", refuse)
    monkeypatch.setattr(clipcl.data.online_stream, "build_online_stream", refuse)


@pytest.mark.parametrize("field, value", [("lr", -1.0), ("batch_size", 0), ("precision", "fp64")])
def test_run_experiment_checks_the_config_before_building_anything(nothing_may_be_built, tmp_path, field, value):
    config = load_config(None, [f"output_dir={tmp_path / 'run'}"])
    setattr(config.train, field, value)  # changed in place, after the config was checked
    with pytest.raises(ConfigError) as error:
        run_experiment(config, show_progress=False)
    assert f"train.{field}" in _one_line(error)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens on a machine without CUDA")
@pytest.mark.parametrize("overrides, key", [(["train.accelerator=cuda"], "train.accelerator"),
                                            (["train.accelerator=cpu", "train.precision=fp16"], "train.precision")])
def test_device_checks_run_before_anything_is_built(nothing_may_be_built, tmp_path, overrides, key):
    # These need the machine, so clipcl.engine.runtime makes them when it picks the device, still first.
    config = load_config(None, [*overrides, f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError) as error:
        run_experiment(config, show_progress=False)
    assert key in _one_line(error)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, key", [(["train.lr=-1"], "train.lr"),
                                            (["strategy.name=lwf", "strategy.temperature=0"], "strategy.temperature")])
def test_cli_run_with_a_bad_config_exits_2_with_one_line(nothing_may_be_built, tmp_path, capsys, overrides, key):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(apply_overrides({"output_dir": str(tmp_path / "run")}, overrides)))
    for argv in (["run", str(path)], ["run", str(tmp_path / "good.yaml"), *overrides]):
        (tmp_path / "good.yaml").write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run")}))
        assert main(argv) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("clipcl: error:") and key in lines[0]
        assert captured.out == ""
    assert not (tmp_path / "run").exists()
