"""``nnunet-ext benchmark``: sparsity levels, statistics, resumable orchestration, the data recipes (the run through
nnU-Net is in test_benchmark_dense)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import nnunet_ext.benchmarking.accuracy as benchmark
from nnunet_ext.benchmarking.accuracy import (
    BenchmarkFolder,
    BenchmarkSettings,
    mean_std,
    paired_difference,
    run_benchmark,
)
from nnunet_ext.benchmarking.recipes import Sparsity, vesselnn_pairs, write_dense
from nnunet_ext.errors import UserError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize("text, every, n_slices, label", [
    ("every:4", 4, None, "every4"), ("4", 4, None, "every4"), ("slices:3", None, 3, "slices3")])
def test_sparsity_levels(text, every, n_slices, label):
    level = Sparsity.parse(text)
    assert (level.every, level.n_slices, level.label) == (every, n_slices, label)


@pytest.mark.parametrize("text", ["every:0", "slices:-1", "half", "every:two"])
def test_bad_sparsity_levels(text):
    with pytest.raises(UserError, match="every:K"):
        Sparsity.parse(text)


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)  # sample std: sqrt((1 + 0 + 1) / 2)
    mean, std, n = mean_std([float("nan"), 0.5])
    assert (mean, n) == (0.5, 1) and math.isnan(std)


def result(trainer, seed, test_cases, sparsity="every4"):
    return {"trainer": trainer, "seed": seed, "sparsity": sparsity, "test": {"cases": test_cases},
            "train": {"cases": {}}}


def test_paired_difference_pairs_the_same_seed_and_case():
    results = [result("nnUNetTrainer", 0, {"a": 0.5, "b": 0.6}), result("nnUNetTrainer", 1, {"a": 0.7}),
               result("Ours", 0, {"a": 0.6, "b": 0.5}), result("Ours", 1, {"a": 0.9, "c": 0.1}),
               result("Ours", 0, {"a": 0.0}, sparsity="every8")]
    d = paired_difference(results, "Ours", "every4", "test")
    # Pairs (0, a) +0.1, (0, b) -0.1, (1, a) +0.2; case c has no stock partner, every8 is another level.
    assert d["n"] == 3 and d["wins"] == 2
    assert d["mean"] == pytest.approx(0.2 / 3)
    # Deviations 1/30, -1/6, 2/15: squares sum to 0.04667, / 2 -> std 0.1528.
    assert d["std"] == pytest.approx(math.sqrt((1 / 900 + 1 / 36 + 4 / 225) / 2))
    assert math.isnan(d["p"])  # fewer than 6 pairs
    assert d["seeds"] == 2 and math.isnan(d["seed_p"])  # fewer than 3 seeds


def test_paired_difference_tests_the_seeds_mean_differences():
    results = [result("nnUNetTrainer", 0, {"a": 0.5}), result("Ours", 0, {"a": 0.51}),
               result("nnUNetTrainer", 1, {"a": 0.5, "b": 0.5}), result("Ours", 1, {"a": 0.52, "b": 0.52}),
               result("nnUNetTrainer", 2, {"a": 0.5}), result("Ours", 2, {"a": 0.53})]
    d = paired_difference(results, "Ours", "every4", "test")
    assert d["seeds"] == 3 and d["n"] == 4
    # Seed means 0.01, 0.02, 0.03 (seed 1's two cases count once): mean 0.02, std 0.01, t = 0.02 / (0.01 / sqrt 3)
    # = 2 sqrt 3 on 2 degrees of freedom, whose two-sided p is 1 - t / sqrt(t^2 + 2) = 1 - sqrt(12 / 14) = 0.0742.
    assert d["seed_p"] == pytest.approx(1 - math.sqrt(12 / 14))
    # Over the 4 pairs: mean 0.02, deviations -0.01, 0, 0, +0.01 -> std sqrt(0.0002 / 3) = 0.008.
    assert benchmark.fmt_paired(d) == "+0.020 ± 0.008 (wins 4/4; 3 seeds p=0.074)"


@pytest.mark.parametrize("arguments, message", [
    (dict(recipe="mri"), "unknown recipe"),
    (dict(recipe="vesselnn"), "pass --data"),
    (dict(seeds=[0, 0]), "distinct"),
    (dict(epochs=0), "--epochs"),
    (dict(trainers=["NoSuchTrainer"]), "'NoSuchTrainer' not found"),
    (dict(sparsities=["every:0"]), "invalid sparsity"),
])
def test_bad_settings(arguments, message):
    with pytest.raises(UserError, match=message):
        BenchmarkSettings(**arguments)


def test_stock_comes_first_and_only_once():
    settings = BenchmarkSettings(trainers=["MeanTeacherTrainer", "nnUNetTrainer", "MeanTeacherTrainer"])
    assert settings.trainers == ["nnUNetTrainer", "nnUNetTrainer@2d", "MeanTeacherTrainer"]  # stock 2d: a reference
    assert settings.sparsities == ["every:4", "every:8"]  # the synth recipe's levels
    assert BenchmarkSettings(trainers=["MeanTeacherTrainer"], reference_2d=False).trainers == \
        ["nnUNetTrainer", "MeanTeacherTrainer"]


@pytest.mark.parametrize("text, trainer, configuration, plans, canonical", [
    ("MeanTeacherTrainer", "MeanTeacherTrainer", "3d_fullres", "", "MeanTeacherTrainer"),
    ("MeanTeacherTrainer@3d_fullres", "MeanTeacherTrainer", "3d_fullres", "", "MeanTeacherTrainer"),
    ("MeanTeacherTrainer@attention", "MeanTeacherTrainer", "3d_fullres", "attention", "MeanTeacherTrainer@attention"),
    ("MeanTeacherTrainer@2d@attention", "MeanTeacherTrainer", "2d", "attention", "MeanTeacherTrainer@2d@attention"),
    ("MeanTeacherTrainer@nnUNetPlans", "MeanTeacherTrainer", "3d_fullres", "nnUNetPlans",
     "MeanTeacherTrainer@nnUNetPlans"),
    ("MeanTeacherTrainer@nnUNetPlans_tiny", "MeanTeacherTrainer", "3d_fullres", "", "MeanTeacherTrainer"),  # base
    ("MeanTeacherTrainer@@mine", "MeanTeacherTrainer", "3d_fullres", "mine", "MeanTeacherTrainer@@mine"),
    ("nnUNetTrainer@2d+3d_fullres", "nnUNetTrainer", "2d+3d_fullres", "", "nnUNetTrainer@2d+3d_fullres"),
    ("nnUNetTrainer@2d+3d_fullres@attention", "nnUNetTrainer", "2d+3d_fullres", "attention",
     "nnUNetTrainer@2d+3d_fullres@attention"),
])
def test_arms_name_a_trainer_configuration_and_plans(text, trainer, configuration, plans, canonical):
    settings = BenchmarkSettings(trainers=[])
    arm = settings.parse_arm(text)
    assert (arm.trainer, arm.configuration, arm.plans) == (trainer, configuration, plans)
    assert settings.arm_name(arm) == canonical
    assert settings.parse_arm(canonical) == arm


@pytest.mark.parametrize("text", ["nnUNetTrainer@", "@2d", "nnUNetTrainer@3d@x", "nnUNetTrainer@2d@x@y",
                                  "nnUNetTrainer@2d@", "nnUNetTrainer@2d+", "nnUNetTrainer@2d+3d", "nnUNetTrainer@2d+2d"])
def test_bad_arms(text):
    with pytest.raises(UserError, match="invalid trainer"):
        BenchmarkSettings(trainers=[text])


def test_the_attention_ablation_is_one_command_with_stock_on_both_plans():
    settings = BenchmarkSettings(trainers=["MeanTeacherTrainer", "MeanTeacherContinuityTrainer",
                                           "MeanTeacherTrainer@attention", "MeanTeacherContinuityTrainer@attention"])
    assert settings.trainers == ["nnUNetTrainer", "nnUNetTrainer@2d", "MeanTeacherTrainer",
                                 "MeanTeacherContinuityTrainer", "nnUNetTrainer@attention",
                                 "MeanTeacherTrainer@attention", "MeanTeacherContinuityTrainer@attention"]
    assert settings.derived_plans == ["attention"]
    assert settings.arm_plans("MeanTeacherTrainer@attention") == "nnUNetPlans_tiny_axialattn"
    assert settings.arm_plans("nnUNetTrainer@2d") == "nnUNetPlans_tiny"
    # Each arm is paired with stock on its own plans; stock on the attention plans with stock on the base plans.
    assert settings.reference_of("MeanTeacherContinuityTrainer@attention") == "nnUNetTrainer@attention"
    assert settings.reference_of("MeanTeacherContinuityTrainer") == "nnUNetTrainer"
    assert settings.reference_of("nnUNetTrainer@attention") == "nnUNetTrainer"
    assert settings.reference_of("nnUNetTrainer@2d") == "nnUNetTrainer"
    assert settings.reference_of("nnUNetTrainer") is None


def test_a_pseudo_label_trainer_brings_the_2d_arm_it_learns_from():
    settings = BenchmarkSettings(trainers=["PseudoLabelWeightedTrainer", "MeanTeacherTrainer"])
    assert settings.trainers == ["nnUNetTrainer", "nnUNetTrainer@2d", "PseudoLabelWeightedTrainer",
                                 "MeanTeacherTrainer"]
    assert settings.configurations == ["3d_fullres", "2d"]
    assert settings.split_arm("nnUNetTrainer@2d") == ("nnUNetTrainer", "2d")
    assert settings.bench_name("nnUNetTrainer@2d", 50) == settings.bench_name("nnUNetTrainer", 50) == \
        f"nnUNetTrainer_bench50x{settings.iterations}"
    on_attention = BenchmarkSettings(trainers=["PseudoLabelWeightedTrainer@attention"], reference_2d=False)
    assert on_attention.trainers == ["nnUNetTrainer", "nnUNetTrainer@attention", "nnUNetTrainer@2d@attention",
                                     "PseudoLabelWeightedTrainer@attention"]


def test_the_self_training_trainer_learns_from_stock_3d_fullres_only():
    settings = BenchmarkSettings(trainers=["PseudoLabelSelfTrainingTrainer"], reference_2d=False)
    assert settings.trainers == ["nnUNetTrainer", "PseudoLabelSelfTrainingTrainer"]
    assert settings.configurations == ["3d_fullres"]


def test_an_ensemble_arm_brings_its_members_and_is_paired_with_stock():
    settings = BenchmarkSettings(trainers=["nnUNetTrainer@3d_fullres+2d", "MeanTeacherTrainer@2d+3d_fullres"],
                                 reference_2d=False)
    assert settings.trainers == ["nnUNetTrainer", "nnUNetTrainer@2d", "nnUNetTrainer@3d_fullres+2d",
                                 "MeanTeacherTrainer@2d", "MeanTeacherTrainer", "MeanTeacherTrainer@2d+3d_fullres"]
    assert settings.configurations == ["3d_fullres", "2d"]  # what nnUNetv2_plan_and_preprocess is asked for
    assert settings.ensemble_members("MeanTeacherTrainer@2d+3d_fullres") == ["MeanTeacherTrainer@2d",
                                                                              "MeanTeacherTrainer"]
    assert settings.ensemble_members("nnUNetTrainer@2d") == []
    assert settings.reference_of("nnUNetTrainer@3d_fullres+2d") == "nnUNetTrainer"
    assert settings.reference_of("MeanTeacherTrainer@2d+3d_fullres") == "nnUNetTrainer"


def test_an_arm_on_another_configuration_is_paired_with_stock_on_that_configuration():
    # --no-2d leaves stock 2d out as a reference, but a 2d arm of ours still needs it to be paired with.
    settings = BenchmarkSettings(trainers=["MeanTeacherTrainer@2d", "MeanTeacherTrainer@2d@attention"],
                                 reference_2d=False)
    assert settings.trainers == ["nnUNetTrainer", "nnUNetTrainer@2d", "MeanTeacherTrainer@2d",
                                 "nnUNetTrainer@attention", "nnUNetTrainer@2d@attention",
                                 "MeanTeacherTrainer@2d@attention"]
    assert settings.reference_of("MeanTeacherTrainer@2d") == "nnUNetTrainer@2d"
    assert settings.reference_of("MeanTeacherTrainer@2d@attention") == "nnUNetTrainer@2d@attention"
    # Stock on another configuration stays paired with stock on the benchmark's own: what the configuration changes.
    assert settings.reference_of("nnUNetTrainer@2d@attention") == "nnUNetTrainer@attention"


def test_the_ensemble_trainer_brings_both_stock_arms_it_learns_from():
    settings = BenchmarkSettings(trainers=["PseudoLabelEnsembleTrainer"], reference_2d=False)
    assert settings.trainers == ["nnUNetTrainer", "nnUNetTrainer@2d", "PseudoLabelEnsembleTrainer"]
    assert settings.configurations == ["3d_fullres", "2d"]


def test_the_folder_refuses_other_settings_and_foreign_folders(tmp_path):
    BenchmarkFolder(tmp_path / "bench", BenchmarkSettings(epochs=5))
    BenchmarkFolder(tmp_path / "bench", BenchmarkSettings(epochs=5, seeds=[0, 1, 2, 3]))  # more seeds: resumable
    with pytest.raises(UserError, match="epochs: 5 there, 6 now"):
        BenchmarkFolder(tmp_path / "bench", BenchmarkSettings(epochs=6))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not a benchmark folder"):
        BenchmarkFolder(tmp_path / "mine", BenchmarkSettings())
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def fake_result(trainer, sparsity, seed, dice):
    aggregate = {"mean": {"dice": dice, "slice_dice": dice, "cldice": dice, "dice_unannotated": dice,
                          "dice_annotated": 1.0, "dice_by_distance": {"0": 1.0, "1": dice}}}
    return {"trainer": trainer, "sparsity": sparsity.label, "seed": seed, "dataset": "Dataset100_X",
            "minutes": 0.5, "test": {"aggregate": aggregate, "cases": {"t0": dice}},
            "train": {"aggregate": aggregate, "cases": {"c0": dice}}}


def test_runs_are_resumed_and_a_failing_run_does_not_stop_the_others(tmp_path, monkeypatch):
    calls = []

    def fake_run(folder, raw, sparsity, seed, trainer):
        calls.append((trainer, sparsity.label, seed))
        if trainer == "MeanTeacherTrainer" and seed == 1:
            raise RuntimeError("out of memory")
        r = fake_result(trainer, sparsity, seed, 0.5 if trainer == "nnUNetTrainer" else 0.6)
        benchmark._write_json(folder.run_folder(sparsity, seed, trainer) / "result.json", r)
        return r

    monkeypatch.setattr(benchmark, "prepare_dataset", lambda folder, sparsity, seed: tmp_path / "raw")
    monkeypatch.setattr(benchmark, "run_one", fake_run)
    settings = BenchmarkSettings(trainers=["MeanTeacherTrainer"], sparsities=["every:4"], seeds=[0, 1],
                                 reference_2d=False)
    summary = run_benchmark(tmp_path / "bench", settings)
    assert len(calls) == 4
    assert [(f["trainer"], f["seed"]) for f in summary["failures"]] == [("MeanTeacherTrainer", 1)]
    assert len(summary["rows"]) == 3
    markdown = (tmp_path / "bench" / "results.md").read_text()
    assert "| nnUNetTrainer | 2 | 0.500 ± 0.000 |" in markdown
    assert "| MeanTeacherTrainer | 1 | 0.600 |" in markdown
    assert "| `nnUNetTrainer` | +0.100 ± n/a (wins 1/1)" in markdown  # the one (seed 0, t0) pair
    assert "MeanTeacherTrainer every4 seed 1: the run failed: out of memory" in markdown
    assert (tmp_path / "bench" / "dice_vs_sparsity.png").is_file()
    assert (tmp_path / "bench" / "dice_vs_distance.png").is_file()

    calls.clear()
    summary = run_benchmark(tmp_path / "bench", settings)
    assert calls == [("MeanTeacherTrainer", "every4", 1)]  # only the failed run is tried again
    assert len(summary["failures"]) == 1


@pytest.mark.skipif(not (DATA / "vesselnn").is_dir(), reason="../shared/data/vesselnn is not available")
def test_seeds_sharing_a_dataset_train_into_their_own_results(tmp_path):
    folder = BenchmarkFolder(tmp_path / "bench", BenchmarkSettings(recipe="vesselnn", data=str(DATA / "vesselnn")))
    raw = folder.raw / "Dataset100_VesselnnSlices5"  # vesselnn's datasets do not depend on the seed
    folds = {seed: benchmark._fold_folder(folder, raw, "nnUNetTrainer", seed) for seed in (0, 1)}
    assert folds[0] != folds[1]  # else seed 1 would find seed 0's checkpoint_final.pth and skip training
    for seed, fold in folds.items():
        assert fold.is_relative_to(folder.seed_environment(seed)["nnUNet_results"])  # where nnU-Net writes it
    assert folder.seed_environment(0)["nnUNet_raw"] == folder.env["nnUNet_raw"]


def test_the_generated_trainers_carry_the_budget(tmp_path):
    settings = BenchmarkSettings(trainers=["MeanTeacherContinuityTrainer"], epochs=3, iterations=20)
    folder = BenchmarkFolder(tmp_path / "bench", settings)
    folder.write_trainer_module(settings.trainers)
    namespace = {"__name__": benchmark.TRAINER_MODULE}
    exec((folder.trainer_folder / f"{benchmark.TRAINER_MODULE}.py").read_text(), namespace)
    from nnunet_ext.trainers import MeanTeacherContinuityTrainer

    variant = namespace["MeanTeacherContinuityTrainer_bench3x20"]
    assert issubclass(variant, MeanTeacherContinuityTrainer) and variant.__name__ == "MeanTeacherContinuityTrainer_bench3x20"
    assert (variant.budget_epochs, variant.budget_iterations_per_epoch, variant.budget_val_iterations_per_epoch) \
        == (3, 20, 2)
    assert namespace["nnUNetTrainer_bench3x20"].budget_epochs == 3


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.skipif(not (DATA / "vesselnn").is_dir(), reason="../shared/data/vesselnn is not available")
def test_vesselnn_recipe(tmp_path):
    pairs = vesselnn_pairs(DATA / "vesselnn")
    assert len(pairs) == 9 and pairs["poon2015_BBB_Leakage"][1].name == "poon2015_BBB_Leakage_manualLabels_v2.tif"
    folder = write_dense("vesselnn", DATA / "vesselnn", tmp_path, 99, "VesselnnDense")
    document = json.loads((folder / "dataset.json").read_text())
    assert document["labels"] == {"background": 0, "vessel": 1} and document["numTraining"] == 6
    tests = sorted(p.name for p in (folder / "labelsTs").iterdir())
    # Every third case in name order is a test volume.
    assert tests == ["burgess2014_noisySparseVessels.nii.gz", "poon2015_BBB_noLeakage.nii.gz",
                     "santos2015_mixedSizelowContrastVessels.nii.gz"]
    label = sitk.ReadImage(str(folder / "labelsTr" / "burgess2014_lowerRes_hiSNR.nii.gz"))
    assert sitk.GetArrayFromImage(label).shape == (26, 80, 80)  # 320 x 320 downsampled 4x in-plane
    assert label.GetSpacing() == pytest.approx((4.0, 4.0, 5.0))  # SimpleITK's (x, y, z)
    values = np.unique(_read(folder / "labelsTs" / "santos2015_mixedSizelowContrastVessels.nii.gz"))
    assert values.tolist() == [0, 1]  # 254 in the source


@pytest.mark.skipif(not (DATA / "gala_fibsem").is_dir(), reason="../shared/data/gala_fibsem is not available")
def test_gala_recipe(tmp_path):
    folder = write_dense("gala_fibsem", DATA / "gala_fibsem", tmp_path, 98, "GalaDense")
    train = sorted((folder / "labelsTr").iterdir())
    assert [p.name for p in train] == ["gala_000.nii.gz", "gala_001.nii.gz", "gala_002.nii.gz"]
    test = _read(folder / "labelsTs" / "gala_003.nii.gz")
    assert test.shape == (50, 100, 50)
    assert 0.05 < test.mean() < 0.12  # boundaries are about 7-9 % of the voxels


@pytest.mark.integration
def test_speed_benchmark(tiny_env, tmp_path, capsys):
    from nnunet_ext.cli import main

    saved = tmp_path / "speed.json"
    assert main(["benchmark", "speed", "-d", str(tiny_env.dataset_id), "--trainers", "MeanTeacherTrainer",
                 "--repeats", "2", "--json", str(saved)]) == 0
    table = capsys.readouterr().out
    assert "nnUNetPlans_tiny / 3d_fullres" in table and "MeanTeacherTrainer" in table
    results = json.loads(saved.read_text())["trainers"]
    assert list(results) == ["nnUNetTrainer", "MeanTeacherTrainer"]
    stock, ours = results["nnUNetTrainer"], results["MeanTeacherTrainer"]
    assert stock["time_ratio"] == 1.0 and stock["memory_ratio"] == 1.0
    assert ours["seconds"] > 0 and ours["peak_bytes"] > 0
    assert ours["time_ratio"] == pytest.approx(ours["seconds"] / stock["seconds"])
    assert ours["memory_ratio"] == pytest.approx(ours["peak_bytes"] / stock["peak_bytes"])
