"""Caption streams (stream.protocol: captions) through the engine, and alignment in every run."""

import json

import numpy as np
import pytest
from PIL import Image

from clipcl.config import RunConfig, from_dict
from clipcl.data.base import DataError
from clipcl.run import run_experiment

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def write_caption_csv(folder, name: str, images: int, seed: int) -> str:
    """A CSV caption file (columns image,caption) with ``images`` small pictures, two captions each."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["image,caption"]
    for index in range(images):
        colour = COLOURS[index % len(COLOURS)]
        pixels = (rng.random((24, 24, 3)) * 60 + 40 * (index % len(COLOURS))).astype("uint8")
        Image.fromarray(pixels).save(folder / f"{name}_{index:03d}.png")
        lines.append(f"{name}_{index:03d}.png,a {colour} picture number {index}")
        lines.append(f"{name}_{index:03d}.png,a drawing in {colour}")
    path = folder / f"{name}.csv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def caption_run(tiny_config_path, tmp_path):
    train = write_caption_csv(tmp_path / "data", "new", 36, seed=1)
    old = write_caption_csv(tmp_path / "data", "old", 12, seed=2)

    def make(strategy=None, **sections):
        data = {
            "model": {"backend": "open_clip", "name": tiny_config_path},
            "stream": {"protocol": "captions", "datasets": [train], "num_tasks": 3, "heldout": [old]},
            "strategy": strategy or {"name": "finetune"},
            "train": {"batch_size": 8, "max_steps_per_task": 3, "lr": 1e-3},
            "eval": {"batch_size": 16, "cache_dir": ""},
            "observe": {"tensorboard": False, "progress": False},
            "seed": 0,
            "output_dir": str(tmp_path / "run"),
        }
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        return from_dict(RunConfig, data)

    return make


def test_caption_stream_trains_and_measures_retrieval_and_alignment(caption_run, tmp_path):
    results = run_experiment(caption_run(), show_progress=False)
    assert results["protocol"] == "captions"
    assert len(results["tasks"]) == 3 and all("[" in name for name in results["tasks"])
    matrix = np.array(results["accuracy"]["matrix"])
    assert matrix.shape == (3, 3) and np.isfinite(matrix).all()
    assert results["accuracy"]["measure"].startswith("mean R@1")
    # A phase's matrix entry is the mean of its two R@1 values.
    after_last = results["retrieval"]["after_each_task"][-1]
    first_phase = after_last[f"task/{results['tasks'][0]}"]
    assert matrix[-1, 0] == pytest.approx(0.5 * (first_phase["image_to_text_R@1"] + first_phase["text_to_image_R@1"]))
    assert len(results["heldout"]["after_each_task"][-1]) == 1
    # Training moved the loss (the contrastive path ran).
    assert all(first is not None and last is not None for first, last in results["losses_first_last"])
    alignment = results["alignment"]
    assert set(alignment["zero_shot"]) == {*(f"task/{name}" for name in results["tasks"]), "held-out/" +
                                           results["heldout"]["datasets"][0]}
    last = alignment["after_each_task"][-1][f"task/{results['tasks'][0]}"]
    for key in ("modality_gap", "alignment", "uniformity_image", "uniformity_text", "vs_zero_shot/rotation_image_deg",
                "vs_previous/rotation_image_deg"):
        assert key in last and np.isfinite(last[key])
    assert "vs_zero_shot/rotation_image_deg" not in alignment["zero_shot"][f"task/{results['tasks'][0]}"]
    assert "modality_gap_last" in results["metrics"]
    # The reference features are kept beside the checkpoints, for the next rows and for a resume.
    assert (tmp_path / "run" / "checkpoints" / "alignment_zero_shot.safetensors").is_file()
    from clipcl.report import plot_run

    written = plot_run(results, tmp_path / "run")
    assert (tmp_path / "run" / "alignment.png") in written
    assert "Image-text alignment" in (tmp_path / "run" / "summary.md").read_text()


def test_caption_stream_resumes_to_the_same_numbers(caption_run, tmp_path):
    whole = run_experiment(caption_run(), show_progress=False)
    interrupted_config = caption_run()
    interrupted_config.output_dir = str(tmp_path / "interrupted")
    assert run_experiment(interrupted_config, show_progress=False, stop_after_task=0)["interrupted"]
    resumed = run_experiment(interrupted_config, show_progress=False)
    assert resumed["accuracy"] == whole["accuracy"]
    assert resumed["retrieval"] == whole["retrieval"]
    # The rotation against the zero-shot and previous model after the resume uses the kept features.
    assert json.dumps(resumed["alignment"], sort_keys=True) == json.dumps(whole["alignment"], sort_keys=True)


def test_class_streams_measure_alignment_too(tiny_run_config):
    results = run_experiment(tiny_run_config(stream={"heldout": ["synthetic-3"], "heldout_samples": 30},
                                             eval={"alignment_images": 40}), show_progress=False)
    rows = results["alignment"]["after_each_task"]
    assert len(rows) == 3
    assert set(rows[-1]) == {"task/synthetic-0", "task/synthetic-1", "task/synthetic-2", "held-out/synthetic-3"}
    assert "vs_previous/rotation_image_deg" in rows[-1]["task/synthetic-0"]


def _without_alignment(tiny_run_config):
    config = tiny_run_config(eval={"alignment": False})
    config.output_dir = config.output_dir + "-no-alignment"
    return config


def test_alignment_changes_no_accuracy(tiny_run_config):
    with_alignment = run_experiment(tiny_run_config(), show_progress=False)
    without = run_experiment(_without_alignment(tiny_run_config), show_progress=False)
    assert with_alignment["accuracy"] == without["accuracy"]


def test_caption_stream_bad_input_is_one_line(caption_run, tmp_path):
    from clipcl.config import ConfigError

    with pytest.raises(ConfigError, match="cannot train on stream.protocol=captions"):
        caption_run({"name": "er"})
    config = caption_run()
    config.stream.num_tasks = 100
    with pytest.raises(DataError, match="cannot be cut into 100 phases"):
        run_experiment(config, show_progress=False)
    assert not (tmp_path / "run").exists()  # nothing written for a run that could not start
