"""Metrics on hand-computed matrices, and the `clipcl metrics` command."""

import json
import math

import numpy as np
import pytest

from clipcl.cli import main
from clipcl.eval import metrics

# rows: after task 1, 2, 3; columns: task 1, 2, 3
MATRIX = [
    [80.0, 30.0, 20.0],
    [70.0, 90.0, 25.0],
    [60.0, 85.0, 95.0],
]


def test_transfer_is_zscl_definition():
    # task 2: mean(acc[1,2]) = 30; task 3: mean(acc[1,3], acc[2,3]) = (20 + 25) / 2 = 22.5
    assert metrics.transfer(MATRIX) == pytest.approx((30.0 + 22.5) / 2)


def test_avg_last_bwt_forgetting():
    assert metrics.average(MATRIX) == pytest.approx(sum(map(sum, MATRIX)) / 9)
    assert metrics.last(MATRIX) == pytest.approx((60 + 85 + 95) / 3)
    # BWT: ((60 - 80) + (85 - 90)) / 2
    assert metrics.backward_transfer(MATRIX) == pytest.approx(-12.5)
    # forgetting: task 1 best before end = max(80, 70) = 80 -> 20; task 2: max(90) - 85 = 5
    assert metrics.forgetting(MATRIX) == pytest.approx(12.5)


def test_average_incremental_accuracy_weighted_by_task_size():
    # after task 1: 80; after task 2: (70*10 + 90*30) / 40 = 85; after 3: (60*10+85*30+95*60)/100 = 88.5
    sizes = [10, 30, 60]
    assert metrics.average_incremental_accuracy(MATRIX, sizes) == pytest.approx((80 + 85 + 88.5) / 3)
    # unweighted: after 2 -> 80; after 3 -> 80
    assert metrics.average_incremental_accuracy(MATRIX) == pytest.approx((80 + 80 + 80) / 3)


def test_metrics_do_not_mutate_input():
    array = np.array(MATRIX)
    copy = array.copy()
    metrics.all_metrics(array, [1, 1, 1], class_incremental=True)
    assert np.array_equal(array, copy)


def test_single_task_and_bad_shapes():
    assert math.isnan(metrics.transfer([[50.0]]))
    assert metrics.last([[50.0]]) == 50.0
    with pytest.raises(ValueError):
        metrics.average([[1.0, 2.0]])
    with pytest.raises(ValueError):
        metrics.average([[float("nan")]])


def test_retention():
    assert metrics.retention([50.0, 20.0], [25.0, 20.0]) == pytest.approx(75.0)


def test_cli_metrics_csv_with_header_and_json(tmp_path, capsys):
    path = tmp_path / "matrix.csv"
    path.write_text("task1,task2,task3\n" + "\n".join(",".join(str(v) for v in row) for row in MATRIX) + "\n")
    assert main(["metrics", str(path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"transfer", "avg", "last", "bwt", "forgetting"}
    assert printed["transfer"] == pytest.approx(26.25)
    assert printed["bwt"] == pytest.approx(-12.5)


def test_cli_metrics_plain_csv_and_json_file(tmp_path, capsys):
    plain = tmp_path / "plain.csv"
    plain.write_text("\n".join(",".join(str(v) for v in row) for row in MATRIX))
    assert main(["metrics", str(plain)]) == 0
    assert "transfer" in capsys.readouterr().out
    as_json = tmp_path / "m.json"
    as_json.write_text(json.dumps({"matrix": MATRIX}))
    assert main(["metrics", str(as_json), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["last"] == pytest.approx(80.0)


def test_cli_metrics_rejects_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2\n3,x\n")
    assert main(["metrics", str(bad)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("clipcl: error:") and len(error.strip().splitlines()) == 1
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("1,2\n3\n")
    assert main(["metrics", str(ragged)]) == 2


def test_dont_stop_learning_metrics_on_a_hand_computed_matrix():
    sizes = [10, 30, 60]
    # UT after each phase (size-weighted over the phases seen): 80, 85, 88.5 (as above)
    values = metrics.dont_stop_learning(MATRIX, sizes, heldout_zero_shot=[50.0, 30.0], heldout_last=[40.0, 20.0])
    assert metrics.updated_task_accuracies(MATRIX, sizes) == pytest.approx([80.0, 85.0, 88.5])
    assert values["ut_acc"] == pytest.approx((80 + 85 + 88.5) / 3)
    assert values["ut_last"] == pytest.approx(88.5)
    assert values["zs_acc"] == pytest.approx(30.0) and values["zs_acc_zero_shot"] == pytest.approx(40.0)
    assert values["a_acc"] == pytest.approx(((80 + 85 + 88.5) / 3 + 30.0) / 2)
    # one session: UT is the single entry; no held-out sets: no ZS-Acc and no A-Acc
    assert metrics.dont_stop_learning([[72.0]], [100], [], []) == {"ut_acc": 72.0, "ut_last": 72.0}


def test_retrieval_change_averages_sets_and_directions():
    before = {"a": {"image_to_text_R@1": 50.0, "text_to_image_R@1": 40.0},
              "b": {"image_to_text_R@1": 30.0, "text_to_image_R@1": 20.0}}
    after = {"a": {"image_to_text_R@1": 45.0, "text_to_image_R@1": 40.0},
             "b": {"image_to_text_R@1": 15.0, "text_to_image_R@1": 30.0}}
    change = metrics.retrieval_change(before, after)
    assert change["i2t_r1_zero_shot"] == pytest.approx(40.0) and change["i2t_r1_last"] == pytest.approx(30.0)
    assert change["i2t_r1_change"] == pytest.approx(-10.0)
    assert change["t2i_r1_change"] == pytest.approx(5.0)
    assert metrics.retrieval_change({}, {}) == {}
