"""Loaders, tested on small files written here in each format's exact on-disk layout."""

import gzip
import io
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from clipcl.data import offline
from clipcl.data.base import ArrayImageDataset, DataError
from clipcl.data.captions import CaptionDataset
from clipcl.data.folders import ImageFolderDataset
from clipcl.data.offline import SKIMAGE_PHOTOS, read_idx
from clipcl.data.registry import (
    OFFLINE_DATASETS,
    STREAM_ORDERS,
    available_datasets,
    load_dataset,
    resolve_dataset_list,
)
from clipcl.data.resources import _load
from clipcl.data.torchvision_sets import NAMES_FROM_DATASET, TORCHVISION_DATASETS

torch.set_num_threads(1)


def idx_bytes(array):
    """IDX: two zero bytes, type 0x08 (uint8), ndim, big-endian int32 dims, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path, array, compress=True):
    data = idx_bytes(array)
    if compress:
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def jpeg_bytes(colour=(120, 30, 200), size=(6, 5)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


# --- offline sets ---------------------------------------------------------------------------------


def test_fashion_mnist_from_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 9, 9, 5], dtype=np.uint8)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", images)
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", labels)
    dataset = load_dataset("fashion_mnist", "test", root=tmp_path)
    assert len(dataset) == 7 and dataset.name == "fashion_mnist" and dataset.split == "test"
    image, label = dataset[4]
    assert label == 9 and image.mode == "RGB" and image.size == (28, 28)
    assert np.array_equal(np.asarray(image)[:, :, 0], images[4])
    assert np.array_equal(read_idx(raw / "t10k-labels-idx1-ubyte.gz"), labels)
    assert dataset.classnames[9] == "ankle boot"


def test_fashion_mnist_absent_offline_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(offline, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "no-debian-package")
    with pytest.raises(DataError, match="FashionMNIST/raw") as error:
        load_dataset("fashion_mnist", "train", root=tmp_path)
    assert str(tmp_path / "FashionMNIST" / "raw") in str(error.value) and "\n" not in str(error.value)


def test_idx_with_wrong_length_is_refused(tmp_path):
    path = tmp_path / "bad-idx1-ubyte.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00" * 3)
    with pytest.raises(DataError, match="promises 10"):
        read_idx(path)
    (tmp_path / "not-idx").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "not-idx")


def test_digits_and_skimage_photos():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797 and len(test) == 359 and set(test.labels) == set(range(10))
    assert test.name == "digits" and train.fingerprint() != test.fingerprint()
    photos = load_dataset("skimage_photos", "test")
    assert photos.name == "skimage_photos" and len(photos) == len(SKIMAGE_PHOTOS) == 17
    assert len(set(photos.classnames)) == 17 and photos.classnames[0] == "cat"
    assert photos.classnames == _load("classnames.json")["skimage_photos"]["classnames"]
    for index in range(len(photos)):
        image, label = photos[index]
        assert image.mode == "RGB" and max(image.size) <= 256 and label == index
    # Held-out probe only: both splits are the same photos.
    assert load_dataset("skimage_photos", "train").fingerprint().replace("/train/", "/test/") == photos.fingerprint()


# --- torchvision sets -----------------------------------------------------------------------------


def write_cifar10(root, label_names):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, size=(10, 3072), dtype=np.uint8), "labels": list(range(10))}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": label_names, "num_cases_per_batch": 10, "num_vis": 3072}, handle)


@pytest.fixture
def no_cifar_md5(monkeypatch):
    # torchvision checks the md5 of the real CIFAR files; ours are the same format with other contents,
    # so only those two checks are bypassed. Reading the pickles is torchvision's own code.
    import torchvision.datasets.cifar as cifar_module

    monkeypatch.setattr(cifar_module.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar_module, "check_integrity", lambda path, md5=None: True)


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_cifar10_python_batches(tmp_path, no_cifar_md5):
    write_cifar10(tmp_path, CIFAR10_NAMES)
    dataset = load_dataset("cifar10", "test", root=tmp_path)
    assert dataset.name == "cifar10" and len(dataset) == 10 and dataset.classnames[0] == "airplane"
    image, label = dataset[3]
    assert image.size == (32, 32) and image.mode == "RGB" and label == 3
    assert list(dataset.labels) == list(range(10))
    assert len(dataset.templates) == 18 and all("{}" in template for template in dataset.templates)
    assert len(load_dataset("cifar10", "train", root=tmp_path)) == 50


def test_cifar10_with_other_class_names_is_refused(tmp_path, no_cifar_md5):
    write_cifar10(tmp_path, ["cat", *CIFAR10_NAMES[1:]])
    with pytest.raises(DataError, match="class 0 is 'cat' in the data but 'airplane'"):
        load_dataset("cifar10", "test", root=tmp_path)


def test_mnist_raw_idx_through_torchvision(tmp_path):
    # torchvision's MNIST only checks that its four raw files exist (no md5), so nothing is patched.
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(1).integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    for prefix in ("train", "t10k"):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, compress=False)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.array([7, 2, 1, 0, 4, 1], dtype=np.uint8), compress=False)
    dataset = load_dataset("mnist", "test", root=tmp_path)
    assert dataset.name == "mnist" and list(dataset.labels) == [7, 2, 1, 0, 4, 1]
    assert dataset.classnames == [str(digit) for digit in range(10)]
    image, label = dataset[0]
    assert image.mode == "RGB" and label == 7 and np.array_equal(np.asarray(image)[:, :, 1], images[0])


def write_caltech101(root, categories, per_class=5):
    base = root / "caltech101" / "101_ObjectCategories"
    data = jpeg_bytes()
    for category in ["BACKGROUND_Google", *categories]:
        (base / category).mkdir(parents=True)
        for number in range(1, per_class + 1):
            (base / category / f"image_{number:04d}.jpg").write_bytes(data)


def test_caltech101_fixed_split_and_curated_names(tmp_path):
    curated = _load("classnames.json")["caltech101"]["classnames"]
    write_caltech101(tmp_path, ["Faces", "Faces_easy", "Leopards", "Motorbikes"] + [f"c{i:03d}" for i in range(97)])
    train = load_dataset("caltech101", "train", root=tmp_path)
    test = load_dataset("caltech101", "test", root=tmp_path)
    assert train.classnames == curated and train.classnames[:2] == ["off-center face", "centered face"]
    assert len(train) == 404 and len(test) == 101 and list(test.labels) == list(range(101))
    assert not set(train.indices) & set(test.indices)
    assert np.array_equal(test.indices, load_dataset("caltech101", "test", root=tmp_path).indices)
    image, label = test[0]
    assert image.mode == "RGB" and image.size == (6, 5) and label == 0


def test_caltech101_with_other_classes_is_refused(tmp_path):
    write_caltech101(tmp_path, ["accordion", "airplanes", "anchor"], per_class=2)
    with pytest.raises(DataError, match="has 3 classes but clipcl's class names list 101"):
        load_dataset("caltech101", "train", root=tmp_path)


def test_sun397_names_come_from_its_files(tmp_path):
    data_dir = tmp_path / "SUN397"
    (data_dir / "a" / "abbey").mkdir(parents=True)
    (data_dir / "b" / "bakery" / "shop").mkdir(parents=True)
    (data_dir / "ClassName.txt").write_text("/a/abbey\n/b/bakery/shop\n")
    data = jpeg_bytes()
    for number in range(5):
        (data_dir / "a" / "abbey" / f"sun_a{number}.jpg").write_bytes(data)
        (data_dir / "b" / "bakery" / "shop" / f"sun_b{number}.jpg").write_bytes(data)
    test = load_dataset("sun397", "test", root=tmp_path)
    assert "sun397" in NAMES_FROM_DATASET and test.classnames == ["abbey", "bakery shop"]
    assert sorted(test.labels) == [0, 1] and len(load_dataset("sun397", "train", root=tmp_path)) == 8
    paths = [str(test.base._image_files[index]) for index in test.indices]
    assert paths == sorted(paths)  # the split follows file-path order, not the file system's


def test_absent_torchvision_data_names_the_path(tmp_path):
    for name in ("dtd", "cifar100", "sun397"):
        with pytest.raises(DataError) as error:
            load_dataset(name, "train", root=tmp_path)
        message = str(error.value)
        assert str(tmp_path / TORCHVISION_DATASETS[name][1]) in message and "\n" not in message
        assert "stream.download=true" in message and "place the files there" in message
    with pytest.raises(DataError, match="cannot be downloaded"):  # torchvision refuses before any network
        load_dataset("stanford_cars", "test", root=tmp_path, download=True)


# --- registry -------------------------------------------------------------------------------------


def test_unknown_name_bad_split_and_orders(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'nope'.*fashion_mnist.*cifar100.*imagefolder"):
        load_dataset("nope", "train")
    with pytest.raises(DataError, match="split must be one of train, test"):
        load_dataset("digits", "validation")
    with pytest.raises(DataError, match="stream order"):
        load_dataset("mtil_order_1", "test")
    assert resolve_dataset_list(["mtil_order_2", "digits"]) == STREAM_ORDERS["mtil_order_2"] + ["digits"]
    assert STREAM_ORDERS["mtil_order_1"][:3] == ["aircraft", "caltech101", "cifar100"]
    assert STREAM_ORDERS["mtil_order_2"][:3] == ["stanford_cars", "food101", "mnist"]
    for order in STREAM_ORDERS.values():
        assert len(order) == len(set(order)) == 11 and set(order) <= set(available_datasets())
    assert set(STREAM_ORDERS["mtil_order_1"]) == set(STREAM_ORDERS["mtil_order_2"])


def test_class_names_and_templates_for_every_name():
    classnames, templates = _load("classnames.json"), _load("templates.json")
    expected_counts = {"cifar10": 10, "cifar100": 100, "mnist": 10, "dtd": 47, "eurosat": 10, "flowers102": 102,
                       "food101": 101, "oxford_pet": 37, "caltech101": 101, "fashion_mnist": 10, "digits": 10,
                       "mnist_5k": 10, "skimage_photos": 17}
    names = [name for name in available_datasets() if "<" not in name and ":" not in name]
    assert set(names) == set(OFFLINE_DATASETS) | set(TORCHVISION_DATASETS)
    for name in names:
        entry = classnames.get(name)
        if name in NAMES_FROM_DATASET or name == "tuxpaint_stamps":
            assert entry is None  # read from the dataset's own files (Tux Paint: its folders) at load time
        else:
            assert len(entry["classnames"]) == expected_counts[name], name
            assert len(set(entry["classnames"])) == len(entry["classnames"]), name
        key = (entry or {}).get("templates", name)
        assert templates[key] and all("{}" in template for template in templates[key]), name
    for key, entry in classnames.items():
        assert all("{}" in template for template in templates[entry.get("templates", key)])
    from torchvision.datasets import Flowers102

    assert len(Flowers102.classes) == len(classnames["flowers102"]["classnames"])


def test_registry_import_is_lazy():
    code = ("import sys, clipcl.data.registry as r; r.available_datasets(); "
            "print(sorted(m for m in ('torchvision', 'sklearn', 'skimage') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_labels_must_match_class_names():
    with pytest.raises(DataError, match="class names"):
        ArrayImageDataset(np.zeros((2, 4, 4), np.uint8), np.array([0, 3]), ["a", "b"], ["{}"], "x", "train")


# --- your own data --------------------------------------------------------------------------------


def test_image_folder_splits_and_corrupt_file(tmp_path):
    for split, names in (("train", ("red_car", "blue_boat", "green_bus")), ("test", ("red_car", "green_bus"))):
        for name in names:
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            Image.new("RGB", (9, 9), (200, 0, 0)).save(folder / "a.png")
            Image.new("L", (9, 9), 30).save(folder / "b.jpg")
    (tmp_path / "test" / ".ipynb_checkpoints").mkdir()
    dataset = load_dataset(f"imagefolder:{tmp_path}", "test")
    assert dataset.name == f"imagefolder:{tmp_path}" and dataset.split == "test"
    # Labels index the union of both splits' folders, so a label means the same class in each split.
    assert dataset.classnames == ["blue boat", "green bus", "red car"] and len(dataset) == 4
    assert list(dataset.labels) == [1, 1, 2, 2] and dataset[1][0].mode == "RGB"
    assert load_dataset(f"imagefolder:{tmp_path}", "train").classnames == dataset.classnames
    (tmp_path / "test" / "red_car" / "c.png").write_bytes(b"not an image")
    broken = ImageFolderDataset(tmp_path, "test")
    with pytest.raises(DataError, match="cannot read image .*c.png"):
        broken[len(broken) - 1]
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'absent'}", "test")


def test_image_folder_without_split_folders_gets_a_fixed_split(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for number in range(5):
            Image.new("RGB", (4, 4), (number, 0, 0)).save(tmp_path / name / f"{number}.png")
    train = ImageFolderDataset(tmp_path, "train")
    test = ImageFolderDataset(tmp_path, "test")
    assert len(train) == 8 and len(test) == 2 and sorted(test.labels) == [0, 1]
    assert not set(train.paths) & set(test.paths)


def test_caption_files(tmp_path):
    Image.new("RGB", (5, 5)).save(tmp_path / "one.png")
    Image.new("L", (5, 5)).save(tmp_path / "two.png")
    (tmp_path / "c.csv").write_text("image,caption\none.png,\"a dog, sitting\"\ntwo.png,a cat\n")
    (tmp_path / "open_clip.csv").write_text("filepath\ttitle\none.png\ta dog\ntwo.png\ta cat\none.png\ta puppy\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "one.png", "caption": "a dog"}) + "\n\n")
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": [
        {"filename": "one.png", "split": "test", "sentences": [{"raw": "a dog"}, {"raw": "a puppy"}]},
        {"file_path": "two.png", "split": "restval", "sentences": [{"raw": "a cat"}]}]}))
    csv_set = CaptionDataset(tmp_path / "c.csv")
    assert csv_set.captions == ["a dog, sitting", "a cat"] and len(csv_set) == 2
    image, caption = csv_set[1]
    assert image.mode == "RGB" and caption == "a cat"
    tabbed = CaptionDataset(tmp_path / "open_clip.csv")
    assert tabbed.captions == ["a dog", "a cat", "a puppy"] and tabbed.image_ids == [0, 1, 0]
    assert CaptionDataset(tmp_path / "c.jsonl")[0][1] == "a dog"
    karpathy = CaptionDataset(tmp_path / "karpathy.json", split="test")
    assert karpathy.captions == ["a dog", "a puppy"] and karpathy.image_ids == [0, 0]
    assert CaptionDataset(tmp_path / "karpathy.json", split="train").captions == ["a cat"]  # restval is train
    assert len(CaptionDataset(tmp_path / "karpathy.json")) == 3


def test_caption_file_errors(tmp_path):
    Image.new("RGB", (5, 5)).save(tmp_path / "one.png")
    cases = {
        "bad.csv": ("path,text\none.png,x\n", "needs columns image,caption or filepath,title"),
        "missing.csv": ("image,caption\nthree.png,x\n", "three.png does not exist"),
        "short.csv": ("image,caption\none.png\n", "line 2 lacks"),
        "bad.jsonl": ('{"image": "one.png"}\n', "line 1 is not"),
        "bad.json": ('{"pictures": []}', "Karpathy"),
        "bad.txt": ("one.png x", "must be .csv"),
    }
    for filename, (text, message) in cases.items():
        (tmp_path / filename).write_text(text)
        with pytest.raises(DataError, match=message) as error:
            CaptionDataset(tmp_path / filename)
        assert "\n" not in str(error.value)
    with pytest.raises(DataError, match="does not exist"):
        CaptionDataset(tmp_path / "absent.csv")
