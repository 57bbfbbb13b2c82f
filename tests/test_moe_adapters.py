"""MoE-Adapters and DDAS: exactness at the start, frozen experts, per-image routing, calibration."""

import pytest
import torch
from torch import nn

from clipcl.adapt.adapter import Adapter
from clipcl.adapt.moe import MoEAdapter, active_router, inject_moe_adapters
from clipcl.data.streams import build_stream
from clipcl.engine.runtime import Runtime
from clipcl.engine.tasks import standalone_context
from clipcl.eval.evaluator import predict
from clipcl.models import build_backend
from clipcl.run import seed_everything
from clipcl.strategies import build_strategy
from clipcl.strategies.ddas import ZERO_SHOT, DistributionSelector

MOE = {"name": "moe_adapters", "num_experts": 6, "top_k": 2, "ddas_steps": 60, "ddas_hidden": 8}


def build(config):
    """The strategy and stream of ``config``, with its sources, runtime and cache attached as a run does."""
    seed_everything(config.seed)
    backend = build_backend(config.model)
    stream = build_stream(config.stream, config.seed)
    strategy = build_strategy(backend, config.strategy)
    standalone_context(config, strategy, stream, Runtime(torch.device("cpu")), None)
    return strategy, stream


def train_task(strategy, task, steps=6, lr=5e-2):
    """A few optimiser steps on the task's first images, as the loop would run them."""
    view = task.training_view(strategy.backend.train_preprocess)
    images = torch.stack([view[i][0] for i in range(16)])
    targets = torch.tensor([view[i][1] for i in range(16)])
    strategy.before_task(task)
    optimizer = torch.optim.AdamW(strategy.trainable_parameters(), lr=lr, weight_decay=0.0)
    strategy.train()
    for _ in range(steps):
        loss = strategy({"images": images, "targets": targets}, task)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    strategy.after_task(task)
    strategy.eval()


def test_fresh_routers_and_experts_leave_the_model_exactly_unchanged(tiny_run_config):
    config = tiny_run_config(dict(MOE))
    seed_everything(0)
    # The strategy freezes the backbone, so the reference is frozen too. Not a tolerance: a frozen
    # and a trainable copy of one model can differ in the last bit, because torch's matmul folds a
    # non-contiguous 3-d input into one mm only when the weight requires grad, and the text tower's
    # attention (a float causal mask keeps it off the fused path) feeds its projections transposed
    # inputs; which of the two kernels rounds differently depends on the CPU (it does on AMD EPYC).
    # With equal flags the kernels are the same and the fresh mixture adds exact zeros.
    plain = build_backend(config.model).eval().requires_grad_(False)
    strategy, stream = build(config)
    strategy.before_task(stream.tasks[0])  # adds task 0's (zero) router
    strategy.eval()
    images = torch.rand(5, 3, 32, 32)
    tokens = plain.tokenize(["a photo of a cat", "a dog"])
    with torch.no_grad():
        expected_image, expected_text = plain.encode_image(images), plain.encode_text(tokens)
        for training in (False, True):  # noise and dropout on or off: the experts still add zeros
            with active_router(strategy.layers, 0, training=training):
                assert torch.equal(strategy.backend.encode_image(images), expected_image)
                assert torch.equal(strategy.backend.encode_text(tokens), expected_text)
    assert {layer.tower for layer in strategy.layers} == {"image", "text"}


def test_starter_towers_get_mixtures_and_stay_exact():
    """The starter's CNN image tower takes experts beside its identity-skip MBConv blocks."""
    from clipcl.config import ModelConfig

    # Frozen like the strategy freezes them, so both run the same kernels (see the first test).
    plain = build_backend(ModelConfig(backend="starter")).eval().requires_grad_(False)
    backend = build_backend(ModelConfig(backend="starter")).eval().requires_grad_(False)
    layers = inject_moe_adapters(backend, ("image", "text"), num_experts=3, top_k=2)
    for layer in layers:
        layer.add_router()
    image_layers = [layer for layer in layers if layer.tower == "image"]
    # EfficientNet-Lite0 has 9 MBConv blocks whose input and output shapes agree; MiniLM has 6 layers.
    assert len(image_layers) == 9 and all(layer.layout == "bchw" for layer in image_layers)
    assert len(layers) - len(image_layers) == len(plain.text_blocks())
    images = torch.rand(2, 3, 112, 112)
    tokens = plain.tokenize(["a photo of a shoe"])
    with torch.no_grad(), active_router(layers, 0):
        assert torch.equal(backend.encode_image(images), plain.encode_image(images))
        assert torch.equal(backend.encode_text(tokens), plain.encode_text(tokens))


def test_unsupported_blocks_fail_with_one_line(monkeypatch):
    from clipcl.models.tiny import tiny_open_clip_backend

    backend = tiny_open_clip_backend(seed=0)
    monkeypatch.setattr(backend, "image_blocks", lambda: [nn.Conv2d(3, 3, 3)])
    with pytest.raises(ValueError, match="Conv2d blocks are not supported") as error:
        inject_moe_adapters(backend, ("image",), num_experts=2, top_k=1)
    assert "\n" not in str(error.value)
    from clipcl.models.base import Backend

    with pytest.raises(ValueError, match="declares no sites for 'moe'"):
        inject_moe_adapters(Backend(), ("image",), num_experts=2, top_k=1)


def test_experts_are_the_adapter_class(tiny_run_config):
    """One bottleneck module: each expert is an adapt.adapter.Adapter (no second copy of it)."""
    strategy, _ = build(tiny_run_config(dict(MOE)))
    assert all(type(expert) is Adapter for layer in strategy.layers for expert in layer.experts)
    assert {layer.tower for layer in strategy.layers} == {"image", "text"}


def test_frozen_experts_do_not_change_while_a_later_task_trains(tiny_run_config):
    strategy, stream = build(tiny_run_config(dict(MOE, freeze_experts_per_task=2)))
    train_task(strategy, stream.tasks[0])
    frozen = {(index, expert): [p.detach().clone() for p in layer.experts[expert].parameters()]
              for index, layer in enumerate(strategy.layers) for expert in layer.frozen.nonzero().flatten().tolist()}
    assert len(frozen) == 2 * len(strategy.layers)  # two per block, from the task's selection counts
    counts = [layer.selection_counts.clone() for layer in strategy.layers]
    for layer, count in zip(strategy.layers, counts):
        chosen = set(layer.frozen.nonzero().flatten().tolist())
        assert all(count[i] >= count[j] for i in chosen for j in range(len(count)) if j not in chosen)
    free_before = {(index, expert): [p.detach().clone() for p in layer.experts[expert].parameters()]
                   for index, layer in enumerate(strategy.layers) for expert in range(layer.num_experts)
                   if not layer.frozen[expert]}
    train_task(strategy, stream.tasks[1])
    for (index, expert), tensors in frozen.items():
        for before, after in zip(tensors, strategy.layers[index].experts[expert].parameters()):
            assert torch.equal(before, after)
    # ... while the experts left free did train.
    assert any(not torch.equal(before, after) for (index, expert), tensors in free_before.items()
               for before, after in zip(tensors, strategy.layers[index].experts[expert].parameters()))
    assert len(strategy.layers[0].routers) == 2  # one router per task


def test_routing_and_predictions_are_per_image(tiny_run_config):
    """A mixed batch routes and predicts each image exactly as that image alone."""
    strategy, stream = build(tiny_run_config(dict(MOE)))
    for task in stream.tasks[:2]:
        train_task(strategy, task)
    # Give every expert a visible output, so a wrong route would change the features.
    torch.manual_seed(1)
    for layer in strategy.layers:
        for expert in layer.experts:
            nn.init.normal_(expert.up.weight, std=0.5)
    preprocess = strategy.backend.preprocess
    images = torch.stack([preprocess(task.test[i][0]) for task in stream.tasks for i in range(4)])
    with torch.no_grad():
        # The tiny random model's frozen features do not tell the synthetic domains apart reliably, so
        # the thresholds are set halfway between the 6th and 7th smallest best error of these 12 images:
        # half go to their best task's router, half to zero-shot, and the batch mixes routes by
        # construction (halfway, so no image sits within rounding of the threshold).
        best_errors = strategy.selector.errors(strategy.frozen_image_features(images).float()).min(dim=-1).values
        ordered = best_errors.sort().values
        for autoencoder in strategy.selector.autoencoders:
            autoencoder.threshold.fill_(float(ordered[5] + ordered[6]) / 2)
        batch_features, batch_routes = strategy.encode_images_routed(images, None)
        alone = [strategy.encode_images_routed(images[i: i + 1], None) for i in range(len(images))]
    alone_routes = torch.cat([routes for _, routes in alone])
    alone_features = torch.cat([features for features, _ in alone])
    assert torch.equal(batch_routes, alone_routes)
    assert len(batch_routes.unique()) > 1, batch_routes  # the batch really mixes routes
    torch.testing.assert_close(batch_features, alone_features, rtol=0, atol=1e-5)
    # Whole-dataset predictions do not depend on the evaluation batch size or the images' order.
    runtime = Runtime(torch.device("cpu"))
    task = stream.tasks[2]
    classes, _ = stream.eval_label_space(1, task.index)
    one, _ = predict(strategy, task.test, classes, None, runtime, batch_size=1)
    many, _ = predict(strategy, task.test, classes, None, runtime, batch_size=64)
    assert torch.equal(one, many)


def test_ddas_threshold_is_the_calibration_quantile_and_unknown_domains_go_to_zero_shot():
    torch.manual_seed(0)
    width = 16
    centres = torch.randn(2, width) * 3
    selector = DistributionSelector(width, hidden=4, with_reference=False)
    fits = []
    for centre in centres:
        train = centre + 0.1 * torch.randn(300, width)
        calibration = centre + 0.1 * torch.randn(100, width)
        fits.append(selector.fit_task(train, calibration, steps=400, lr=1e-2, batch_size=64, quantile=0.9, seed=0,
                                      runtime=Runtime(torch.device("cpu"))))
        errors = selector.autoencoders[-1].errors(calibration)
        assert float(selector.autoencoders[-1].threshold) == pytest.approx(float(torch.quantile(errors.double(), 0.9)))
    own = torch.cat([centre + 0.1 * torch.randn(50, width) for centre in centres])
    routes = selector.route(own)
    assert float((routes[:50] == 0).float().mean()) > 0.7 and float((routes[50:] == 1).float().mean()) > 0.7
    far = 10 * torch.randn(40, width)
    assert bool((selector.route(far) == ZERO_SHOT).all())
    # Per image: a row's route does not depend on the other rows.
    mixed = torch.cat([own[:3], far[:3]])
    assert torch.equal(selector.route(mixed), torch.cat([selector.route(mixed[i: i + 1]) for i in range(6)]))


def test_parameter_report_counts_the_modules(tiny_run_config):
    strategy, stream = build(tiny_run_config(dict(MOE)))
    train_task(strategy, stream.tasks[0], steps=1)
    report = strategy.parameter_report()
    # Independent count from the widths: each expert is d*64+64 + 64*d+d, each router 2*d*E.
    widths = [layer.width for layer in strategy.layers]
    experts = sum(6 * (2 * 64 * width + 64 + width) for width in widths)
    routers = sum(2 * width * 6 for width in widths)
    embed = strategy.backend.embed_dim
    autoencoder = embed * 8 + 8 + 8 * embed + embed
    assert report["experts"] == experts
    assert report["routers"] == routers
    assert report["stored_per_task"] == routers + autoencoder
    assert report["total_stored"] == experts + routers + autoencoder
    assert report["experts_frozen"] == 2 * len(widths)
    trainable = sum(p.numel() for p in strategy.trainable_parameters())
    assert report["trainable_last_task"] == trainable
    assert isinstance(strategy.layers[0], MoEAdapter)


def test_mixture_reads_the_pre_norm_stream_and_mixes_the_top_k_experts():
    """One open_clip block, computed by hand: x' = x + attn(ln_1(x));
    out = x' + mlp(ln_2(x')) + 0.1 * sum over the top-2 experts of softmax(top-2 gate logits) * expert(x')."""
    from open_clip.transformer import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(d_model=16, n_head=2, batch_first=True).eval()
    reference = ResidualAttentionBlock(d_model=16, n_head=2, batch_first=True).eval()
    reference.load_state_dict(block.state_dict())
    layer = MoEAdapter(block.mlp, 16, "bld", num_experts=4, top_k=2, input_from=block.ln_2)
    block.mlp = layer
    layer.add_router()
    with torch.no_grad():
        for expert in layer.experts:
            nn.init.normal_(expert.up.weight, std=0.3)
        nn.init.normal_(layer.routers[0].gate.weight, std=1.0)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        layer.active_router = 0
        got = block(x)
        stream = x + reference.attention(reference.ln_1(x))
        expected = stream + reference.mlp(reference.ln_2(stream))
        logits = layer.routers[0].gate(stream[:, 0])
        for sample in range(3):
            values, indices = logits[sample].topk(2)
            weights = torch.softmax(values, dim=-1)
            for weight, index in zip(weights, indices.tolist()):
                expert = layer.experts[index]
                expected[sample] += 0.1 * weight * expert.up(torch.relu(expert.down(stream[sample])))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # The dense, host-sync-free form (a GPU's evaluation path) mixes the same experts.
    layer.sync_free = True
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)


def test_hf_clip_towers_take_mixtures_and_stay_exact(tmp_path):
    from clipcl.config import ModelConfig
    from clipcl.models.tiny import write_tiny_hf_clip

    directory = write_tiny_hf_clip(tmp_path / "hf", seed=0)
    # Frozen like the strategy freezes them, so both run the same kernels (see the first test).
    plain = build_backend(ModelConfig(backend="hf", name=str(directory))).eval().requires_grad_(False)
    backend = build_backend(ModelConfig(backend="hf", name=str(directory))).eval().requires_grad_(False)
    layers = inject_moe_adapters(backend, ("image", "text"), num_experts=3, top_k=2)
    for layer in layers:
        layer.add_router()
    assert len(layers) == len(plain.image_blocks()) + len(plain.text_blocks())
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad(), active_router(layers, 0):
        assert torch.equal(backend.encode_image(images), plain.encode_image(images))
        assert torch.equal(backend.encode_texts(["a cat", "a dog"]), plain.encode_texts(["a cat", "a dog"]))


def test_ddas_trains_on_the_zero_shot_models_cached_features(tiny_run_config, tmp_path):
    """The autoencoders' features are the zero-shot image features, stored under the zero-shot model's key."""
    from clipcl.eval.cache import FeatureCache
    from clipcl.eval.evaluator import image_features

    strategy, stream = build(tiny_run_config(dict(MOE)))
    cache = FeatureCache(tmp_path / "cache")
    strategy.feature_cache = cache
    task = stream.tasks[0]
    train_task(strategy, task, steps=2)
    seed_everything(0)
    zero_shot = build_strategy(build_backend(tiny_run_config(dict(MOE)).model), {"name": "zero_shot"}).eval()
    runtime = Runtime(torch.device("cpu"))
    # DDAS encodes in batches of 128; the batch size is part of the key (kernels depend on it).
    key = FeatureCache.key_for(zero_shot.image_cache_key(None), task.train, runtime, 128)
    cached = cache.get(key)
    assert cached is not None  # written while fitting the task's autoencoder
    fresh, _ = image_features(zero_shot, task.train, None, runtime, batch_size=128, cache=None)
    torch.testing.assert_close(cached, fresh, rtol=0, atol=1e-6)


def test_resume_gives_the_same_results(tiny_run_config, tmp_path):
    """Routers, autoencoders, thresholds and the frozen-expert marks come back from the checkpoint."""
    from clipcl.run import run_experiment

    section = dict(MOE, ddas_steps=20)
    full = run_experiment(tiny_run_config(section, output_dir=str(tmp_path / "full")), show_progress=False)
    config = tiny_run_config(section, output_dir=str(tmp_path / "resumed"))
    assert run_experiment(config, show_progress=False, stop_after_task=0)["interrupted"]
    resumed = run_experiment(config, show_progress=False)
    assert resumed["accuracy"]["matrix"] == full["accuracy"]["matrix"]
    assert resumed["strategy_report"]["parameters"] == full["strategy_report"]["parameters"]
    assert resumed["strategy_report"]["routing"]["trained_tasks"] == full["strategy_report"]["routing"]["trained_tasks"]


# --- DDAS autoencoder shapes and recipes, against computations written out here --------------------------


def _fixed_autoencoder(shape):
    from clipcl.strategies.ddas import FeatureAutoencoder

    autoencoder = FeatureAutoencoder(4, 3, shape).double()
    with torch.no_grad():
        autoencoder.encoder.weight.copy_(torch.tensor([[0.5, -1.0, 0.25, 2.0], [1.5, 0.5, -0.5, 0.0],
                                                       [-2.0, 1.0, 1.0, -0.25]], dtype=torch.float64))
        autoencoder.encoder.bias.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
        autoencoder.decoder.weight.copy_(torch.tensor([[1.0, -0.5, 0.5], [0.0, 2.0, -1.0], [0.75, 0.25, 0.0],
                                                       [-1.0, 0.0, 1.5]], dtype=torch.float64))
        autoencoder.decoder.bias.copy_(torch.tensor([0.0, 0.5, -0.5, 0.25], dtype=torch.float64))
    return autoencoder


FIXED_FEATURES = [[0.2, -0.4, 1.0, 0.0], [-1.5, 0.3, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]]


def _hand_errors(shape):
    """Row by row in plain Python floats: the official code's sigmoid input, its layers and its MSE."""
    import math

    autoencoder = _fixed_autoencoder(shape)
    w1, b1 = autoencoder.encoder.weight.tolist(), autoencoder.encoder.bias.tolist()
    w2, b2 = autoencoder.decoder.weight.tolist(), autoencoder.decoder.bias.tolist()

    def sigmoid(value):
        return 1.0 / (1.0 + math.exp(-value))

    errors = []
    for row in FIXED_FEATURES:
        target = [sigmoid(v) for v in row] if shape == "official" else list(row)
        hidden = [max(0.0, sum(w * t for w, t in zip(weights, target)) + bias) for weights, bias in zip(w1, b1)]
        output = [sum(w * h for w, h in zip(weights, hidden)) + bias for weights, bias in zip(w2, b2)]
        if shape == "official":
            output = [sigmoid(v) for v in output]
        errors.append(sum((o - t) ** 2 for o, t in zip(output, target)) / len(target))
    return errors


@pytest.mark.parametrize("shape", ["official", "relu_mlp"])
def test_ddas_autoencoder_error_is_the_hand_computation(shape):
    autoencoder = _fixed_autoencoder(shape).requires_grad_(False)
    features = torch.tensor(FIXED_FEATURES, dtype=torch.float64)
    errors = autoencoder.errors(features)
    assert errors.tolist() == pytest.approx(_hand_errors(shape), rel=1e-12, abs=0)
    # The training loss of a batch (the mean of its rows' errors) is torch's MSELoss over the batch, the
    # official criterion, on (sigmoid-)targets.
    target = torch.sigmoid(features) if shape == "official" else features
    output = autoencoder.decoder(torch.relu(autoencoder.encoder(target)))
    if shape == "official":
        output = torch.sigmoid(output)
    assert float(errors.mean()) == pytest.approx(float(nn.MSELoss()(output, target)), rel=1e-12)


def test_ddas_official_recipe_steps_adam_at_the_official_rates(monkeypatch):
    """Adam with weight decay 1e-4 at lr 0.01, x0.1 after 10 and after 20 epochs (epochs of 100 rows in
    batches of 64: 2 steps each), read from the optimizer the runtime really steps."""
    import clipcl.engine.runtime as runtime_module
    from clipcl.strategies.moe_adapters import MoEAdaptersConfig

    recipe = MoEAdaptersConfig(ddas_shape="official").ddas_recipe()
    assert recipe == {"lr": 1e-2, "weight_decay": 1e-4, "lr_decay_epochs": 10, "batch_size": 64,
                      "reference_steps": 1000}
    assert MoEAdaptersConfig().ddas_steps == 300 and MoEAdaptersConfig().ddas_shape == "relu_mlp"
    old = MoEAdaptersConfig().ddas_recipe()  # relu_mlp, the default
    assert old == {"lr": 1e-3, "weight_decay": 0.0, "lr_decay_epochs": 0, "batch_size": 128, "reference_steps": 300}
    assert MoEAdaptersConfig(ddas_lr=0.5).ddas_recipe()["lr"] == 0.5  # a set value wins over the shape's

    stepped = []

    class RecordingAdam(torch.optim.Adam):
        def step(self, closure=None):
            group = self.param_groups[0]
            stepped.append((group["lr"], group["weight_decay"]))
            return super().step(closure)

    monkeypatch.setattr(runtime_module.torch.optim, "Adam", RecordingAdam)
    selector = DistributionSelector(6, hidden=3, with_reference=False)
    features = torch.randn(100, 6, generator=torch.Generator().manual_seed(0))
    selector.fit_task(features, features[:10], steps=42, lr=recipe["lr"], batch_size=recipe["batch_size"],
                      quantile=0.95, seed=0, runtime=Runtime(torch.device("cpu")),
                      weight_decay=recipe["weight_decay"], lr_decay_epochs=recipe["lr_decay_epochs"])
    assert len(stepped) == 42
    assert {decay for _, decay in stepped} == {1e-4}
    lrs = [lr for lr, _ in stepped]
    assert lrs[0] == lrs[19] == 1e-2  # epochs 0-9
    assert lrs[20] == pytest.approx(1e-3, rel=1e-12) and lrs[39] == lrs[20]  # epochs 10-19
    assert lrs[40] == pytest.approx(1e-4, rel=1e-12) and lrs[41] == lrs[40]  # epoch 20


def test_ddas_official_batches_are_shuffled_epochs():
    """Every epoch visits each training row once, in batches of 64 and a last smaller one."""
    from clipcl.strategies.ddas import FeatureAutoencoder, fit_autoencoder

    features = torch.arange(100, dtype=torch.float32).unsqueeze(-1).repeat(1, 4) / 100
    autoencoder = FeatureAutoencoder(4, 2)
    autoencoder.requires_grad_(True)
    seen = []
    errors = autoencoder.errors
    autoencoder.errors = lambda rows: (seen.append(torch.round(rows[:, 0] * 100).long().tolist()), errors(rows))[1]
    fit_autoencoder(autoencoder, features, steps=4, lr=1e-2, batch_size=64, seed=0, runtime=Runtime(torch.device("cpu")))
    assert [len(batch) for batch in seen] == [64, 36, 64, 36]
    assert sorted(seen[0] + seen[1]) == list(range(100)) == sorted(seen[2] + seen[3])
    assert seen[0] != seen[2]  # a new order each epoch


def test_ddas_relu_mlp_shape_reproduces_the_earlier_fit():
    """``relu_mlp`` trains exactly as clipcl did before: batches of 128 drawn with replacement from a
    seeded generator, constant-lr Adam without weight decay, on the per-row MSE of the raw features."""
    from clipcl.strategies.ddas import FeatureAutoencoder, fit_autoencoder

    features = torch.randn(200, 8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(4)
    ours = FeatureAutoencoder(8, 5, "relu_mlp")
    encoder, decoder = nn.Linear(8, 5), nn.Linear(5, 8)
    encoder.load_state_dict(ours.encoder.state_dict())
    decoder.load_state_dict(ours.decoder.state_dict())
    ours.requires_grad_(True)
    fit_autoencoder(ours, features, steps=25, lr=1e-3, batch_size=128, seed=7, runtime=Runtime(torch.device("cpu")))

    generator = torch.Generator().manual_seed(7)
    optimizer = torch.optim.Adam(list(encoder.parameters()) + list(decoder.parameters()), lr=1e-3)
    for _ in range(25):
        batch = features[torch.randint(200, (128,), generator=generator)]
        loss = (decoder(torch.relu(encoder(batch))) - batch).pow(2).mean(dim=-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(ours.encoder.weight, encoder.weight) and torch.equal(ours.decoder.bias, decoder.bias)
    assert torch.equal(ours.decoder.weight, decoder.weight) and torch.equal(ours.encoder.bias, encoder.bias)


def test_ddas_official_shape_calibrates_on_unit_norm_features():
    """On unit-norm embeddings the sigmoid is nearly affine and the errors are small; the per-task
    quantile thresholds still route each domain to its own task and an unseen one to zero-shot."""
    torch.manual_seed(0)
    width = 32
    centres = nn.functional.normalize(torch.randn(3, width), dim=-1)

    def domain(index, count):
        return nn.functional.normalize(centres[index] + 0.15 * torch.randn(count, width), dim=-1)

    selector = DistributionSelector(width, hidden=8, with_reference=False)
    for index in range(2):
        fit = selector.fit_task(domain(index, 256), domain(index, 64), steps=120, lr=1e-2, batch_size=64,
                                quantile=0.95, seed=index, runtime=Runtime(torch.device("cpu")),
                                weight_decay=1e-4, lr_decay_epochs=10)
        assert 0 < fit["threshold"] < 1e-2  # the error scale of sigmoid-squashed unit vectors
    routes = torch.cat([selector.route(domain(index, 100)) for index in range(2)])
    assert float((routes[:100] == 0).float().mean()) > 0.8 and float((routes[100:] == 1).float().mean()) > 0.8
    assert float((selector.route(domain(2, 100)) == ZERO_SHOT).float().mean()) > 0.8
