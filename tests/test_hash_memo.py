"""hash_module's in-process memo: every way clipcl (and torch) changes weights is seen, so a memoised
digest is never stale; the writes it cannot see are the documented exclusions."""

import hashlib
import inspect

import pytest
import torch
from torch import nn

from clipcl.adapt import inject
from clipcl.engine.runtime import Runtime
from clipcl.engine.trainer import Trainer
from clipcl.strategies.base import hash_module


def _fresh(module: nn.Module) -> str:
    """The digest without the memo, the way it was computed before the memo (bytes copies)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def _changed(model: nn.Module, change) -> None:
    before = hash_module(model)
    assert before == _fresh(model)
    change(model)
    after = hash_module(model)
    assert after == _fresh(model) and after != before


def _step(optimizer_class, **options):
    def change(model):
        optimizer = optimizer_class(model.parameters(), lr=0.1, **options)
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
    return change


@pytest.mark.parametrize("change", [
    _step(torch.optim.SGD, momentum=0.9, foreach=False), _step(torch.optim.SGD, foreach=True),
    _step(torch.optim.Adam, foreach=True), _step(torch.optim.AdamW, foreach=False),
    _step(torch.optim.AdamW, fused=False)], ids=["sgd", "sgd-foreach", "adam-foreach", "adamw", "adamw-clipcl"])
def test_optimizer_steps_change_the_digest(change):
    _changed(_model(), change)


def test_load_state_dict_in_place_ops_and_replaced_data_change_the_digest():
    other = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    _changed(_model(), lambda model: model.load_state_dict(other.state_dict()))
    _changed(_model(), lambda model: torch.no_grad()(lambda: model[0].weight.add_(1.0))())
    _changed(_model(), lambda model: torch.no_grad()(lambda: model[2].bias.mul_(0.5).add_(0.1))())  # WiSE-FT's form

    def replace(model):
        model[0].weight.data = model[0].weight.detach() + 1.0
    _changed(_model(), replace)


def test_replaced_storage_never_reuses_an_address_the_memo_saw():
    # Replace the data twice: without the memo keeping the first storage alive, the allocator may
    # give the third tensor the first one's address, with the same id and version counter.
    model = _model()
    for step in range(20):
        hash_module(model)
        model[0].weight.data = torch.full((4, 4), float(step))
        model[0].weight.data = torch.full((4, 4), float(step) + 0.5)
        assert hash_module(model) == _fresh(model)


def test_lora_injection_and_training_the_factors_change_the_digest():
    model = _model()
    before = hash_module(model)
    inject(model, "lora", ["0"], rank=2)
    assert hash_module(model) == _fresh(model) != before
    _changed(model, _step(torch.optim.SGD))


def test_unchanged_weights_keep_the_memoised_digest_and_buffers_count():
    model = nn.BatchNorm1d(3)
    digest = hash_module(model)
    assert hash_module(model) == digest
    model.train()
    model(torch.randn(5, 3))  # running statistics: buffers, updated in place
    assert hash_module(model) == _fresh(model) != digest


def test_documented_exclusions_are_not_seen():
    # The docstring's exclusions, kept true here: clipcl never writes weights these ways.
    model = _model()
    digest = hash_module(model)
    model[0].weight.data.add_(1.0)
    assert hash_module(model) == digest != _fresh(model)
    model = _model()
    digest = hash_module(model)
    _step(torch.optim.AdamW, fused=True)(model)  # the fused kernel leaves the version counters alone
    assert hash_module(model) == digest != _fresh(model)


def test_clipcl_optimizers_are_never_fused():
    assert "fused=False" in inspect.getsource(Runtime.fit)
    assert "fused=False" in inspect.getsource(Trainer)
