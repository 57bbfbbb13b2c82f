"""The offline starter model (real pretrained encoders); marked `starter` so it can be skipped."""

import pytest
import torch
from PIL import Image

from clipcl.config import ModelConfig
from clipcl.models import build_backend

pytestmark = pytest.mark.starter


@pytest.fixture(scope="module")
def starter():
    return build_backend(ModelConfig()).eval()


def test_shapes_identity_projections_and_towers(starter):
    images = torch.stack([starter.preprocess(Image.new("L", (28, 28), value)) for value in (0, 255)])
    assert images.shape == (2, 3, starter.image_size, starter.image_size)
    with torch.no_grad():
        assert starter.encode_image(images).shape == (2, starter.embed_dim)
        assert starter.encode_texts(["a photo of a cat.", "a sneaker"]).shape == (2, 384)
    eye = torch.eye(starter.embed_dim)
    assert torch.equal(starter.image_tower.projection.weight, eye)
    assert torch.equal(starter.text_tower.projection.weight, eye)
    image_ids = {id(p) for p in starter.image_tower.parameters()}
    text_ids = {id(p) for p in starter.text_tower.parameters()}
    assert not image_ids & text_ids
    assert image_ids | text_ids | {id(starter.logit_scale)} == {id(p) for p in starter.parameters()}
    assert len(starter.image_blocks()) > 5 and len(starter.text_blocks()) == 6


def test_batch_norm_stays_in_eval_and_gradients_reach_efficientnet(starter):
    starter.train()
    try:
        batch_norms = [m for m in starter.image_tower.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert batch_norms and not any(m.training for m in batch_norms)
        images = torch.stack([starter.preprocess(Image.new("RGB", (32, 32), (i * 60, 90, 30))) for i in range(3)])
        starter.encode_image(images).sum().backward()
        stem = starter.image_tower.classifier._conv_stem.weight
        assert stem.grad is not None and stem.grad.abs().sum() > 0
    finally:
        starter.zero_grad(set_to_none=True)
        starter.eval()


def test_features_of_an_image_do_not_depend_on_its_batch(starter):
    images = torch.stack([starter.preprocess(Image.new("RGB", (28, 28), (i * 40, 255 - i * 30, 7 * i)))
                          for i in range(5)])
    with torch.no_grad():
        together = starter.encode_image(images)
        alone = torch.cat([starter.encode_image(images[i: i + 1]) for i in range(5)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_zero_shot_is_clearly_above_chance_on_fashion_mnist(starter):
    # A wiring check, not an accuracy claim (docs/starter.md has the measured numbers): on 500 real
    # Fashion-MNIST test images (chance 10%) the starter must beat chance by a wide margin. The full
    # test set measured 24.8%; 18% is more than three binomial standard deviations below that.
    from clipcl.data.registry import load_dataset
    from clipcl.data.streams import balanced_subset, heldout_set
    from clipcl.engine.runtime import Runtime
    from clipcl.eval.evaluator import predict
    from clipcl.strategies.zero_shot import ZeroShot, ZeroShotConfig

    held = heldout_set(balanced_subset(load_dataset("fashion_mnist", "test"), 500, seed=0))
    strategy = ZeroShot(starter, ZeroShotConfig(name="zero_shot"))
    predictions, labels = predict(strategy, held.test, held.classes, None, Runtime(torch.device("cpu")), 128)
    assert (predictions.numpy() == labels).mean() >= 0.18
