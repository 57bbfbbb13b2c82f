"""LoRA and parallel adapters (clipcl.adapt): exact at initialisation, correct arithmetic once
trained, only the added parameters train, clear errors, and state dicts that round-trip."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipcl.adapt import (
    AdaptationWrapper,
    LoRAConv1x1,
    LoRALinear,
    LoRAMultiheadAttention,
    ParallelAdapter,
    added_parameters,
    default_targets,
    inject,
)
from clipcl.config import ModelConfig
from clipcl.models import build_backend
from clipcl.models.hf_backend import HFClipBackend
from clipcl.models.open_clip_backend import OpenClipBackend
from clipcl.models.starter import StarterBackend
from clipcl.models.tiny import TINY_IMAGE_SIZE, tiny_open_clip_backend, write_tiny_hf_clip

TEXTS = ["a photo of a cat.", "a blurry picture of a dog", "an airplane"]


def _images(count=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)


def _encode(backend):
    return backend.encode_image(_images()), backend.encode_texts(TEXTS)


def _randomise(parameters, seed):
    """Give parameters (e.g. the zero-initialised LoRA B factors) nonzero values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


# --- state-dict helpers (for these tests only) -------------------------------------------------------


def mark_only_added_trainable(model):
    """Set ``requires_grad`` on the added parameters only; returns the names of the trainable ones."""
    keep = {id(parameter) for parameter in added_parameters(model)}
    trainable = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(id(parameter) in keep)
        if id(parameter) in keep:
            trainable.append(name)
    return trainable


def added_state_dict(model):
    """The added parameters under their ``model.state_dict()`` names (detached, storage shared)."""
    keep = {id(parameter) for parameter in added_parameters(model)}
    return {name: parameter.detach() for name, parameter in model.named_parameters() if id(parameter) in keep}


def load_added_state_dict(model, state):
    """Load what :func:`added_state_dict` returned into a model injected the same way."""
    expected = added_state_dict(model)
    if set(expected) != set(state):
        raise ValueError("the state does not fit this model's LoRA/adapters")
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(state[name])


def _strip_wrappers(name):
    """A state-dict key of an injected model as the unmodified model names it."""
    return name.replace(".base.", ".")


@pytest.fixture(scope="module")
def open_clip_backend():
    return tiny_open_clip_backend(seed=0).eval()


@pytest.fixture(scope="module")
def hf_backend(tmp_path_factory):
    directory = write_tiny_hf_clip(tmp_path_factory.mktemp("tiny-hf-peft"), seed=0)
    return build_backend(ModelConfig(backend="hf", name=str(directory))).eval()


@pytest.fixture(params=["open_clip", "hf"])
def backend(request, open_clip_backend, hf_backend):
    return {"open_clip": open_clip_backend, "hf": hf_backend}[request.param]


def _injected(backend, seed=1):
    """A copy of ``backend`` with default LoRA in both towers and adapters beside every MLP."""
    model = copy.deepcopy(backend)
    torch.manual_seed(seed)
    lora = inject(model, "lora", default_targets(backend), rank=4, alpha=8.0)
    adapters = inject(model, "adapter", default_targets(backend, "adapter"), bottleneck=8)
    return model, lora, adapters


# --- the modules on their own ------------------------------------------------------------------------


def test_lora_linear_is_exact_at_init_and_adds_the_scaled_low_rank_update():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    x = torch.randn(4, 3, 6)
    expected = base(x).detach()
    layer = LoRALinear(base, rank=2, alpha=4.0)
    assert torch.equal(layer(x), expected)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.weight is base.weight and layer.in_features == 6  # attribute reads reach the base
    assert [p.shape for p in layer.added_parameters()] == [torch.Size([2, 6]), torch.Size([5, 2])]

    _randomise([layer.lora_B], seed=1)
    merged = base.weight + 2.0 * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(layer(x), F.linear(x, merged, base.bias))
    assert not torch.allclose(layer(x), expected)
    with pytest.raises(TypeError):
        LoRALinear(nn.Conv2d(3, 3, 1), rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(3, 3), rank=0, alpha=2.0)


def test_lora_conv1x1_is_exact_at_init_and_refuses_other_convolutions():
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, kernel_size=1, stride=2)
    x = torch.randn(2, 4, 9, 9)
    expected = base(x).detach()
    layer = LoRAConv1x1(base, rank=3, alpha=3.0)
    assert torch.equal(layer(x), expected)
    assert not base.weight.requires_grad

    _randomise([layer.lora_B], seed=2)
    merged = base.weight + (layer.lora_B @ layer.lora_A)[:, :, None, None]
    torch.testing.assert_close(layer(x), F.conv2d(x, merged, base.bias, stride=2))
    torch.testing.assert_close(layer.delta_weight(), merged - base.weight)

    for conv, reason in ((nn.Conv2d(4, 6, kernel_size=3), "3x3"),
                         (nn.Conv2d(4, 4, kernel_size=1, groups=4), "groups=4")):
        with pytest.raises(ValueError, match=reason) as error:
            LoRAConv1x1(conv, rank=2, alpha=2.0)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("batch_first", [True, False])
def test_lora_multihead_attention_is_exact_at_init_and_uses_the_merged_weights(batch_first):
    torch.manual_seed(0)
    base = nn.MultiheadAttention(16, 2, batch_first=batch_first)
    reference = copy.deepcopy(base)
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    causal = torch.full((5, 5), float("-inf")).triu(1)  # open_clip's text mask: float, -inf above the diagonal
    layer = LoRAMultiheadAttention(base, rank=2, alpha=4.0)
    # open_clip's call: attn(q, k, v, need_weights=False, attn_mask=mask)[0], with and without a mask,
    # in training mode with gradients and in eval mode without (where torch may take its fused path).
    for mask in (None, causal):
        for training in (True, False):
            layer.train(training), reference.train(training)
            with torch.set_grad_enabled(training):
                out = layer(x, x, x, need_weights=False, attn_mask=mask)
                expected = reference(x, x, x, need_weights=False, attn_mask=mask)
            assert out[1] is None and torch.equal(out[0], expected[0])
    assert not any(parameter.requires_grad for parameter in base.parameters())

    layer.train()
    _randomise(layer.lora_B.values(), seed=3)
    merged = layer.merged_parameters()
    with torch.no_grad():
        reference.in_proj_weight.copy_(merged["in_proj_weight"])
        reference.out_proj.weight.copy_(merged["out_proj.weight"])
    out = layer(x, x, x, need_weights=False, attn_mask=causal)[0]
    torch.testing.assert_close(out, reference(x, x, x, need_weights=False, attn_mask=causal)[0])
    out.square().sum().backward()
    assert all(parameter.grad is not None for parameter in layer.added_parameters())
    assert base.in_proj_weight.grad is None


def test_lora_multihead_attention_with_separate_key_and_value_widths():
    torch.manual_seed(0)
    base = nn.MultiheadAttention(8, 2, kdim=6, vdim=4, batch_first=True)
    reference = copy.deepcopy(base)
    query, key, value = torch.randn(2, 3, 8), torch.randn(2, 4, 6), torch.randn(2, 4, 4)
    layer = LoRAMultiheadAttention(copy.deepcopy(base), rank=2, alpha=2.0)
    assert layer.lora_A["k"].shape == (2, 6) and layer.lora_A["v"].shape == (2, 4)
    assert torch.equal(layer(query, key, value)[0], reference(query, key, value)[0])

    # LoRA on some projections only: the others keep their frozen base weights.
    layer = LoRAMultiheadAttention(base, rank=2, alpha=2.0, projections="vk")
    assert layer.projections == "kv" and sorted(layer.lora_A) == ["k", "v"]
    assert set(layer.merged_parameters()) == {"k_proj_weight", "v_proj_weight"}
    _randomise(layer.lora_B.values(), seed=4)
    with torch.no_grad():
        for name, tensor in layer.merged_parameters().items():
            getattr(reference, name).copy_(tensor)
    torch.testing.assert_close(layer(query, key, value)[0], reference(query, key, value)[0])
    with pytest.raises(ValueError, match="qkvo"):
        LoRAMultiheadAttention(nn.MultiheadAttention(8, 2), rank=2, alpha=2.0, projections="qx")


def test_parallel_adapter_is_exact_at_init_and_adds_the_bottleneck_branch():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    x = torch.randn(2, 5, 8)
    expected = base(x).detach()
    adapter = ParallelAdapter(base, 8, 8, bottleneck=4, scale=0.5)
    assert torch.equal(adapter(x), expected)
    assert not any(parameter.requires_grad for parameter in base.parameters())

    _randomise([adapter.up.weight, adapter.up.bias], seed=5)
    branch = adapter.up(F.relu(adapter.down(x)))
    torch.testing.assert_close(adapter(x), expected + 0.5 * branch)

    # Modules returning a tuple (attention) get the branch added to their first output.
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    # Compare with frozen weights: torch's matmul picks its kernel by whether the weight requires grad.
    plain = copy.deepcopy(attention).requires_grad_(False)(x, x, x)
    wrapped = ParallelAdapter(attention, 8, 8, bottleneck=4)
    out = wrapped(x, x, x)
    assert isinstance(out, tuple) and torch.equal(out[0], plain[0]) and torch.equal(out[1], plain[1])


# --- inject into the tiny backends --------------------------------------------------------------------


def test_inject_leaves_the_embeddings_exactly_unchanged(backend):
    model, lora, adapters = _injected(backend)
    if backend.backend_name == "open_clip":
        assert len(lora) == 4 and all(name.endswith(".attn") for name in lora)
        assert isinstance(model.model.transformer.resblocks[0].attn, LoRAMultiheadAttention)
    else:
        assert len(lora) == 16 and all(name.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "out_proj")
                                       for name in lora)
    assert len(adapters) == 4 and all(name.endswith(".mlp") for name in adapters)
    for names in (lora, adapters):  # both towers are covered
        assert any("visual" in name or "vision" in name for name in names)
        assert any("visual" not in name and "vision" not in name for name in names)

    with torch.no_grad():
        for expected, actual in zip(_encode(backend), _encode(model)):
            assert torch.equal(expected, actual)
    # Training mode with gradients takes other kernels; compare like with like.
    reference = copy.deepcopy(backend).train()
    model.train()
    for expected, actual in zip(_encode(reference), _encode(model)):
        assert torch.equal(expected, actual)


def test_one_step_changes_the_outputs_and_only_the_added_parameters(backend):
    model, _, _ = _injected(backend)
    trainable = mark_only_added_trainable(model)
    added = added_parameters(model)
    assert len(trainable) == len(added) > 0
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in added}
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        initial = _encode(model)

    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    images, texts = _encode(model)
    logits = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T * 10.0
    loss = F.cross_entropy(logits, torch.arange(len(TEXTS)))
    loss.backward()
    optimizer.step()

    model.eval()
    with torch.no_grad():
        for old, new in zip(initial, _encode(model)):
            assert not torch.equal(old, new) and (old - new).abs().max() > 1e-6
    added_names = set(added_state_dict(model))
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed and changed <= added_names
    assert any(name.endswith(("lora_B.q", "q_proj.lora_B")) for name in changed)
    # Every other entry is bitwise the unmodified model's, under its original name.
    original = backend.state_dict()
    others = [name for name in model.state_dict() if name not in added_names]
    assert sorted(_strip_wrappers(name) for name in others) == sorted(original)
    for name in others:
        assert torch.equal(model.state_dict()[name], original[_strip_wrappers(name)])


def test_state_dict_round_trips_into_a_freshly_injected_model(backend, tmp_path):
    trained, _, _ = _injected(backend, seed=1)
    _randomise([p for name, p in trained.named_parameters() if "lora_B" in name or ".up." in name], seed=6)
    path = tmp_path / "peft.pt"
    torch.save(trained.state_dict(), path)
    with torch.no_grad():
        expected = _encode(trained)

    fresh, _, _ = _injected(backend, seed=2)  # different random A / down factors
    with torch.no_grad():
        assert not torch.equal(_encode(fresh)[0], expected[0])
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    with torch.no_grad():
        for want, got in zip(expected, _encode(fresh)):
            assert torch.equal(want, got)

    # Only the added parameters, through added_state_dict / load_added_state_dict.
    buffer = io.BytesIO()
    torch.save(added_state_dict(trained), buffer)
    buffer.seek(0)
    other, _, _ = _injected(backend, seed=3)
    load_added_state_dict(other, torch.load(buffer, weights_only=True))
    with torch.no_grad():
        for want, got in zip(expected, _encode(other)):
            assert torch.equal(want, got)
    image_only = copy.deepcopy(backend)
    inject(image_only, "lora", default_targets(backend, towers=["image"]), rank=4, alpha=8.0)
    with pytest.raises(ValueError, match="does not fit"):
        load_added_state_dict(image_only, added_state_dict(trained))


# --- errors ------------------------------------------------------------------------------------------


def _assert_untouched(model, reference):
    assert not any(isinstance(module, AdaptationWrapper) for module in model.modules())
    assert all(parameter.requires_grad for parameter in model.parameters())
    assert list(model.state_dict()) == list(reference.state_dict())


def test_inject_errors_are_one_line_and_leave_the_model_unchanged(open_clip_backend):
    model = copy.deepcopy(open_clip_backend)
    cases = [
        (("lora", ["*.no_such_module"]), "no module .* matches"),
        (("lora", ["*.attn.out_proj"]), "inside an nn.MultiheadAttention"),
        (("lora", ["model.visual.conv1"]), "8x8 kernel"),
        (("lora", ["*.resblocks.0.ln_1"]), "is a LayerNorm"),
        (("adapter", ["*.resblocks.0.mlp", "*.resblocks.0.mlp.c_fc"]), "match both"),
        (("lora", ["*.attn"]), None),  # fine, but with an unknown option:
    ]
    for (kind, targets), message in cases:
        options = {"rnak": 4} if message is None else {}
        with pytest.raises(ValueError, match=message or "unknown option") as error:
            inject(model, kind, targets, **options)
        text = str(error.value)
        assert "\n" not in text
        if message is not None and "match both" not in message:
            assert "candidates for" in text and "model.visual.transformer.resblocks.*.attn" in text
        _assert_untouched(model, open_clip_backend)
    with pytest.raises(ValueError, match="kind"):
        inject(model, "prefix", ["*.attn"])
    with pytest.raises(ValueError, match="rank"):
        inject(model, "lora", ["*.attn"], rank=0)
    with pytest.raises(ValueError, match="dropout"):
        inject(model, "lora", ["*.attn"], dropout=0.1)  # attention LoRA merges weights: no input dropout
    _assert_untouched(model, open_clip_backend)

    assert inject(model, "lora", ["model.visual.*.attn"]) == [
        "model.visual.transformer.resblocks.0.attn", "model.visual.transformer.resblocks.1.attn"]
    with pytest.raises(ValueError, match="already has a LoRAMultiheadAttention"):
        inject(model, "lora", ["model.visual.*.attn"])
    # An adapter may go around an already wrapped module; names stay the original ones.
    assert inject(model, "adapter", ["model.visual.transformer.resblocks.1.attn"]) == [
        "model.visual.transformer.resblocks.1.attn"]
    outer = model.model.visual.transformer.resblocks[1].attn
    assert isinstance(outer, ParallelAdapter) and isinstance(outer.base, LoRAMultiheadAttention)
    with torch.no_grad():
        assert torch.equal(model.encode_image(_images()), open_clip_backend.encode_image(_images()))


def test_hf_attention_module_is_not_a_lora_target(hf_backend):
    model = copy.deepcopy(hf_backend)
    with pytest.raises(ValueError, match="is a CLIPAttention") as error:
        inject(model, "lora", ["*.self_attn"])
    assert "self_attn.q_proj" in str(error.value)


# --- default targets ---------------------------------------------------------------------------------


def test_each_backend_keeps_default_targets_for_both_towers(open_clip_backend):
    for backend_class in (OpenClipBackend, HFClipBackend, StarterBackend):
        table = backend_class.ADAPTATION_TARGETS
        assert set(table) == {"lora", "adapter", "adapter_sequential"}
        assert all(set(towers) == {"image", "text"} and all(towers.values()) for towers in table.values())
    assert default_targets(open_clip_backend, "lora", towers=["text"]) == list(
        OpenClipBackend.ADAPTATION_TARGETS["lora"]["text"])
    with pytest.raises(ValueError, match="no default targets for 'prompts'"):
        open_clip_backend.adaptation_targets("prompts", ["image"])
    with pytest.raises(ValueError, match="towers"):
        default_targets(open_clip_backend, "lora", towers="image")


def test_starter_default_targets_match_the_real_module_layout():
    """The starter model is slow to build; its towers' architectures (random, small BERT) stand in."""
    efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    starter_like = nn.Module()
    starter_like._image = nn.Module()
    starter_like._image.classifier = efficientnet.EfficientNet.from_name("efficientnet-lite0").eval()
    starter_like._text = nn.Module()
    starter_like._text.encoder = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                      intermediate_size=64, vocab_size=100)).eval()
    images, ids = torch.randn(1, 3, 64, 64), torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        expected = starter_like._image.classifier(images), starter_like._text.encoder(input_ids=ids)[0]

    table = StarterBackend.ADAPTATION_TARGETS
    lora = inject(starter_like, "lora", [p for tower in ("image", "text") for p in table["lora"][tower]])
    adapters = inject(starter_like, "adapter", [p for tower in ("image", "text") for p in table["adapter"][tower]])
    convs = [name for name in lora if name.endswith(("_conv", "_conv_head"))]
    modules = dict(starter_like.named_modules())
    assert len(convs) == 11 and all(isinstance(modules[name], LoRAConv1x1) for name in convs)
    assert "_image.classifier._fc" in lora and "_image.classifier._fc" in adapters
    assert sum(".attention." in name for name in lora) == 8  # query, key, value, output.dense x 2 layers
    assert [name for name in adapters if name.startswith("_text")] == [
        "_text.encoder.encoder.layer.0", "_text.encoder.encoder.layer.1"]
    with torch.no_grad():
        assert torch.equal(starter_like._image.classifier(images), expected[0])
        assert torch.equal(starter_like._text.encoder(input_ids=ids)[0], expected[1])
