"""SIT as LifeLong-CLIP has it (Wang et al. 2024; Debatrix/LifeLong-CLIP @ bf20b82): shared-A, Xavier
LoRA; the adapter after attention and MLP, shared per block; one prompt template; the double-softmax
loss option; a fresh augmentation for every online_iter step. Each against a computation written here."""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipcl.adapt import LoRALinear, LoRAMultiheadAttention, SequentialAdapter, inject
from clipcl.config import StreamConfig
from clipcl.data.streams import build_stream
from clipcl.engine.batches import OnlineChunks, PlanSampler, StreamImages, collate_plan
from clipcl.engine.trainer import grouped_views
from clipcl.models.tiny import tiny_open_clip_backend
from clipcl.run import run_experiment
from clipcl.strategies import build_strategy
from clipcl.strategies.finetune import Finetune, FinetuneConfig

BAD_PHOTO = "a bad photo of a {}."


def _attention_by_hand(x, weights, biases, out_weight, out_bias, heads):
    """Self-attention of a (length, batch, width) input with the given q/k/v/out weights."""
    length, batch, width = x.shape
    head = width // heads
    q, k, v = (F.linear(x, weights[p], biases[p]) for p in range(3))

    def split(t):  # (length, batch, width) -> (batch * heads, length, head)
        return t.reshape(length, batch * heads, head).transpose(0, 1)

    scores = split(q) @ split(k).transpose(1, 2) / math.sqrt(head)
    mixed = (scores.softmax(dim=-1) @ split(v)).transpose(0, 1).reshape(length, batch, width)
    return F.linear(mixed, out_weight, out_bias)


def test_shared_down_xavier_lora_on_multihead_attention_matches_a_hand_computation():
    torch.manual_seed(0)
    width, heads, rank = 8, 2, 4
    base = nn.MultiheadAttention(width, heads)
    nn.init.normal_(base.in_proj_bias)
    x = torch.randn(5, 3, width)
    with torch.no_grad():
        unwrapped = base(x, x, x, need_weights=False)[0]
    lora = LoRAMultiheadAttention(base, rank, 1.0, shared_qkv_down=True, qkv_init="xavier")
    # One down factor for q, k and v; the stacked up factor is 3d x r; the output projection has its own.
    assert set(lora.lora_A) == {"qkv", "o"} and tuple(lora.lora_B["qkv"].shape) == (3 * width, rank)
    # Xavier-uniform on the stacked shape, as the official fused B (bound sqrt(6 / (r + 3d))).
    assert lora.lora_B["qkv"].abs().max() <= math.sqrt(6 / (rank + 3 * width))
    assert lora.lora_B["qkv"].abs().min() > 0
    # The output projection keeps Kaiming A and zero B.
    assert torch.count_nonzero(lora.lora_B["o"]) == 0
    with torch.no_grad():
        got = lora(x, x, x, need_weights=False)[0]
        down, up, scaling = lora.lora_A["qkv"], lora.lora_B["qkv"], 1.0 / rank
        weights = [base.in_proj_weight[p * width:(p + 1) * width] + scaling * up[p * width:(p + 1) * width] @ down
                   for p in range(3)]
        biases = base.in_proj_bias.chunk(3)
        expected = _attention_by_hand(x, weights, biases, base.out_proj.weight, base.out_proj.bias, heads)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got - unwrapped).abs().max() > 1e-3  # the update is not zero at initialisation


def test_default_lora_still_starts_at_zero_with_separate_factors():
    torch.manual_seed(0)
    base = nn.MultiheadAttention(8, 2)
    lora = LoRAMultiheadAttention(base, 8, 16.0)
    assert set(lora.lora_A) == {"q", "k", "v", "o"}
    assert all(torch.count_nonzero(b) == 0 for b in lora.lora_B.values())


def test_separate_linear_qkv_projections_share_one_down_factor():
    torch.manual_seed(0)
    attention = nn.Module()
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        setattr(attention, name, nn.Linear(6, 6))
    model = nn.Module()
    model.attn = attention
    x = torch.randn(4, 6)
    with torch.no_grad():
        before = model.attn.q_proj(x)
    inject(model, "lora", "attn.*", rank=2, alpha=1.0, shared_qkv_down=True, qkv_init="xavier")
    q, k, v, out = (getattr(model.attn, name) for name in ("q_proj", "k_proj", "v_proj", "out_proj"))
    assert all(isinstance(module, LoRALinear) for module in (q, k, v, out))
    assert q.lora_A is k.lora_A is v.lora_A and out.lora_A is not q.lora_A
    assert torch.count_nonzero(out.lora_B) == 0 and torch.count_nonzero(q.lora_B) == q.lora_B.numel()
    with torch.no_grad():
        expected = F.linear(x, q.base.weight, q.base.bias) + 0.5 * (x @ q.lora_A.t() @ q.lora_B.t())
        torch.testing.assert_close(q(x), expected)
        assert (q(x) - before).abs().max() > 1e-4
    # The shared factor is one parameter of the model.
    assert sum(parameter is q.lora_A for parameter in model.parameters()) == 1


def _task():
    stream = build_stream(StreamConfig(protocol="class_incremental", datasets=["synthetic-0"], num_tasks=1,
                                       test_samples_per_task=12), seed=0)
    return stream.tasks[0]


def _normalised(tensor):
    return tensor / tensor.norm(dim=-1, keepdim=True)


def test_template_is_used_for_training_and_evaluation():
    task = _task()
    backend = tiny_open_clip_backend(seed=0)
    strategy = Finetune(backend, FinetuneConfig(name="finetune", template=BAD_PHOTO))
    strategy.eval()
    with torch.no_grad():
        by_hand = _normalised(backend.encode_text(backend.tokenize([BAD_PHOTO.format(c.name) for c in task.classes])))
        torch.testing.assert_close(strategy.encode_classes(task.classes, None), by_hand)
        torch.testing.assert_close(strategy.training_text_features(task.classes), by_hand)
        plain = Finetune(backend, FinetuneConfig(name="finetune"))
        assert (plain.encode_classes(task.classes, None) - by_hand).abs().max() > 1e-4  # the ensemble


def test_cross_entropy_on_probabilities_is_the_double_softmax():
    task = _task()
    backend = tiny_open_clip_backend(seed=0)
    images = torch.stack([task.training_view(backend.preprocess)[i][0] for i in range(4)])
    targets = torch.tensor([0, 2, 5, 2])
    strategy = Finetune(backend, FinetuneConfig(name="finetune", cross_entropy_on_probabilities=True))
    strategy.before_task(task)
    with torch.no_grad():
        loss = strategy({"images": images, "targets": targets}, task)["loss"]
        text = _normalised(backend.encode_text(backend.tokenize([c.templates[0].format(c.name) for c in task.classes])))
        logits = backend.logit_scale.exp() * _normalised(backend.encode_image(images)) @ text.t()
        probabilities = logits.exp() / logits.exp().sum(dim=-1, keepdim=True)
        twice = probabilities.exp() / probabilities.exp().sum(dim=-1, keepdim=True)
        expected = -twice[torch.arange(4), targets].log().mean()
        paper = -(logits.log_softmax(dim=-1)[torch.arange(4), targets]).mean()
    assert abs(loss.item() - expected.item()) < 1e-5
    assert abs(loss.item() - paper.item()) > 1e-3


def test_sit_preset_has_the_official_settings():
    strategy = build_strategy(tiny_open_clip_backend(seed=0), {"name": "sit"})
    config = strategy.config
    assert (config.lora_rank, config.lora_alpha, config.lora_shared_qkv_down, config.lora_qkv_init) == (
        4, 1.0, True, "xavier")
    assert config.template == BAD_PHOTO and config.label_space == "batch"
    assert config.cross_entropy_on_probabilities is False
    attention = strategy.backend.model.visual.transformer.resblocks[0].attn
    assert isinstance(attention, LoRAMultiheadAttention) and attention.shared_qkv == "qkv"


def test_sequential_adapter_block_output_matches_a_hand_computation():
    torch.manual_seed(0)
    backend = tiny_open_clip_backend(seed=0)
    strategy = build_strategy(backend, {"name": "sit", "peft": "adapter"})
    block = backend.model.visual.transformer.resblocks[1]
    assert isinstance(block.attn, SequentialAdapter) and isinstance(block.mlp, SequentialAdapter)
    adapter = block.attn.adapter
    assert adapter is block.mlp.adapter  # one adapter per block, used twice
    assert adapter.adapter_dropout == 0.1 and torch.count_nonzero(adapter.down.bias) == 0
    assert block.attn.adapter is not backend.model.visual.transformer.resblocks[0].attn.adapter
    with torch.no_grad():  # give the zero-initialised up projection a value, so the branch shows
        nn.init.normal_(adapter.up.weight)
        nn.init.normal_(adapter.up.bias)
    strategy.eval()
    width = block.ln_1.normalized_shape[0]
    x = torch.randn(5, 2, width) if not getattr(block.attn.base, "batch_first", False) else torch.randn(2, 5, width)

    def adapted(f):  # the adapter's own residual: f + 0.1 * up(relu(down(f)))
        return f + 0.1 * F.linear(F.relu(F.linear(f, adapter.down.weight, adapter.down.bias)),
                                  adapter.up.weight, adapter.up.bias)

    with torch.no_grad():
        h = block.ln_1(x)
        after_attention = x + adapted(block.attn.base(h, h, h, need_weights=False)[0])
        expected = after_attention + adapted(block.mlp.base(block.ln_2(after_attention)))
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    strategy.train()
    with torch.no_grad():  # dropout 0.1 acts while training
        assert not torch.equal(block(x), expected)


class _Pictures(torch.utils.data.Dataset):
    def __init__(self):
        self.images = [torch.full((2, 2), float(i)) for i in range(12)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], index % 3


def _random_shift(image):  # a random training transform
    return image + torch.rand(())


def _views(seed, views):
    chunks = OnlineChunks(np.arange(12), 4, 0, 1)
    plans = PlanSampler(chunks, 0, seed, np.arange(12) % 3, views=views)
    images = StreamImages({0: _Pictures()}, _random_shift)
    loader = torch.utils.data.DataLoader(images, batch_sampler=plans, collate_fn=collate_plan)
    return list(grouped_views(loader, 1, views))


def test_reaugmentation_draws_a_fresh_view_per_repeat_and_is_seeded():
    groups = _views(seed=0, views=3)
    assert len(groups) == 3 and all(len(group) == 3 for group in groups)  # 3 chunks, 3 views each
    for group in groups:
        first, second, third = (view[0]["images"] for view in group)
        assert torch.equal(group[0][0]["indices"], group[2][0]["indices"])  # the same samples
        assert not torch.equal(first, second) and not torch.equal(second, third)  # augmented apart
    again = _views(seed=0, views=3)
    assert all(torch.equal(a[v][0]["images"], b[v][0]["images"]) for a, b in zip(groups, again) for v in range(3))
    # View 0 is what the stream trains on without re-augmentation.
    single = _views(seed=0, views=1)
    assert all(torch.equal(a[0][0]["images"], b[0][0]["images"]) for a, b in zip(groups, single))


def test_online_run_with_reaugmentation_is_deterministic(tiny_run_config, tmp_path):
    stream = {"protocol": "si_blurry", "datasets": ["synthetic-0"], "num_tasks": 2, "disjoint_class_ratio": 0.5,
              "blurry_sample_ratio": 0.1, "train_samples_per_task": 24, "test_samples_per_task": 24}

    def run(name, reaugment):
        config = tiny_run_config({"name": "sit"}, stream=stream,
                                 train={"batch_size": 8, "lr": 1e-3, "online_iter": 2, "online_reaugment": reaugment,
                                        "max_grad_norm": None, "weight_decay": 1e-5},
                                 eval={"eval_period": 12, "batch_size": 32, "cache_dir": "", "zero_shot_row": False},
                                 output_dir=str(tmp_path / name))
        return run_experiment(config, show_progress=False)

    first, again, once = run("a", True), run("b", True), run("c", False)
    assert first["timing"]["train_steps"] == 6
    assert first["anytime"] == again["anytime"] and first["losses_first_last"] == again["losses_first_last"]
    # The tiny open_clip model's training transform is random, so re-augmenting changes the run.
    assert first["losses_first_last"] != once["losses_first_last"]


def test_replayed_samples_do_not_repeat_the_streams_augmentations():
    """torch keeps only the low 32 bits of a seed; the draw numbers of replayed samples (2**40 and up)
    must still give other augmentations than the stream's own draws."""
    from clipcl.data.streams import draw_seed
    from clipcl.engine.batches import REPLAY_DRAWS, VIEW_DRAWS

    seeds = {draw_seed(7, draw) for draw in range(64)}
    assert len(seeds) == 64
    assert not seeds & {draw_seed(7, REPLAY_DRAWS + draw) for draw in range(64)}
    assert not seeds & {draw_seed(7, VIEW_DRAWS + draw) for draw in range(64)}
    assert all(0 <= seed < 2**32 for seed in seeds)  # what torch's generator keeps
