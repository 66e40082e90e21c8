"""``nnunet-ext demo``: the pipeline with a test-sized dataset and trainer, and its output-folder rules."""

import json
import math

import pytest
from conftest import TEST_TRAINER_DIR

from nnunet_ext.benchmarking.demo import MARKER, format_table, prepare_output_folder, run_demo
from nnunet_ext.errors import UserError
from nnunet_ext.nnunet_paths import EXT_TRAINER_VAR


@pytest.mark.integration
def test_demo_runs_end_to_end_and_prints_the_dice_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(EXT_TRAINER_VAR, str(TEST_TRAINER_DIR))
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    monkeypatch.delenv("nnUNet_n_proc_DA", raising=False)
    synth = dict(name="DemoTest", num_cases=5, num_test_cases=1, shape=(16, 32, 32), every=4, seed=1)
    trainers = ("nnUNetTrainer_exttest_noval", "MeanTeacherContinuityTrainer_exttest_noval")
    results = run_demo(tmp_path / "demo", trainers=trainers, dataset_id=9, synth=synth)

    assert list(results) == list(trainers)
    for scores in results.values():
        assert set(scores) == {"vessel", "nucleus", "mean"}
        assert all(math.isnan(v) or 0.0 <= v <= 1.0 for v in scores.values())
    assert json.loads((tmp_path / "demo" / "results.json").read_text()) == json.loads(json.dumps(results))
    *table, caveat = capsys.readouterr().out.splitlines()[-4:]
    assert "too short to show whether a trainer beats stock" in caveat
    assert table[0].split() == ["trainer", "vessel", "nucleus", "mean"]
    assert [row.split()[0] for row in table[1:]] == list(trainers)


def test_format_table_by_hand():
    table = format_table({"A": {"vessel": 0.5, "mean": float("nan")}, "LongerName": {"vessel": 1.0, "mean": 0.25}})
    assert table.splitlines() == [
        "trainer       vessel      mean",
        "A              0.500       n/a",
        "LongerName     1.000     0.250",
    ]


def test_a_previous_demo_folder_is_replaced_anything_else_is_refused(tmp_path):
    demo = tmp_path / "demo"
    prepare_output_folder(demo)
    (demo / "old_output.txt").write_text("from the last run")
    prepare_output_folder(demo)
    assert [p.name for p in demo.iterdir()] == [MARKER]

    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("keep")
    with pytest.raises(UserError, match="not a demo folder"):
        prepare_output_folder(other)
    assert [p.name for p in other.iterdir()] == ["data.txt"]
