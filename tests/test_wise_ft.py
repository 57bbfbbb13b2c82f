"""WiSE-FT's interpolation after each task, with either anchor, against a hand computation."""

import pytest
import torch

from clipcl.config import ConfigError, StreamConfig
from clipcl.data.streams import build_stream
from clipcl.models.tiny import tiny_open_clip_backend
from clipcl.strategies.wise_ft import WiseFT, WiseFTConfig


@torch.no_grad()
def perturb(backend, seed):
    generator = torch.Generator().manual_seed(seed)
    for parameter in backend.parameters():
        if parameter.requires_grad:
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))


def trained(backend):
    return {name: p.detach().clone() for name, p in backend.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("anchor, alpha", [("zero_shot", 0.5), ("task_start", 0.8)])
def test_wise_ft_interpolates_with_its_anchor(anchor, alpha):
    stream = build_stream(StreamConfig(protocol="multi_domain", datasets=["synthetic-0", "synthetic-1"],
                                       test_samples_per_task=6), seed=0)
    backend = tiny_open_clip_backend(seed=0)
    strategy = WiseFT(backend, WiseFTConfig(name="wise_ft", anchor=anchor, alpha=alpha))
    zero_shot = trained(backend)
    first, second = stream.tasks
    strategy.before_task(first)
    perturb(backend, 1)  # "training" on the first task
    strategy.after_task(first)
    after_first = trained(backend)
    strategy.before_task(second)
    perturb(backend, 2)
    finetuned = trained(backend)
    strategy.after_task(second)
    # zero_shot: theta <- 0.5 theta_ft + 0.5 theta_0; task_start (ZSCL): theta <- 0.8 theta_ft + 0.2 theta_start.
    reference = zero_shot if anchor == "zero_shot" else after_first
    for name, value in trained(backend).items():
        expected = alpha * finetuned[name] + (1 - alpha) * reference[name]
        # Two roundings (mul_, add_) against the hand formula's three: float32 ulps, not bit-exact.
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
    assert any(not torch.equal(after_first[name], zero_shot[name]) for name in zero_shot)  # the anchors differ


def test_wise_ft_anchor_is_checked():
    with pytest.raises(ConfigError, match="strategy.anchor"):
        WiseFTConfig(name="wise_ft", anchor="previous")
