"""The feature cache never serves a stale or tampered feature; dataset fingerprints follow content."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from clipcl.data.base import ArrayImageDataset
from clipcl.data.folders import ImageFolderDataset
from clipcl.data.streams import ClassText
from clipcl.data.torchvision_sets import TorchvisionDataset
from clipcl.engine.runtime import Runtime
from clipcl.eval.cache import FeatureCache
from clipcl.eval.evaluator import image_features, predict
from clipcl.models import build_backend
from clipcl.run import seed_everything
from clipcl.strategies import build_strategy

COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}


def _tree(root: Path, images: int = 3) -> Path:
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for number in range(images):
            Image.new("RGB", (12, 12), tuple(max(0, value - 30 * number) for value in colour)).save(
                root / name / f"{number}.png")
    return root


def _swap(root: Path, first: str, second: str) -> None:
    """Swap two class folders: the same paths afterwards, other pixels behind them."""
    os.rename(root / first, root / "swap")
    os.rename(root / second, root / first)
    os.rename(root / "swap", root / second)


@pytest.fixture
def zero_shot(tiny_run_config):
    seed_everything(0)
    return build_strategy(build_backend(tiny_run_config().model), {"name": "zero_shot"}).eval()


def _features(strategy, dataset, cache, runtime=None):
    return image_features(strategy, dataset, None, runtime or Runtime(torch.device("cpu")), batch_size=16,
                          cache=cache)[0]


def test_swapped_class_folders_change_the_fingerprint_and_miss_the_cache(zero_shot, tmp_path):
    root = _tree(tmp_path / "tree")
    dataset = ImageFolderDataset(root, "test")
    cache = FeatureCache(tmp_path / "cache")
    _features(zero_shot, dataset, cache)
    before = dataset.fingerprint()
    _swap(root, "red", "green")
    swapped = ImageFolderDataset(root, "test")
    assert [str(path) for path in swapped.paths] == [str(path) for path in dataset.paths]
    assert swapped.fingerprint() != before
    classes = [ClassText(name, ("a photo of {}.",)) for name in swapped.classnames]
    runtime = Runtime(torch.device("cpu"))
    cached, _ = predict(zero_shot, swapped, classes, None, runtime, 16, FeatureCache(tmp_path / "cache"))
    uncached, _ = predict(zero_shot, swapped, classes, None, runtime, 16, None)
    assert torch.equal(cached, uncached)


def test_the_fingerprint_does_not_depend_on_where_the_tree_is(tmp_path):
    root = _tree(tmp_path / "here")
    copy = shutil.copytree(root, tmp_path / "elsewhere" / "there")
    assert ImageFolderDataset(root, "train").fingerprint() == ImageFolderDataset(copy, "train").fingerprint()


def test_an_edited_file_is_a_miss_even_outside_the_content_sample(zero_shot, tmp_path, monkeypatch):
    import clipcl.data.base

    monkeypatch.setattr(clipcl.data.base, "CONTENT_SAMPLE_FILES", 1)  # hash one file's bytes only
    root = _tree(tmp_path / "tree")
    dataset = ImageFolderDataset(root, "test")
    cache = FeatureCache(tmp_path / "cache")
    _features(zero_shot, dataset, cache)
    edited = dataset.paths[-1]
    Image.new("RGB", (12, 12), (1, 2, 3)).save(edited)  # same size as the file it replaces
    os.utime(edited, ns=(1, 1))
    fresh = FeatureCache(tmp_path / "cache")
    _features(zero_shot, ImageFolderDataset(root, "test"), fresh)
    assert fresh.hits == 0 and fresh.misses == 1


def _only_entry(folder: Path) -> Path:
    (entry,) = folder.glob("*.safetensors")
    return entry


def test_tampered_and_wrong_shaped_entries_are_misses(zero_shot, tmp_path):
    root = _tree(tmp_path / "tree")
    dataset = ImageFolderDataset(root, "test")
    truth = _features(zero_shot, dataset, FeatureCache(tmp_path / "cache"))
    entry = _only_entry(tmp_path / "cache")
    for tampered in (torch.randn_like(truth), torch.randn(len(truth) + 2, truth.shape[1])):
        # A well-formed file whose features are not the ones computed (or not one per image).
        save_file({"features": tampered.contiguous()}, str(entry), metadata={"format": "clipcl-features-2",
                                                                           "sha256": "0" * 64})
        cache = FeatureCache(tmp_path / "cache")
        assert torch.equal(_features(zero_shot, dataset, cache), truth)
        assert cache.rejected == 1 and cache.hits == 0
    entry.write_bytes(os.urandom(200))  # not even a safetensors file
    cache = FeatureCache(tmp_path / "cache")
    assert torch.equal(_features(zero_shot, dataset, cache), truth) and cache.rejected == 1
    # The computed features replaced the damaged entry.
    again = FeatureCache(tmp_path / "cache")
    assert torch.equal(_features(zero_shot, dataset, again), truth) and again.hits == 1


def test_precision_and_device_are_part_of_the_key(zero_shot, tmp_path):
    dataset = ArrayImageDataset(np.zeros((4, 8, 8, 3), np.uint8), np.arange(4) % 2, ["a", "b"], ["{}"], "toy",
                                "test")
    image_key = zero_shot.image_cache_key(None)
    full = FeatureCache.key_for(image_key, dataset, Runtime(torch.device("cpu"), "fp32"))
    half = FeatureCache.key_for(image_key, dataset, Runtime(torch.device("cpu"), "bf16"))
    assert full != half


class _InMemoryTorchvision(torch.utils.data.Dataset):
    """The shape of torchvision's MNIST/CIFAR: pixels in ``.data``, labels in ``.targets``."""

    def __init__(self, pixels: np.ndarray, labels: list[int]) -> None:
        self.data, self.targets, self.root = pixels, labels, "/nowhere"

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return Image.fromarray(self.data[index]), self.targets[index]


def test_a_torchvision_set_fingerprint_follows_its_pixels():
    pixels = np.random.default_rng(0).integers(0, 255, (6, 8, 8), dtype=np.uint8)

    def dataset(array):
        return TorchvisionDataset("toy", "test", _InMemoryTorchvision(array, [0, 1, 0, 1, 0, 1]), None,
                                  ["zero", "one"], ["{}"])

    changed = pixels.copy()
    changed[3, 0, 0] ^= 1
    assert dataset(pixels).fingerprint() == dataset(pixels.copy()).fingerprint()
    assert dataset(changed).fingerprint() != dataset(pixels).fingerprint()
