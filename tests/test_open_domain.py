"""Open-domain protocols (CoLeCLIP's ODCL-TIL / ODCL-CIL), the seen-average and the Tux Paint categories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipcl.config import ConfigError, StreamConfig
from clipcl.data.base import ArrayImageDataset, DataError
from clipcl.data.open_domain import pooled_classes
from clipcl.data.registry import load_dataset
from clipcl.data.stamp_categories import MIN_STAMPS_PER_CATEGORY, TuxPaintCategories
from clipcl.data.streams import PROTOCOLS, ClassText, Stream, domain_tasks
from clipcl.eval import metrics
from clipcl.eval.text_cache import stream_classes

PHOTO, SKETCH, ART = "a photo of a {}.", "a sketch of a {}.", "art of a {}."


def _domain(name: str, classnames: list[str], templates: list[str]):
    """A (train, test) pair of tiny 8x8 images, two per class."""
    labels = np.repeat(np.arange(len(classnames)), 2)
    images = np.random.default_rng(len(name)).integers(0, 255, size=(len(labels), 8, 8, 3)).astype(np.uint8)
    return tuple(ArrayImageDataset(images, labels, classnames, templates, name, split) for split in ("train", "test"))


def _three_domains() -> list:
    # "dog" is in tasks 0 and 1, "cat" in tasks 0 and 2; task 1's templates repeat task 0's PHOTO.
    return domain_tasks([_domain("pets", ["cat", "dog"], [PHOTO]),
                         _domain("mixed", ["0", "dog", "1"], [SKETCH, PHOTO]),
                         _domain("zoo", ["bird", "cat"], [ART])])


CAT = ClassText("cat", (PHOTO, ART))
DOG = ClassText("dog", (PHOTO, SKETCH))  # pooled in stream order, the repeated PHOTO kept once


def test_shared_class_names_are_one_class_with_pooled_templates():
    tasks = _three_domains()
    pooled = pooled_classes(tasks)
    assert list(pooled) == ["cat", "dog", "0", "1", "bird"]
    assert pooled["cat"] == CAT and pooled["dog"] == DOG
    assert pooled["0"] == ClassText("0", (SKETCH, PHOTO)) and pooled["bird"] == ClassText("bird", (ART,))
    stream = Stream("open_domain_cil", tasks)
    assert stream.tasks_containing("dog") == [0, 1] and stream.tasks_containing("cat") == [0, 2]
    assert stream.tasks_containing("bird") == [2] and stream.tasks_containing("Dog") == []
    # The tasks' own classes (what training prompts with) are untouched.
    assert tasks[1].classes[1] == ClassText("dog", (SKETCH, PHOTO))


def test_cil_label_space_is_the_seen_union_and_own_classes_for_unseen_tasks():
    stream = Stream("open_domain_cil", _three_domains())
    assert not stream.task_id_at_test
    # Zero-shot row and unseen tasks: their own classes (pooled texts), identity targets.
    for after_task in (-1, 0):
        classes, target_of = stream.eval_label_space(after_task, 1)
        assert classes == [ClassText("0", (SKETCH, PHOTO)), DOG, ClassText("1", (SKETCH, PHOTO))]
        assert target_of == {0: 0, 1: 1, 2: 2}
    assert stream.eval_label_space(-1, 0) == ([CAT, DOG], {0: 0, 1: 1})
    assert stream.eval_label_space(0, 0) == ([CAT, DOG], {0: 0, 1: 1})
    # After task 1: the de-duplicated union in order of first appearance.
    union = [CAT, DOG, ClassText("0", (SKETCH, PHOTO)), ClassText("1", (SKETCH, PHOTO))]
    assert stream.eval_label_space(1, 0) == (union, {0: 0, 1: 1})
    assert stream.eval_label_space(1, 1) == (union, {0: 2, 1: 1, 2: 3})
    assert stream.eval_label_space(1, 2) == ([ClassText("bird", (ART,)), CAT], {0: 0, 1: 1})
    classes, target_of = stream.eval_label_space(2, 2)
    assert classes == [*union, ClassText("bird", (ART,))] and target_of == {0: 4, 1: 0}


def test_til_scores_each_task_among_its_own_classes_with_the_same_texts():
    tasks = _three_domains()
    til, multi_domain = Stream("open_domain_til", tasks), Stream("multi_domain", tasks)
    assert til.task_id_at_test and multi_domain.task_id_at_test
    for after_task in (-1, 0, 2):
        assert til.eval_label_space(after_task, 0) == ([CAT, DOG], {0: 0, 1: 1})
    # Unlike multi_domain, a shared class carries the pooled templates.
    assert multi_domain.eval_label_space(2, 0)[0] == tasks[0].classes != [CAT, DOG]
    assert til.own_label_space(2) == [ClassText("bird", (ART,)), CAT]


def test_the_shared_text_cache_holds_every_label_space_class_once():
    stream = Stream("open_domain_cil", _three_domains())
    canonical = stream_classes(stream)
    assert canonical == list(pooled_classes(stream.tasks).values())
    for after_task in range(-1, 3):
        for eval_task in range(3):
            assert set(stream.eval_label_space(after_task, eval_task)[0]) <= set(canonical)
    # A stream without shared names keeps the canonical list of the other protocols.
    plain = domain_tasks([_domain("a", ["x", "y"], [PHOTO]), _domain("b", ["z"], [ART])])
    assert stream_classes(Stream("open_domain_til", plain)) == stream_classes(Stream("multi_domain", plain))


def test_forest_and_river_pool_by_default_and_take_eurosat_templates_alone_as_an_option():
    from clipcl.data.open_domain import TEMPLATE_OWNER

    satellite = "a satellite photo of {}."
    tasks = domain_tasks([_domain("cifar100", ["forest", "apple"], [PHOTO]),
                          _domain("eurosat", ["forest", "river"], [satellite]),
                          _domain("sun397", ["river", "forest path"], [SKETCH])])
    pooled = pooled_classes(tasks)
    assert pooled["forest"].templates == (PHOTO, satellite)
    assert pooled["river"].templates == (satellite, SKETCH)
    official = pooled_classes(tasks, TEMPLATE_OWNER)
    assert official["forest"].templates == official["river"].templates == (satellite,)
    # The stream carries the choice into its label spaces.
    stream = Stream("open_domain_cil", tasks, template_owners=dict(TEMPLATE_OWNER))
    classes, _ = stream.eval_label_space(2, 0)
    assert {c.name: c.templates for c in classes}["river"] == (satellite,)
    # Without EuroSAT in the stream they pool as any shared name does, even with the option.
    without = domain_tasks([_domain("cifar100", ["river"], [PHOTO]), _domain("sun397", ["river"], [SKETCH])])
    assert pooled_classes(without, TEMPLATE_OWNER)["river"].templates == (PHOTO, SKETCH)


def test_protocol_names_are_accepted_and_listed(capsys):
    from clipcl.cli import main

    for protocol in ("open_domain_til", "open_domain_cil"):
        assert protocol in PROTOCOLS
        assert StreamConfig(protocol=protocol, datasets=["mtil_order_2"]).protocol == protocol
    with pytest.raises(ConfigError, match="stream.protocol must be one of .*open_domain_til, open_domain_cil"):
        StreamConfig(protocol="open_domain")
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "  open_domain_til\n" in listed and "  open_domain_cil\n" in listed and "  tuxpaint_stamps\n" in listed


def test_seen_average_on_a_hand_built_matrix():
    matrix = [[80.0, 30.0, 20.0],
              [70.0, 90.0, 25.0],
              [60.0, 85.0, 95.0]]
    # Columns of the lower triangle, diagonal included: (80+70+60)/3, (90+85)/2, 95.
    assert metrics.seen_average(matrix) == pytest.approx((70.0 + 87.5 + 95.0) / 3)
    assert metrics.seen_average([[42.0]]) == 42.0
    assert "seen_avg" in metrics.all_metrics(matrix, open_domain=True)
    assert "seen_avg" not in metrics.all_metrics(matrix)
    assert matrix[0] == [80.0, 30.0, 20.0]  # not modified


def test_clipcl_metrics_prints_the_seen_average_when_asked(tmp_path, capsys):
    from clipcl.cli import main

    path = tmp_path / "matrix.json"
    path.write_text(json.dumps([[80.0, 30.0], [70.0, 90.0]]))
    assert main(["metrics", str(path), "--json", "--open-domain"]) == 0
    assert json.loads(capsys.readouterr().out)["seen_avg"] == pytest.approx((75.0 + 90.0) / 2)
    assert main(["metrics", str(path), "--json"]) == 0
    assert "seen_avg" not in json.loads(capsys.readouterr().out)


def test_an_open_domain_cil_run_reports_the_seen_average(tiny_run_config):
    from clipcl.run import run_experiment

    config = tiny_run_config(stream={"protocol": "open_domain_cil", "datasets": ["synthetic-0", "synthetic-1"],
                                     "test_samples_per_task": 12},
                             train={"max_steps_per_task": 1, "batch_size": 8})
    results = run_experiment(config, show_progress=False)
    matrix = results["accuracy"]["matrix"]
    assert results["protocol"] == "open_domain_cil" and len(matrix) == 2
    assert results["metrics"]["seen_avg"] == metrics.seen_average(matrix)
    summary = (Path(config.output_dir) / "summary.md").read_text()
    assert "| seen_avg |" in summary


# --- Tux Paint stamp categories -------------------------------------------------------------------


def _stamp(folder: Path, name: str, description: str, colour: tuple[int, int, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", (10, 6), colour + (255,)).save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text(f"{description}\nfr.utf8=Une image.\n")
    (folder / f"{name}.dat").write_text("colorable\n")


def _stamp_tree(root: Path) -> Path:
    """<root>/tuxpaint in Tux Paint's layout: enough animals and vehicles, two lone medical stamps."""
    stamps = root / "tuxpaint"
    for index in range(MIN_STAMPS_PER_CATEGORY):
        _stamp(stamps / "animals" / ("birds" if index % 2 else "mammals"), f"animal{index}", f"An animal {index}.",
               (200, 100, 0))
        _stamp(stamps / "vehicles" / "auto", f"car{index}", f"A car {index}.", (0, 0, 200))
    _stamp(stamps / "medical", "bandage", "A bandage.", (255, 0, 0))
    _stamp(stamps / "medical", "syringe", "A syringe.", (255, 0, 0))
    Image.new("RGB", (4, 4)).save(stamps / "animals" / "mammals" / "animal0_mirror.png")  # a variant, not a stamp
    return stamps


def test_tux_paint_categories_from_written_files(tmp_path):
    stamps = _stamp_tree(tmp_path)
    train = load_dataset("tuxpaint_stamps", "train", root=tmp_path)
    test = TuxPaintCategories(stamps, "test", cache_dir=tmp_path / "renders")
    for dataset in (train, test):
        assert dataset.classnames == ["animals", "vehicles"] and dataset.dropped == {"medical": 2}
        assert dataset.templates[0] == "a drawing of {}."
        assert set(dataset.labels) <= {0, 1}
    assert len(train) + len(test) == 2 * MIN_STAMPS_PER_CATEGORY and len(test) > 0
    assert not {str(path) for path in train.paths} & {str(path) for path in test.paths}
    for dataset in (train, test):
        for index in range(len(dataset)):
            image, label = dataset[index]
            assert image.mode == "RGB" and image.size == (224, 224)
            assert dataset.paths[index].parent.parent.name == ("animals", "vehicles")[label]
    # The split is the caption set's fixed rule, the same on every load.
    assert train.fingerprint() == load_dataset("tuxpaint_stamps", "train", root=tmp_path).fingerprint()
    with pytest.raises(DataError, match="split must be one of train, test"):
        TuxPaintCategories(stamps, "all")
    with pytest.raises(DataError, match="categories have at least"):
        TuxPaintCategories(stamps, "train", min_stamps=10_000)


def test_tux_paint_categories_as_a_domain_of_an_open_domain_stream(tmp_path):
    from clipcl.data.streams import build_stream

    _stamp_tree(tmp_path)
    stream = build_stream(StreamConfig(protocol="open_domain_cil", datasets=["synthetic-0", "tuxpaint_stamps"],
                                       data_root=str(tmp_path), test_samples_per_task=6), seed=0)
    classes, target_of = stream.eval_label_space(1, 1)
    assert [c.name for c in classes][-2:] == ["animals", "vehicles"] and target_of == {0: 6, 1: 7}
    assert classes[-1].prompts()[0] == "a drawing of vehicles."
    assert len(stream.tasks[1].test) == 6 and stream.tasks[1].name == "tuxpaint_stamps"


def test_a_row_encodes_the_pooled_classes_once_and_scores_with_them(tiny_run_config, monkeypatch):
    import torch

    from clipcl.engine.runtime import Runtime
    from clipcl.eval.evaluator import evaluate_row
    from clipcl.models import build_backend
    from clipcl.strategies import build_strategy

    config = tiny_run_config()
    strategy = build_strategy(build_backend(config.model), config.strategy)
    stream = Stream("open_domain_cil", _three_domains())
    encoded = []
    original = type(strategy).encode_classes

    def counting(self, classes, task_index):
        encoded.append(list(classes))
        return original(self, classes, task_index)

    monkeypatch.setattr(type(strategy), "encode_classes", counting)
    cpu = Runtime(torch.device("cpu"))
    evaluate_row(strategy, stream, 1, cpu, 4, None, show_progress=False)
    # One canonical encode for the row, holding the merged class once, with its pooled templates.
    assert encoded == [stream_classes(stream)]
    assert [class_text for class_text in encoded[0] if class_text.name == "dog"] == [DOG]
    encoded.clear()
    evaluate_row(strategy, stream, 1, cpu, 4, None, show_progress=False, shared_text=False)
    assert encoded == [stream.eval_label_space(1, task)[0] for task in range(3)]  # each label space, as asked
