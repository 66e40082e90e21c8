"""``nnunet-ext evaluate``: per-case metrics of hand-built volumes, aggregation, files, table and bad input."""

import csv
import json
import math
import os

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import cli

from nnunet_ext.errors import UserError
from nnunet_ext.evaluation import MEAN, case_metrics, evaluate_folder, parse_labels

VESSEL, NUCLEUS, IGNORE = 1, 2, 3
LABELS = {"vessel": VESSEL, "nucleus": NUCLEUS}


def case_a():
    """Three 2x2 slices along z. Only vessel voxels; the sparse label annotates slice 0 only."""
    gt = np.zeros((3, 2, 2), np.uint8)
    gt[0, 0, :] = VESSEL          # slice 0: 2 voxels
    gt[1, 0, 0] = VESSEL          # slice 1: 1 voxel
    pred = np.zeros_like(gt)
    pred[0, 0, 0] = VESSEL        # slice 0: 1 of the 2
    pred[1, 0, 0] = VESSEL        # slice 1: exact
    pred[2, 1, :] = VESSEL        # slice 2: 2 false positives
    sparse = np.full_like(gt, IGNORE)
    sparse[0] = gt[0]
    return pred, gt, sparse


def test_case_metrics_by_hand():
    pred, gt, sparse = case_a()
    metrics = case_metrics(pred, gt, LABELS, sparse=sparse, ignore_label=IGNORE, topology=False)
    vessel = metrics["vessel"]
    # |pred| = 4, |gt| = 3, overlap 2: Dice 4/7, precision 2/4, recall 2/3.
    assert vessel["dice"] == pytest.approx(4 / 7)
    assert vessel["precision"] == pytest.approx(0.5)
    assert vessel["recall"] == pytest.approx(2 / 3)
    # Slices: 2*1/(1+2) = 2/3, 1, 0 (2 false positives, empty truth).
    assert vessel["slice_dice"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    # Annotated = slice 0: 2/3. Unannotated = slices 1-2: pred 3, gt 1, overlap 1 -> 2/4.
    assert vessel["dice_annotated"] == pytest.approx(2 / 3)
    assert vessel["dice_unannotated"] == pytest.approx(0.5)
    assert vessel["dice_by_distance"] == pytest.approx({0: 2 / 3, 1: 1.0, 2: 0.0})
    # Nucleus is absent from both: no evidence, NaN everywhere, and the class mean is the vessel's.
    assert math.isnan(metrics["nucleus"]["dice"]) and math.isnan(metrics["nucleus"]["slice_dice"])
    assert metrics[MEAN]["dice"] == pytest.approx(4 / 7)
    assert metrics[MEAN]["dice_by_distance"] == pytest.approx({0: 2 / 3, 1: 1.0, 2: 0.0})


def ring(shape=(3, 7, 7)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[1, 1:6, 1:6] = True
    mask[1, 2:5, 2:5] = False
    return mask


def test_topology_of_a_ring_against_a_disc():
    gt = ring().astype(np.uint8)
    pred = gt.copy()
    pred[1, 2:5, 2:5] = VESSEL  # the hole filled: same component count, one loop fewer
    metrics = case_metrics(pred, gt, {"vessel": VESSEL})["vessel"]
    assert metrics["betti0_error"] == 0 and metrics["betti1_error"] == 1
    perfect = case_metrics(gt, gt, {"vessel": VESSEL})["vessel"]
    assert perfect["cldice"] == pytest.approx(1.0) and perfect["betti1_error"] == 0


def write_nifti(array: np.ndarray, path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


@pytest.fixture
def folders(tmp_path):
    """gt/ (with dataset.json beside it), pred/, sparse/ (ignore 3), mask/ for two cases."""
    dataset = tmp_path / "Dataset001_Eval"
    names = ("labelsTs", "pred", "labelsTr", "mask")
    gt_dir, pred_dir, sparse_dir, mask_dir = (dataset / n for n in names)
    for folder in (gt_dir, pred_dir, sparse_dir, mask_dir):
        folder.mkdir(parents=True)
    (dataset / "dataset.json").write_text(json.dumps(
        {"labels": {"background": 0, **LABELS, "ignore": IGNORE}, "file_ending": ".nii.gz"}))
    pred, gt, sparse = case_a()
    mask = np.zeros_like(gt)
    mask[1] = 1  # only slice 1, where the prediction is exact
    # Case b: a perfect nucleus prediction, annotated on slice 1.
    gt_b = np.zeros((3, 2, 2), np.uint8)
    gt_b[:, 1, 1] = NUCLEUS
    sparse_b = np.full_like(gt_b, IGNORE)
    sparse_b[1] = gt_b[1]
    for case, (p, g, s, m) in {"a": (pred, gt, sparse, mask), "b": (gt_b, gt_b, sparse_b, mask)}.items():
        for folder, array in zip((pred_dir, gt_dir, sparse_dir, mask_dir), (p, g, s, m)):
            write_nifti(array, folder / f"{case}.nii.gz")
    return gt_dir, pred_dir, sparse_dir, mask_dir


def test_evaluate_folder_aggregates_over_cases(folders):
    gt_dir, pred_dir, sparse_dir, mask_dir = folders
    results = evaluate_folder(pred_dir, gt_dir, mask_dir=mask_dir, annotated_dir=sparse_dir)
    assert results["settings"]["labels"] == LABELS and results["settings"]["ignore_label"] == IGNORE
    assert set(results["cases"]) == {"a", "b"}
    aggregate = results["aggregate"]
    # Vessel only occurs in case a; nucleus only in case b (perfect).
    assert aggregate["vessel"]["dice"] == pytest.approx(4 / 7)
    assert aggregate["nucleus"]["dice"] == pytest.approx(1.0)
    # Per-case class means (4/7 and 1) averaged over the cases.
    assert aggregate[MEAN]["dice"] == pytest.approx((4 / 7 + 1) / 2)
    # Inside the mask (slice 1) case a's vessel is exact.
    assert aggregate["vessel"]["dice_mask"] == pytest.approx(1.0)
    # Case b is annotated on slice 1: its slices 0 and 2 are 1 away; case a's distances are 0, 1, 2.
    assert aggregate[MEAN]["dice_by_distance"] == pytest.approx({0: (2 / 3 + 1) / 2, 1: 1.0, 2: 0.0})


def test_the_cli_writes_json_csv_and_prints_the_table(folders, capsys):
    from nnunet_ext.cli import main

    gt_dir, pred_dir, sparse_dir, _ = folders
    out = gt_dir.parent / "scores"
    assert main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--annotated", str(sparse_dir),
                 "--no-topology", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:3] == ["class", "dice", "slice_dice"]
    assert [line.split()[0] for line in printed[1:4]] == ["vessel", "nucleus", MEAN]
    assert "0: 0.833" in printed[4]  # Dice at distance 0: (2/3 + 1) / 2
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["cases"]["a"]["nucleus"]["dice"] is None  # NaN is written as null
    assert saved["aggregate"][MEAN]["dice_by_distance"]["2"] == pytest.approx(0.0)
    with open(out / "evaluation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["class"]) for r in rows][:3] == [("a", "vessel"), ("a", "nucleus"), ("a", MEAN)]
    vessel_a = rows[0]
    assert float(vessel_a["dice"]) == pytest.approx(4 / 7, abs=1e-5)
    assert float(vessel_a["dice_distance_2"]) == 0.0 and rows[1]["dice"] == ""
    assert rows[-1]["case"] == MEAN and rows[-1]["class"] == MEAN


def test_results_that_fail_to_render_leave_the_previous_files_whole(folders, monkeypatch):
    from nnunet_ext import evaluation

    gt_dir, pred_dir, _, _ = folders
    out = gt_dir.parent / "scores_failing"
    results = evaluate_folder(pred_dir, gt_dir)
    evaluation.write_results(results, out)
    before = {name: (out / name).read_bytes() for name in ("evaluation.json", "evaluation.csv")}

    def broken(metrics):
        raise ValueError("cannot flatten")

    monkeypatch.setattr(evaluation, "_flatten", broken)
    with pytest.raises(ValueError, match="cannot flatten"):
        evaluation.write_results({**results, "settings": {"changed": True}}, out)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.csv", "evaluation.json"]  # no partial file


def test_mask_ignore_counts_the_annotated_voxels_of_a_sparse_folder(folders):
    gt_dir, pred_dir, sparse_dir, _ = folders
    results = evaluate_folder(pred_dir, gt_dir, mask_dir=sparse_dir, mask_ignore=IGNORE, topology=False)
    # Case a's annotated voxels are slice 0: Dice 2/3 there.
    assert results["cases"]["a"]["vessel"]["dice_mask"] == pytest.approx(2 / 3)


def test_parse_labels():
    assert parse_labels(["vessel=1", "2"]) == {"vessel": 1, "2": 2}
    with pytest.raises(UserError, match="NAME=VALUE"):
        parse_labels(["vessel=one"])


def test_bad_input_is_one_error_line(folders, tmp_path):
    gt_dir, pred_dir, _, _ = folders
    (pred_dir / "b.nii.gz").unlink()
    result = cli("nnunet-ext", "evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), env=dict(os.environ), check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no prediction file for case b" in lines[0]
    assert not (pred_dir / "evaluation.json").exists()

    write_nifti(np.zeros((2, 2, 2), np.uint8), pred_dir / "b.nii.gz")
    with pytest.raises(UserError, match=r"shape \(2, 2, 2\).*predict the same images"):
        evaluate_folder(pred_dir, gt_dir)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    write_nifti(np.zeros((2, 2, 2), np.uint8), lonely / "x.nii.gz")
    with pytest.raises(UserError, match="pass --labels"):
        evaluate_folder(lonely, lonely)
