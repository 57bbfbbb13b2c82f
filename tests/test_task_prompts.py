"""Per-task prompt tokens (CoLeCLIP's image-side prompts): the module, the mask and the towers."""

import copy
import json

import pytest
import torch

from clipcl.adapt import TaskPromptConfig, TaskPrompts, task_prompt_mask
from clipcl.config import ConfigError, ModelConfig
from clipcl.models import build_backend
from clipcl.models.open_clip_backend import OpenClipBackend
from clipcl.models.tiny import TINY_OPEN_CLIP_CONFIG, tiny_open_clip_backend, write_tiny_hf_clip

# Same math in another order (the official full-sequence masked attention against our split one):
# fp32 rounding over two blocks of 17-23 keys at values of order 1 stays far below 1e-5.
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def open_clip_backend():
    return tiny_open_clip_backend(seed=0).eval()


@pytest.fixture(scope="module")
def hf_backend(tmp_path_factory):
    directory = write_tiny_hf_clip(tmp_path_factory.mktemp("tiny-hf-task-prompts"), seed=0)
    return build_backend(ModelConfig(backend="hf", name=str(directory))).eval()


@pytest.fixture(params=["open_clip", "hf"])
def backend(request, open_clip_backend, hf_backend):
    return {"open_clip": open_clip_backend, "hf": hf_backend}[request.param]


def _images(count=3, seed=0):
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _prompts(width, tasks, per_task=1, seed=1):
    torch.manual_seed(seed)
    prompts = TaskPrompts(width, TaskPromptConfig(per_task=per_task, init_high=1.0))
    for _ in range(tasks):
        prompts.add_task()
    return prompts


def _official_mask(tasks, per_task, length):
    """The full-sequence mask as the official code builds it (model/backbone/clip.py:227-230)."""
    count = tasks * per_task
    mask = torch.zeros(length, length)
    mask[:, :count] = float("-inf")
    for task in range(tasks):
        mask[task * per_task: count, task * per_task:(task + 1) * per_task] = 0
    return mask


def _official_features(backend, images, prompts, per_task):
    """CoLeCLIP's formulation: one masked attention over [prompts, class, patches] in every block."""
    batch, count = images.shape[0], prompts.shape[0]
    if isinstance(backend, OpenClipBackend):
        visual = backend.model.visual
        sequence = torch.cat([visual.ln_pre(prompts.expand(batch, -1, -1)), visual._embeds(images)], dim=1)
        mask = _official_mask(count // per_task, per_task, sequence.shape[1])
        for block in visual.transformer.resblocks:
            sequence = block(sequence, attn_mask=mask)
        outputs = visual.ln_post(sequence[:, :count + 1]) @ visual.proj
    else:
        vision = backend.model.vision_model
        sequence = torch.cat([vision.pre_layrnorm(prompts.expand(batch, -1, -1)),
                              vision.pre_layrnorm(vision.embeddings(images))], dim=1)
        mask = _official_mask(count // per_task, per_task, sequence.shape[1])
        for layer in vision.encoder.layers:
            sequence = layer(sequence, mask.expand(batch, 1, -1, -1))
        outputs = backend.model.visual_projection(vision.post_layernorm(sequence[:, :count + 1]))
    tasks = outputs[:, :count].reshape(batch, count // per_task, per_task, -1).mean(dim=2)  # CoLeCLIP.py:327
    return torch.cat([outputs[:, count:], tasks], dim=1)


# --- the module and the mask ---------------------------------------------------------------------------


def test_mask_follows_the_rule():
    tasks, per_task, others = 3, 2, 4
    mask = task_prompt_mask(tasks, per_task, others)
    assert mask.shape == (tasks * per_task, tasks * per_task + others)
    for row in range(tasks * per_task):
        for column in range(tasks * per_task + others):
            sees = column >= tasks * per_task or column // per_task <= row // per_task
            assert mask[row, column].item() == (0.0 if sees else float("-inf")), (row, column)
    # The same rows as the official full-sequence mask's prompt rows.
    assert torch.equal(mask, _official_mask(tasks, per_task, tasks * per_task + others)[:tasks * per_task])


def test_config_is_checked():
    for bad in ({"per_task": 0}, {"per_task": 1.5}, {"init_high": -0.1}, {"init_high": float("nan")}):
        with pytest.raises(ConfigError):
            TaskPromptConfig(**bad)
    with pytest.raises(ConfigError, match="width"):
        TaskPrompts(0)


def test_add_task_freezes_earlier_groups_and_initialises_uniformly():
    torch.manual_seed(0)
    prompts = TaskPrompts(16, TaskPromptConfig(per_task=2))
    assert prompts.count == 0 and prompts.prompts.shape == (0, 16)
    assert [prompts.add_task() for _ in range(3)] == [0, 1, 2]
    assert prompts.prompts.shape == (6, 16)
    assert [group.requires_grad for group in prompts.groups] == [False, False, True]
    assert prompts.trainable_parameters() == [prompts.groups[2]]
    values = prompts.prompts.detach()
    assert values.min() >= 0 and values.max() < 0.01 and values.std() > 0  # uniform(0, 0.01)
    zeros = TaskPrompts(4, TaskPromptConfig(init_high=0))
    assert not zeros.group(zeros.add_task()).any()
    with pytest.raises(IndexError):
        zeros.group(1)


def test_state_dict_round_trip_through_restore():
    saved = _prompts(8, tasks=3, per_task=2)
    fresh = TaskPrompts(8, TaskPromptConfig(per_task=2))
    state = torch.random.get_rng_state()
    fresh.restore(3)
    assert torch.equal(torch.random.get_rng_state(), state)  # restore draws nothing
    fresh.load_state_dict(saved.state_dict())
    assert torch.equal(fresh.prompts, saved.prompts)
    assert [group.requires_grad for group in fresh.groups] == [False, False, True]
    with pytest.raises(RuntimeError):
        TaskPrompts(8, TaskPromptConfig(per_task=2)).load_state_dict(saved.state_dict())  # no groups yet


# --- the ViT towers -------------------------------------------------------------------------------------


def test_class_token_is_encode_image_bit_for_bit(backend):
    images = _images()
    prompts = _prompts(backend.image_token_width, tasks=2)
    with torch.no_grad():
        reference = backend.encode_image(images)
        first = backend.encode_image_with_task_prompts(images, prompts.prompts)
        other = backend.encode_image_with_task_prompts(images, 5 * torch.randn_like(prompts.prompts))
    assert first.shape == (3, 3, backend.embed_dim)
    assert torch.equal(first[:, 0], reference) and torch.equal(other[:, 0], reference)
    assert not torch.allclose(first[:, 1:], other[:, 1:])
    with torch.no_grad():  # no tasks yet: just the class token
        assert torch.equal(backend.encode_image_with_task_prompts(images, prompts.prompts[:0])[:, 0], reference)


@pytest.mark.parametrize("per_task", [1, 2])
def test_equals_the_official_full_sequence_formulation(backend, per_task):
    images = _images(2)
    prompts = _prompts(backend.image_token_width, tasks=3, per_task=per_task).prompts
    with torch.no_grad():
        ours = backend.encode_image_with_task_prompts(images, prompts, per_task=per_task)
        official = _official_features(backend, images, prompts, per_task)
    assert ours.shape == official.shape == (2, 4, backend.embed_dim)
    torch.testing.assert_close(ours, official, **TOLERANCE)


def test_each_prompt_sees_earlier_prompts_and_patches_but_not_later_ones(backend):
    images = _images()
    prompts = _prompts(backend.image_token_width, tasks=3).prompts.detach()
    noise = torch.randn(prompts.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = backend.encode_image_with_task_prompts(images, prompts)
        later = prompts.clone()
        later[2] += noise
        moved_later = backend.encode_image_with_task_prompts(images, later)
        earlier = prompts.clone()
        earlier[0] += noise
        moved_earlier = backend.encode_image_with_task_prompts(images, earlier)
        patch = images.clone()
        patch[:, :, 8:16, 8:16] += 1.0
        moved_patch = backend.encode_image_with_task_prompts(patch, prompts)
    # Exact: the later prompt's keys get -inf, so they add exp(-inf) = 0 weight, and no kernel's
    # reduction order depends on values (the shapes are the same).
    assert torch.equal(moved_later[:, :3], base[:, :3])
    assert not torch.allclose(moved_later[:, 3], base[:, 3])
    assert torch.equal(moved_earlier[:, 0], base[:, 0])
    for task in (1, 2, 3):
        assert not torch.allclose(moved_earlier[:, task], base[:, task])
        assert not torch.allclose(moved_patch[:, task], base[:, task])


def test_earlier_prompts_do_not_move_while_a_later_task_trains(backend):
    backend = copy.deepcopy(backend).requires_grad_(False)  # CoLeCLIP freezes CLIP
    prompts = _prompts(backend.image_token_width, tasks=2)
    before = [group.detach().clone() for group in prompts.groups]
    optimizer = torch.optim.AdamW(prompts.parameters(), lr=0.1, weight_decay=0.1)
    features = backend.encode_image_with_task_prompts(_images(), prompts.prompts)
    features.square().sum().backward()
    assert prompts.groups[0].grad is None and prompts.groups[1].grad.abs().sum() > 0
    optimizer.step()
    assert torch.equal(prompts.groups[0], before[0]) and not torch.equal(prompts.groups[1], before[1])
    assert all(parameter.grad is None for parameter in backend.parameters())


def test_bad_prompts_give_one_clear_error(backend):
    width = backend.image_token_width
    with pytest.raises(ConfigError, match="shape"):
        backend.encode_image_with_task_prompts(_images(), torch.zeros(3, width + 1))
    with pytest.raises(ConfigError, match="shape"):
        backend.encode_image_with_task_prompts(_images(), torch.zeros(3, width), per_task=2)
    with pytest.raises(ConfigError, match="per_task"):
        backend.encode_image_with_task_prompts(_images(), torch.zeros(2, width), per_task=0)


@pytest.mark.parametrize(("name", "vision"), [
    ("clipcl-tiny-resnet", {"layers": [1, 1, 1, 1], "width": 8, "image_size": 32}),
    ("clipcl-tiny-attnpool", {**TINY_OPEN_CLIP_CONFIG["vision_cfg"], "attentional_pool": True,
                              "attn_pooler_queries": 2, "attn_pooler_heads": 2}),
])
def test_unsupported_open_clip_towers_raise_one_line(tmp_path, name, vision):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({**TINY_OPEN_CLIP_CONFIG, "vision_cfg": vision}))
    torch.manual_seed(0)
    backend = OpenClipBackend(str(path)).eval()
    with pytest.raises(ConfigError, match=type(backend.model.visual).__name__) as error:
        width = backend.image_token_width if hasattr(backend.model.visual, "class_embedding") else 8
        backend.encode_image_with_task_prompts(_images(), torch.zeros(1, width))
    assert "\n" not in str(error.value)


def test_backends_without_the_method_raise_one_line():
    from clipcl.models.base import Backend

    with pytest.raises(ConfigError, match="task prompts"):
        Backend().encode_image_with_task_prompts(_images(), torch.zeros(1, 4))
    with pytest.raises(ConfigError, match="task prompts"):
        _ = Backend().image_token_width


# --- the starter's CNN analogue (clipcl's adaptation) ---------------------------------------------------


@pytest.fixture(scope="module")
def starter():
    return build_backend(ModelConfig()).eval()


def _starter_images(starter, count=3):
    size = starter.image_size
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.starter
def test_starter_zero_queries_start_at_the_zero_shot_feature_bit_for_bit(starter):
    images = _starter_images(starter)
    prompts = TaskPrompts(starter.image_token_width, TaskPromptConfig(init_high=0))
    prompts.add_task()
    prompts.add_task()
    with torch.no_grad():
        reference = starter.encode_image(images)
        features = starter.encode_image_with_task_prompts(images, prompts.prompts)
    assert features.shape == (3, 3, starter.embed_dim)
    for index in range(3):
        assert torch.equal(features[:, index], reference)


@pytest.mark.starter
def test_starter_queries_attention_pool_the_feature_map(starter):
    images = _starter_images(starter, 2)
    tower = starter.image_tower
    queries = 0.05 * torch.randn(2, starter.image_token_width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = starter.encode_image_with_task_prompts(images, queries, per_task=2)
        mapped = tower.classifier.extract_features(images).flatten(2)  # [N, C, positions]
        weights = torch.einsum("ncp,qc->nqp", mapped, queries).div(queries.shape[1] ** 0.5).softmax(dim=-1)
        pooled = torch.einsum("nqp,ncp->nqc", weights, mapped)
        heads = [tower.projection(tower.embedding_from_logits(tower.classifier._fc(pooled[:, index])))
                 for index in range(2)]
    assert torch.equal(features[:, 0], starter.encode_image(images))
    # Same math, another order (average + correction against the weighted sum): fp32 rounding.
    torch.testing.assert_close(features[:, 1], (heads[0] + heads[1]) / 2, **TOLERANCE)
    assert not torch.allclose(features[:, 1], features[:, 0])


@pytest.mark.starter
def test_starter_earlier_queries_stay_frozen_and_zero_queries_learn(starter):
    prompts = TaskPrompts(starter.image_token_width, TaskPromptConfig(init_high=0))
    prompts.add_task()
    prompts.add_task()
    optimizer = torch.optim.SGD(prompts.parameters(), lr=1.0)
    features = starter.encode_image_with_task_prompts(_starter_images(starter), prompts.prompts)
    features[:, 2].square().sum().backward()
    assert prompts.groups[0].grad is None and prompts.groups[1].grad.abs().sum() > 0
    optimizer.step()
    assert not prompts.groups[0].any() and prompts.groups[1].abs().sum() > 0
    starter.zero_grad(set_to_none=True)


def test_generic_prompt_tokens_in_the_tower_are_part_of_the_sequence(backend):
    from clipcl.adapt import PromptConfig, inject_prompts

    backend = copy.deepcopy(backend)
    torch.manual_seed(0)
    inject_prompts(backend, PromptConfig(count=2))
    images = _images()
    with torch.no_grad():
        features = backend.encode_image_with_task_prompts(images, _prompts(backend.image_token_width, 2).prompts)
        assert torch.equal(features[:, 0], backend.encode_image(images))
    assert features.shape == (3, 3, backend.embed_dim) and torch.isfinite(features).all()
