"""Learning-rate schedules: the ``step`` schedule (Ding et al.'s StepLR) against torch's own StepLR."""

import pytest
import torch

from clipcl.config import ConfigError, TrainConfig
from clipcl.data.synthetic import load_synthetic
from clipcl.engine.runtime import Runtime
from clipcl.engine.trainer import Trainer
from clipcl.run import run_experiment


class OneParameter(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3))

    def trainable_parameters(self):
        return [self.weight]


def rates(scheduler, optimizer, steps):
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("step_epochs, steps_per_epoch", [(10.0, 4), (2.0 / 3.0, 30), (1.0, 7)])
def test_step_schedule_equals_torch_steplr(step_epochs, steps_per_epoch):
    config = TrainConfig(lr=0.01, lr_schedule="step", lr_step_epochs=step_epochs, lr_step_gamma=0.1)
    trainer = Trainer(OneParameter(), Runtime(torch.device("cpu")), config)
    total = 15 * steps_per_epoch
    assert trainer.begin(total, "step", steps_per_epoch=steps_per_epoch)
    ours = rates(trainer.scheduler, trainer.optimizer, total)
    # Independent: torch's StepLR with Ding's step size, 10 epochs of batches (methods/vrd.py).
    parameter = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([parameter], lr=0.01)
    reference = torch.optim.lr_scheduler.StepLR(optimizer, step_size=round(step_epochs * steps_per_epoch), gamma=0.1)
    expected = rates(reference, optimizer, total)
    # Both compute lr * gamma**k in float64 Python arithmetic, the same expression up to rounding of
    # the power: compare to a few ulps of a double.
    assert ours == pytest.approx(expected, rel=1e-12, abs=0)
    assert min(ours) < max(ours)  # the cut happened within the run


def test_a_task_stream_tells_the_step_schedule_its_epochs(tiny_run_config, monkeypatch, tmp_path):
    seen = []
    original = Trainer.begin

    def recording(self, total_steps, schedule="cosine", steps_per_epoch=None, warmup_steps=None):
        seen.append((total_steps, schedule, steps_per_epoch))
        return original(self, total_steps, schedule, steps_per_epoch, warmup_steps)

    monkeypatch.setattr(Trainer, "begin", recording)
    config = tiny_run_config(train={"lr_schedule": "step", "lr_step_epochs": 1, "epochs": 2, "batch_size": 16,
                                    "max_steps_per_task": 3})
    run_experiment(config, show_progress=False)
    per_epoch = len(load_synthetic("synthetic-0", "train")) // 16  # whole batches of one epoch
    # The cut is placed by whole epochs even when max_steps_per_task ends the task earlier.
    assert len(seen) == 3 and all(entry == (3, "step", float(per_epoch)) for entry in seen), seen


def test_online_streams_refuse_the_step_schedule(tiny_run_config):
    from tests.test_engine import ONLINE

    with pytest.raises(ConfigError, match="^train.lr_schedule: step"):
        tiny_run_config(stream=ONLINE, train={"lr_schedule": "step"})


def test_adam_moments_reach_the_optimizer():
    config = TrainConfig(lr=0.01, adam_betas=[0.9, 0.98], adam_eps=1e-6, lr_schedule="constant")
    assert config.adam_betas == [0.9, 0.98]
    model = OneParameter()
    trainer = Trainer(model, Runtime(torch.device("cpu")), config)
    assert trainer.begin(3, "constant")
    group = trainer.optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.98) and group["eps"] == 1e-6
    # The same torch AdamW on the same tensors in one process: the steps agree to the bit.
    parameter = torch.nn.Parameter(torch.zeros(3))
    reference = torch.optim.AdamW([parameter], lr=0.01, weight_decay=0.0, betas=(0.9, 0.98), eps=1e-6, fused=False)
    for gradient in (torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.25, 3.0, -1.0])):
        model.weight.grad, parameter.grad = gradient.clone(), gradient.clone()
        trainer.optimizer.step()
        reference.step()
    assert torch.equal(model.weight, parameter)



def test_a_run_saves_its_adam_moments_and_reads_them_back(tiny_run_config, tmp_path):
    from clipcl.config import load_config

    config = tiny_run_config(train={"adam_betas": [0.9, 0.98], "adam_eps": 1e-6, "max_steps_per_task": 2})
    run_experiment(config, show_progress=False)
    (saved,) = (tmp_path / "run").glob("**/config.yaml")
    again = load_config(saved)
    assert again.train.adam_betas == [0.9, 0.98] and again.train.adam_eps == 1e-6


def test_adam_moments_enter_the_fingerprint_only_off_their_defaults(tiny_run_config):
    from clipcl.config import config_fingerprint

    default = config_fingerprint(tiny_run_config())
    assert "adam_" not in default  # the fingerprint of a run made before these keys existed
    assert config_fingerprint(tiny_run_config(train={"adam_betas": [0.9, 0.999], "adam_eps": 1e-8})) == default
    assert config_fingerprint(tiny_run_config(train={"adam_betas": [0.9, 0.98]})) != default
    assert config_fingerprint(tiny_run_config(train={"adam_eps": 1e-6})) != default


def test_a_method_s_own_groups_get_the_moments_and_keep_their_own_eps():
    class TwoGroups(OneParameter):
        def parameter_groups(self, parameters, weight_decay):
            return [{"params": parameters, "weight_decay": 0.0, "row_scales": [None], "row_decay": 0.0, "eps": 1e-6}]

    config = TrainConfig(lr=0.01, adam_betas=[0.9, 0.98], adam_eps=1e-7, lr_schedule="constant")
    trainer = Trainer(TwoGroups(), Runtime(torch.device("cpu")), config)
    assert trainer.begin(3, "constant")
    assert type(trainer.optimizer).__name__ == "RowScaledAdamW"
    group = trainer.optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.98) and group["eps"] == 1e-6  # a group's own eps (cll_clip's) wins


def test_adam_betas_read_every_spelling_of_two_numbers():
    from clipcl.config import load_config

    for spelling in ("[0.9,0.98]", "0.9,0.98", "[9e-1,0.98]"):
        assert load_config(None, [f"train.adam_betas={spelling}"]).train.adam_betas == [0.9, 0.98], spelling
