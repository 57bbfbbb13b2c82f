"""Time-continual streams (stream.protocol: time, TiC-CLIP): steps, modes, budgets, bad input."""

import io
import itertools
import json

import numpy as np
import pytest
from PIL import Image

from clipcl.config import ConfigError, RunConfig, from_dict
from clipcl.data.base import DataError
from clipcl.engine.time_steps import budget_steps, step_pool
from clipcl.run import run_experiment

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (200, 30, 200), (30, 200, 200)]


def png(colour, seed: int) -> bytes:
    pixels = np.clip(np.random.default_rng(seed).normal(0, 20, (24, 24, 3)) + colour, 0, 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_dated_shards(folder, years: dict[int, int], timestamp=lambda year, index: year, key: str = "year",
                       shards_per_year: int = 1) -> str:
    """TiC-style webdataset shards: each sample a PNG and a .json with its caption and ``key``; returns
    the folder (every shard, all years mixed in one set)."""
    import webdataset

    folder.mkdir(parents=True, exist_ok=True)
    number = 0
    for year, count in years.items():
        for shard in range(shards_per_year):
            with webdataset.TarWriter(str(folder / f"{year}-{shard:03d}.tar")) as sink:
                for index in range(shard, count, shards_per_year):
                    colour = index % len(COLOURS)
                    record = {"caption": f"picture {colour} from {year}", key: timestamp(year, index)}
                    sink.write({"__key__": f"s{number:05d}", "png": png(COLOURS[colour], number), "json": json.dumps(record)})
                    number += 1
    return str(folder)


@pytest.fixture
def time_run(tiny_config_path, tmp_path):
    shards = write_dated_shards(tmp_path / "shards", {2014: 30, 2015: 30, 2016: 30})

    def make(mode="cumulative_all", datasets=None, **sections):
        data = {
            "model": {"backend": "open_clip", "name": tiny_config_path},
            "stream": {"protocol": "time", "datasets": datasets or [shards]},
            "time": {"mode": mode, "budget_samples": 16},
            "strategy": {"name": "finetune"},
            "train": {"batch_size": 8, "lr": 1e-3},
            "eval": {"batch_size": 16, "cache_dir": "", "alignment": False},
            "observe": {"tensorboard": False, "progress": False},
            "output_dir": str(tmp_path / f"run-{mode}"),
        }
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        return from_dict(RunConfig, data)

    return make


def test_pools_follow_the_paper_buffers():
    sizes = [40, 40, 40, 16]
    pool = {source: len(rows) for source, rows in step_pool(sizes, 3, "cumulative_exp", None, 0)}
    assert pool == {0: 2, 1: 4, 2: 8, 3: 16}  # D = 16 (the step's size): D/2 of the last step, D/4, D/8
    assert {s: len(r) for s, r in step_pool(sizes, 3, "cumulative_exp", 64, 0)} == {0: 8, 1: 16, 2: 32, 3: 16}
    assert {s: len(r) for s, r in step_pool(sizes, 3, "cumulative_equal", 30, 0)} == {0: 10, 1: 10, 2: 10, 3: 16}
    assert {s: len(r) for s, r in step_pool(sizes, 2, "sequential", None, 0)} == {2: 40}
    for mode in ("cumulative_all", "restart", "oracle"):
        assert {s: len(r) for s, r in step_pool(sizes, 2, mode, None, 0)} == {0: 40, 1: 40, 2: 40}
    # A buffer only discards: step 0's rows kept at step 3 are among those kept at step 2.
    kept = {step: set(dict(step_pool(sizes, step, "cumulative_exp", 64, 0))[0]) for step in (1, 2, 3)}
    assert kept[3] <= kept[2] <= kept[1]


def test_budgets_are_equal_but_the_oracle_s():
    from clipcl.config import TrainConfig
    from clipcl.config.time_schema import TimeConfig

    train = TrainConfig(batch_size=8, grad_accumulation=2)
    assert budget_steps(TimeConfig(budget_samples=40), train, 2, 100) == 2  # 40 // 16
    assert budget_steps(TimeConfig(mode="oracle", budget_samples=40), train, 2, 100) == 6  # 3 steps so far
    assert budget_steps(TimeConfig(mode="oracle", budget_samples=40, oracle_factor=5), train, 0, 100) == 10
    assert budget_steps(TimeConfig(), TrainConfig(batch_size=8, epochs=2), 0, 20) == 5  # 2 passes over 20 rows
    with pytest.raises(ConfigError, match="smaller than one optimizer step"):
        budget_steps(TimeConfig(budget_samples=10), train, 0, 100)


def test_a_time_run_cuts_by_timestamp_and_records_its_spending(time_run, tmp_path):
    # Static tasks: a labelled set by zero-shot classification and a caption set by retrieval.
    static_captions = write_dated_shards(tmp_path / "static", {2000: 10})
    results = run_experiment(time_run("cumulative_exp", time={"mode": "cumulative_exp", "budget_samples": 16,
                                                             "first_warmup_steps": 1},
                                      stream={"heldout": ["synthetic-7", static_captions], "heldout_samples": 20}),
                             show_progress=False)
    assert results["heldout"]["datasets"] == ["synthetic-7", static_captions]
    assert all(len(row) == 2 and np.isfinite(row).all() for row in results["heldout"]["after_each_task"])
    assert results["protocol"] == "time" and results["tasks"] == ["2014", "2015", "2016"]
    matrix = np.array(results["accuracy"]["matrix"])
    assert matrix.shape == (3, 3) and np.isfinite(matrix).all()
    steps = results["time"]["steps"]
    assert [step["budget_steps"] for step in steps] == [2, 2, 2]
    own = [step["train_rows"] for step in steps]
    assert steps[2]["pool"] == {"2014": own[2] // 4, "2015": own[2] // 2, "2016": own[2]}
    assert [entry["samples_seen"] for entry in results["compute"]["per_task"]] == [16, 16, 16]
    for name in ("dynamic_in_distribution", "dynamic_backward", "dynamic_forward"):
        assert np.isfinite(results["metrics"][name])


def test_restart_and_oracle_start_every_step_from_the_initial_weights(time_run):
    # Step 0 draws the same samples in every mode from the same weights: one first row. Restart's
    # later rows differ from cumulative_all's (which warm-starts); the oracle spends t + 1 budgets.
    warm = run_experiment(time_run("cumulative_all"), show_progress=False)
    restart = run_experiment(time_run("restart"), show_progress=False)
    oracle = run_experiment(time_run("oracle"), show_progress=False)
    assert restart["accuracy"]["matrix"][0] == warm["accuracy"]["matrix"][0]
    assert restart["accuracy"]["matrix"][1:] != warm["accuracy"]["matrix"][1:]
    assert [entry["optimizer_steps"] for entry in oracle["compute"]["per_task"]] == [2, 4, 6]


def test_a_time_run_resumes_to_the_same_numbers(time_run):
    full = run_experiment(time_run("cumulative_equal"), show_progress=False)
    config = time_run("cumulative_equal")
    config.output_dir += "-resumed"
    assert run_experiment(config, show_progress=False, stop_after_task=0)["interrupted"]
    resumed = run_experiment(config, show_progress=False)
    assert resumed["accuracy"] == full["accuracy"]
    assert resumed["time"] == full["time"]


def test_one_caption_set_per_step(time_run, tmp_path):
    first = write_dated_shards(tmp_path / "a", {2014: 20})
    second = write_dated_shards(tmp_path / "b", {2016: 20})
    results = run_experiment(time_run("sequential", datasets=[first, second]), show_progress=False)
    assert [step["first"] for step in results["time"]["steps"]] == [2014, 2016]
    with pytest.raises(DataError, match="timestamps out of order: time step .* has samples from 2014"):
        config = time_run("sequential", datasets=[second, first])
        config.output_dir += "-reversed"
        run_experiment(config, show_progress=False)


def test_iso_dates_count_as_their_year(tmp_path):
    from clipcl.data.captions import load_caption_set

    folder = write_dated_shards(tmp_path / "dated", {2019: 4}, timestamp=lambda year, i: f"{year}-0{i + 1}-15T10:00:00",
                                key="date")
    assert load_caption_set(folder, timestamp_key="date").timestamps == [2019.0] * 4


def write_dated_caption_files(folder, years: dict[int, int]) -> dict[str, str]:
    """The same dated pictures as caption files of each format (a ``year`` column, an ISO ``date``
    key in JSON lines, a ``year`` field of each Karpathy image); returns the three paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for year, count in years.items():
        for index in range(count):
            name = f"{year}-{index:03d}.png"
            (folder / name).write_bytes(png(COLOURS[index % len(COLOURS)], len(rows)))
            rows.append((name, f"picture {index % len(COLOURS)} from {year}", year))
    (folder / "dated.csv").write_text("image,caption,year\n" + "".join(f"{n},{c},{y}\n" for n, c, y in rows))
    (folder / "dated.jsonl").write_text("".join(json.dumps({"image": n, "caption": c, "date": f"{y}-03-01"}) + "\n"
                                                for n, c, y in rows))
    images = [{"filename": n, "split": "test" if i % 5 == 0 else "train", "year": y, "sentences": [{"raw": c}]}
              for i, (n, c, y) in enumerate(rows)]
    (folder / "dated.json").write_text(json.dumps({"images": images}))
    return {suffix: str(folder / f"dated.{suffix}") for suffix in ("csv", "jsonl", "json")}


def test_caption_files_carry_timestamps_in_every_format(tmp_path):
    from clipcl.data.captions import load_caption_set

    files = write_dated_caption_files(tmp_path / "files", {2014: 3, 2016: 2})
    assert load_caption_set(files["csv"], timestamp_key="year").timestamps == [2014.0] * 3 + [2016.0] * 2
    assert load_caption_set(files["jsonl"], timestamp_key="date").timestamps == [2014.0] * 3 + [2016.0] * 2
    assert load_caption_set(files["json"], "all", timestamp_key="year").timestamps == [2014.0] * 3 + [2016.0] * 2
    assert load_caption_set(files["csv"]).timestamps is None  # no key asked for: none read (other protocols)
    assert load_caption_set(files["csv"], timestamp_key="date").timestamps is None  # the column is absent
    undated = tmp_path / "files" / "undated.jsonl"  # JSON null: no timestamp, as an absent key
    undated.write_text(json.dumps({"image": "2014-000.png", "caption": "a picture", "year": None}) + "\n")
    assert load_caption_set(str(undated), timestamp_key="year").timestamps is None


def test_a_karpathy_file_keeps_its_split_in_a_time_run(time_run, tmp_path):
    files = write_dated_caption_files(tmp_path / "files", {2014: 20, 2015: 20})
    results = run_experiment(time_run("sequential", datasets=[files["json"]]), show_progress=False)
    assert results["tasks"] == ["2014", "2015"]
    assert [step["train_rows"] for step in results["time"]["steps"]] == [16, 16]  # every fifth image is test


def test_a_caption_file_without_the_key_names_it(time_run, tmp_path):
    files = write_dated_caption_files(tmp_path / "files", {2014: 5, 2015: 5})
    with pytest.raises(DataError, match="has no timestamps: .*a caption file with a 'when' column"):
        run_experiment(time_run("sequential", datasets=[files["csv"]], time={"timestamp_key": "when"}),
                       show_progress=False)


def test_a_time_run_reads_a_dated_caption_file(time_run, tmp_path):
    files = write_dated_caption_files(tmp_path / "files", {2014: 20, 2015: 20})
    results = run_experiment(time_run("sequential", datasets=[files["csv"]]), show_progress=False)
    assert results["tasks"] == ["2014", "2015"]
    assert [(step["first"], step["last"]) for step in results["time"]["steps"]] == [(2014, 2014), (2015, 2015)]
    # One caption an image; the images not held out by the key hash are each step's training rows.
    from clipcl.data.time_stream import held_out_by_key

    expected = [sum(not held_out_by_key(f"{year}-{index:03d}.png") for index in range(20)) for year in (2014, 2015)]
    assert [step["train_rows"] for step in results["time"]["steps"]] == expected
    assert np.isfinite(results["accuracy"]["matrix"]).all()


@pytest.mark.parametrize("text, message", [
    ("image,caption,year\na.png,one,2014\nb.png,two,\n", "line 3 \\(b.png\\) has no 'year', which other rows have"),
    ("image,caption,year\na.png,one,2014\nb.png,two,  \n", "line 3 \\(b.png\\) has no 'year'"),  # blank = none
    ("image,caption,year\na.png,one,2014\na.png,again,2015\n", "line 3: image a.png has two timestamps \\(2014 and 2015\\)"),
    ("image,caption,year\na.png,one,2014\nb.png,two,nan\n", "line 3 \\(b.png\\): timestamp 'nan' is neither a number"),
    ("image,caption,year\na.png,one,20140301\na.png,again,20140305\n", "two timestamps \\(20140301 and 20140305\\)"),
])
def test_caption_file_timestamps_must_be_whole(text, message, tmp_path):
    from clipcl.data.captions import load_caption_set

    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(png(COLOURS[0], 0))
    (tmp_path / "dated.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        load_caption_set(str(tmp_path / "dated.csv"), timestamp_key="year")


@pytest.mark.parametrize("case, message", [
    ("no timestamps", "has no timestamp \\(a .json member with a 'year' field"),
    ("empty step", "time step 2030-2031 of .* has no training images"),
    ("small budget", "time.budget_samples \\(4\\) is smaller than one optimizer step's samples"),
    ("bad date", "timestamp 'last spring' is neither a number nor an ISO date"),
])
def test_bad_input_is_one_line_and_writes_nothing(case, message, time_run, tmp_path):
    if case == "no timestamps":
        config = time_run(datasets=[write_dated_shards(tmp_path / "undated", {2014: 6}, key="when")])
    elif case == "bad date":
        config = time_run(datasets=[write_dated_shards(tmp_path / "bad", {2014: 6}, timestamp=lambda y, i: "last spring")])
    elif case == "empty step":
        config = time_run(time={"steps": [[2014, 2015], [2030, 2031]]})
    else:
        config = time_run(time={"budget_samples": 4})
    with pytest.raises((DataError, ConfigError), match=message) as error:
        run_experiment(config, show_progress=False)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run-cumulative_all").exists()  # a run that cannot start leaves no folder


def test_time_steps_must_be_ranges_in_order():
    with pytest.raises(ConfigError, match="must not overlap"):
        from_dict(RunConfig, {"time": {"steps": [[2014, 2016], [2016, 2017]]}})
    with pytest.raises(ConfigError, match="ends before it begins"):
        from_dict(RunConfig, {"time": {"steps": [[2016, 2014]]}})


def test_emoji_are_dated_by_their_emoji_version():
    from clipcl.data.emoji import RELEASE_YEARS, EmojiNames

    emoji = EmojiNames(split="test", translations=False)
    assert emoji.timestamps == [float(RELEASE_YEARS[version]) for version in emoji.versions]
    years = sorted(set(emoji.timestamps))
    assert years[0] == 2010 and years[-1] >= 2021 and len(years) >= 8


# --- streamed steps (time.streaming) -------------------------------------------------------------


def test_streamed_shards_are_split_across_processes_and_skip_the_held_out_samples(tmp_path):
    from pathlib import Path

    from clipcl.data.shard_stream import streamed_pairs
    from clipcl.data.time_stream import held_out_by_key

    folder = Path(write_dated_shards(tmp_path / "year", {2014: 48}, shards_per_year=4))
    shards = sorted(folder.glob("*.tar"))
    seen = {}
    for rank in range(2):
        pairs = streamed_pairs(shards, 0, rank, 2, seed=3, transform=lambda image: image, held_out=held_out_by_key)
        seen[rank] = [(item[1], item[2]) for item in itertools.islice(iter(pairs), 60)]
    ids = [{image_id for _, image_id in seen[rank]} for rank in range(2)]
    assert ids[0] and ids[1] and not ids[0] & ids[1]  # each process reads its own shards
    # Passes repeat: 60 draws from about 19 training samples per process revisit each one.
    assert len(seen[0]) == 60 and len(ids[0]) < 30
    from clipcl.data.captions import load_caption_set

    every = load_caption_set(str(folder))
    held = {key for key in every.image_keys if held_out_by_key(key)}
    assert held  # some samples are held out, and no process trains on them
    trained = len(ids[0]) + len(ids[1])
    assert trained == every.num_images - len(held)


def test_a_streamed_time_run_trains_two_processes_on_their_own_shards(time_run, tmp_path):
    years = [write_dated_shards(tmp_path / str(year), {year: 24}, shards_per_year=2) for year in (2014, 2015)]
    config = time_run("cumulative_all", datasets=years, time={"streaming": True, "budget_samples": 16},
                      train={"batch_size": 8, "devices": 2})
    results = run_experiment(config, show_progress=False)
    assert results["time"]["pool_counts"] == "shards"
    assert [step["pool"] for step in results["time"]["steps"]] == [{years[0]: 2}, {years[0]: 2, years[1]: 2}]
    assert [entry["samples_seen"] for entry in results["compute"]["per_task"]] == [16, 16]
    assert np.isfinite(np.array(results["accuracy"]["matrix"])).all()
    # Each step's test is its held-out samples only (the rest are streamed, never indexed).
    assert results["task_train_sizes"][0] + results["task_test_sizes"][0] == 24


def test_streaming_needs_a_shard_per_reader(time_run, tmp_path):
    years = [write_dated_shards(tmp_path / str(year), {year: 12}) for year in (2014, 2015)]
    config = time_run(datasets=years, time={"streaming": True, "budget_samples": 16}, train={"batch_size": 8, "devices": 2})
    from clipcl.errors import UserError

    # Found in each spawned process, reported as the run's one line.
    with pytest.raises(UserError, match="has 1 shard\\(s\\); each of the 2 process\\(es\\)"):
        run_experiment(config, show_progress=False)
