"""``nnunet-ext suggest``: slice scores and ranking with hand-computed values, the command's parts and its bad
input, and one run through the real CLIs (integration)."""

import csv
import json
import math

import numpy as np
import pytest
from conftest import cli, train_env

from nnunet_ext.errors import UserError
from nnunet_ext.slice_suggestion import (
    PredictionMoments,
    annotated_slices_of_label,
    mirror_flips,
    rank_slices,
    slice_scores,
)
from nnunet_ext.suggest import (
    CSV_COLUMNS,
    annotated_slices_of_case,
    case_predictions,
    check_out_folder,
    choose_score,
    model_states,
    plot_montage,
    plot_score_curve,
    slice_aspect,
    suggest_slices,
    write_csv,
)

LN2 = math.log(2)


def two_class(p1: np.ndarray) -> np.ndarray:
    """(2, *spatial) probabilities from the class-1 probability."""
    p1 = np.asarray(p1, dtype=np.float32)
    return np.stack([1 - p1, p1])


# ---- scores

def test_entropy_is_ln2_on_the_undecided_slice_and_0_on_certain_ones():
    # (Z, Y, X) = (3, 2, 2): slice 1 has p = 0.5 everywhere (entropy -2 * 0.5 ln 0.5 = ln 2), slices 0 and 2
    # p = 1 or 0 (entropy 0).
    p1 = np.zeros((3, 2, 2))
    p1[0] = 1
    p1[1] = 0.5
    assert slice_scores([two_class(p1)], "entropy", 0) == pytest.approx([0, LN2, 0], abs=1e-6)
    # Along axis 2 each slice (3 x 2 voxels) holds 2 of the 4 undecided voxels: 2 ln 2 / 6 = ln 2 / 3.
    assert slice_scores([two_class(p1)], "entropy", 2) == pytest.approx([LN2 / 3, LN2 / 3], abs=1e-6)


def test_entropy_is_of_the_mean_prediction():
    # Two confident but opposite predictions: mean (0.5, 0.5) -> entropy ln 2, though each has entropy 0.
    assert slice_scores([two_class(np.ones((2, 1, 1))), two_class(np.zeros((2, 1, 1)))], "entropy", 0) \
        == pytest.approx([LN2, LN2], abs=1e-6)


def test_disagreement_is_the_sum_over_classes_of_the_variance_across_predictions():
    # Two predictions, (Z, Y, X) = (3, 1, 2).
    a = np.array([[[1.0, 1.0]], [[0.2, 0.2]], [[0.3, 0.3]]])
    b = np.array([[[0.0, 0.0]], [[0.6, 0.2]], [[0.3, 0.3]]])
    # slice 0: class 1 values 1 and 0: mean 0.5, variance (0.25 + 0.25) / 2 = 0.25; class 0 the same: 0.5.
    # slice 1: voxel 0 has 0.2 vs 0.6: variance (0.04 + 0.04) / 2 = 0.04 per class, 0.08; voxel 1 agrees: 0;
    #          mean over the slice 0.04.
    # slice 2: agreement: 0.
    expected = [0.5, 0.04, 0]
    assert slice_scores([two_class(a), two_class(b)], "mirror", 0) == pytest.approx(expected, abs=1e-6)
    assert slice_scores([two_class(a), two_class(b)], "models", 0) == pytest.approx(expected, abs=1e-6)


def test_disagreement_of_three_predictions():
    # Class 1 values 1, 0, 0.5: mean 0.5, variance (0.25 + 0.25 + 0) / 3 = 1/6 per class, 1/3 for both.
    predictions = [two_class(np.full((1, 1, 1), v)) for v in (1.0, 0.0, 0.5)]
    assert slice_scores(predictions, "mirror", 0) == pytest.approx([1 / 3], abs=1e-6)
    moments = PredictionMoments.of(predictions)
    assert moments.count == 3 and moments.mean()[1] == pytest.approx(np.full((1, 1, 1), 0.5))


def test_disagreement_needs_several_predictions_and_scores_are_checked():
    one = two_class(np.zeros((2, 1, 1)))
    with pytest.raises(ValueError, match="several predictions"):
        slice_scores([one], "models", 0)
    with pytest.raises(ValueError, match="unknown score"):
        slice_scores([one, one], "variance", 0)
    with pytest.raises(ValueError, match="share their shape"):
        PredictionMoments.of([one, two_class(np.zeros((3, 1, 1)))])


def test_the_slice_where_the_models_disagree_ranks_first():
    # Case "a", 6 slices of 4 x 4: both models see background everywhere (class-1 probability 0.1), except
    # that one model finds a structure in 2 x 2 voxels of slice 4 (0.9 there). Per slice disagreement:
    # 0 on slices 0-3 and 5; slice 4: 4 voxels with class-1 values 0.1 and 0.9 -> variance 0.16 per class, 0.32
    # per voxel, mean over 16 voxels 0.32 * 4 / 16 = 0.08. Slice 4 ranks first; with slice 0 annotated and
    # min_gap 1, the next is the lowest 0-score slice more than 1 away from 0 and 4: slice 2 (ties: lower index).
    teacher = np.full((6, 4, 4), 0.1)
    student = teacher.copy()
    student[4, 1:3, 1:3] = 0.9
    scores = slice_scores([two_class(teacher), two_class(student)], "models", 0)
    assert scores == pytest.approx([0, 0, 0, 0, 0.08, 0], abs=1e-6)
    chosen = rank_slices({"a": scores}, {"a": [0]}, k=2, min_gap=1)
    assert [(s.case, s.index) for s in chosen] == [("a", 4), ("a", 2)]
    assert chosen[0].score == pytest.approx(0.08, abs=1e-6)


# ---- ranking

SCORES_A = [0.1, 0.9, 0.8, 0.7, 0.2, 0.6, 0.0]


@pytest.mark.parametrize("min_gap, expected", [
    # 1 (0.9) is next to annotated 0; 2 (0.8) taken; 3 next to 2; 5 (0.6) taken; 4 and 6 next to 5: only 2 of 3.
    (1, [2, 5]),
    # 0: only the annotated slice itself is excluded: the three highest, 1, 2, 3.
    (0, [1, 2, 3]),
    # 2: 1 and 2 within 2 of 0; 3 taken; 5 within 2 of 3, so is 4; 6 (0.0) is 3 away: taken.
    (2, [3, 6]),
])
def test_min_gap_keeps_suggestions_away_from_annotated_and_chosen_slices(min_gap, expected):
    chosen = rank_slices({"a": SCORES_A}, {"a": [0]}, k=3, min_gap=min_gap)
    assert [s.index for s in chosen] == expected
    assert [s.score for s in chosen] == [SCORES_A[i] for i in expected]


def test_ties_go_to_the_lower_case_then_the_lower_index_and_cases_compete():
    scores = {"b": [0.5, 0.5, 0.5], "a": [0.5, 0.5, 0.5]}
    assert [(s.case, s.index) for s in rank_slices(scores, {}, k=3, min_gap=0)] == [("a", 0), ("a", 1), ("a", 2)]
    # min_gap 1: a1 is next to a0, so b0 comes after a2.
    assert [(s.case, s.index) for s in rank_slices(scores, {}, k=3, min_gap=1)] == [("a", 0), ("a", 2), ("b", 0)]
    # The highest slice of any case first; the gap only counts within a case.
    chosen = rank_slices({"a": [0.1, 0.3], "b": [0.2, 0.4]}, {}, k=3, min_gap=1)
    assert [(s.case, s.index) for s in chosen] == [("b", 1), ("a", 1)]


def test_rank_slices_checks_its_arguments():
    with pytest.raises(ValueError, match="k must be"):
        rank_slices({"a": [1.0]}, {}, k=0)
    with pytest.raises(ValueError, match="min_gap"):
        rank_slices({"a": [1.0]}, {}, k=1, min_gap=-1)


# ---- annotated slices and mirrorings

def test_a_slice_is_annotated_when_it_holds_any_voxel_other_than_ignore():
    ignore = 3
    label = np.full((4, 2, 2), ignore)
    label[1, 0, 0] = 0  # background is an annotation too
    label[3, 1, 1] = 1
    assert annotated_slices_of_label(label, 0, ignore) == [1, 3]
    assert annotated_slices_of_label(label[None], 0, ignore) == [1, 3]  # nnU-Net's (1, *spatial)
    # Along axis 1: row 0 holds the 0 of slice 1, row 1 the 1 of slice 3.
    assert annotated_slices_of_label(label, 1, ignore) == [0, 1]
    assert annotated_slices_of_label(np.full((2, 2, 2), ignore), 0, ignore) == []


def test_mirror_flips_are_nnunets_combinations_in_raw_axes():
    assert mirror_flips((0, 1, 2), (0, 1, 2), 3) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    # A 2D configuration mirrors the last two axes of the 3D array.
    assert mirror_flips((0, 1), (0, 1, 2), 2) == [(), (1,), (2,), (1, 2)]
    # Preprocessed axis 0 is raw axis transpose_forward[0] = 2.
    assert mirror_flips((0,), (2, 0, 1), 3) == [(), (2,)]
    assert mirror_flips(None, (0, 1, 2), 3) == [()]


def test_dataset_json_slices_are_used_when_listed_else_the_label_file():
    document = {"annotation_axis": 0, "annotated_slices": {"c1": [4, 0, 4]}}

    def no_label():
        raise AssertionError("the label file must not be read")

    assert annotated_slices_of_case("c1", document, no_label, 0, 8, 3) == [0, 4]
    label = np.full((5, 2, 2), 3)
    label[2] = 0
    assert annotated_slices_of_case("c2", document, lambda: label, 0, 5, 3) == [2]
    # Without annotation_axis the list's axis is unknown: the label file decides.
    assert annotated_slices_of_case("c1", {"annotated_slices": {"c1": [0]}}, lambda: label, 0, 5, 3) == [2]
    with pytest.raises(UserError, match="lists slice 9"):
        annotated_slices_of_case("c1", {"annotation_axis": 0, "annotated_slices": {"c1": [9]}}, no_label, 0, 8, 3)


# ---- the command's parts

class FakePredictor:
    """``predict_single_npy_array`` of a model whose class-1 probability is ``ramp`` along z (whatever the image)
    or the weight ``w`` of its loaded state dict, with nnU-Net's return order (segmentation, probabilities)."""

    def __init__(self):
        self.list_of_parameters = [{"w": 0.5}]
        self.calls = []

    def predict_single_npy_array(self, image, properties, save_or_return_probabilities=False):
        assert save_or_return_probabilities
        self.calls.append(image.copy())
        spatial = image.shape[1:]
        if "ramp" in properties:
            p1 = np.broadcast_to(np.linspace(0, 1, spatial[0])[:, None, None], spatial)
        else:
            p1 = np.full(spatial, self.list_of_parameters[0]["w"])
        return None, two_class(p1)


def test_mirror_predictions_are_flipped_back_into_the_image_geometry():
    predictor = FakePredictor()
    image = np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2)
    predictions = list(case_predictions(predictor, image, {"ramp": True}, "mirror", None, [(), (0,)]))
    # The second call saw the image flipped along z.
    assert np.array_equal(predictor.calls[1], image[:, ::-1])
    # The model predicts the class-1 ramp (0, 0.5, 1) along z whatever it sees, so flipped back the second
    # prediction is (1, 0.5, 0): slices 0 and 2 disagree by 0 vs 1 (variance 0.25 per class, 0.5), slice 1 agrees.
    assert predictions[1][1][:, 0, 0] == pytest.approx([1, 0.5, 0])
    assert slice_scores(predictions, "mirror", 0) == pytest.approx([0.5, 0, 0.5], abs=1e-6)


def test_models_load_each_state_dict_in_turn():
    predictor = FakePredictor()
    image = np.zeros((1, 2, 1, 1), dtype=np.float32)
    states = {"teacher": {"w": 0.2}, "student": {"w": 0.6}}
    predictions = list(case_predictions(predictor, image, {}, "models", states, [()]))
    assert [p[1].max() for p in predictions] == pytest.approx([0.2, 0.6])
    # Class-1 values 0.2 and 0.6: variance 0.04 per class, 0.08.
    assert slice_scores(predictions, "models", 0) == pytest.approx([0.08, 0.08], abs=1e-6)


def test_model_states_of_mean_teacher_cps_and_stock_checkpoints():
    teacher, student, a, b = ({"k": i} for i in range(4))
    assert model_states({"network_weights": teacher, "student_weights": student}) == {"teacher": teacher,
                                                                                      "student": student}
    assert model_states({"network_weights": a, "cps_branch_weights": {"a": a, "b": b}}) == {"branch a": a,
                                                                                           "branch b": b}
    assert model_states({"network_weights": teacher}) is None


def test_score_defaults_to_models_for_two_networks_and_refuses_models_for_one():
    assert choose_score(None, True, "MeanTeacherTrainer") == "models"
    assert choose_score(None, False, "nnUNetTrainer") == "entropy"
    assert choose_score("mirror", True, "MeanTeacherTrainer") == "mirror"
    with pytest.raises(UserError, match="--score entropy or --score mirror"):
        choose_score("models", False, "nnUNetTrainer")


def test_out_folder_may_be_new_empty_or_an_older_suggestions_folder(tmp_path):
    assert check_out_folder(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_out_folder(tmp_path / "empty")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "suggestions.csv").write_text("")
    check_out_folder(tmp_path / "old")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.tex").write_text("")
    with pytest.raises(UserError, match="not a suggestions folder"):
        check_out_folder(tmp_path / "other")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a suggestions folder"):
        check_out_folder(tmp_path / "file")


def test_outputs(tmp_path):
    chosen = rank_slices({"c1": [0.0, 0.5, 0.1]}, {"c1": [0]}, k=1, min_gap=0)
    write_csv(tmp_path / "s.csv", chosen, 0, "entropy")
    with open(tmp_path / "s.csv") as f:
        rows = list(csv.reader(f))
    assert rows == [list(CSV_COLUMNS), ["1", "c1", "0", "1", "0.5", "entropy"]]
    # Slices along axis 1 of spacing (4, 1, 0.5): rows are z (4), columns x (0.5).
    assert slice_aspect((4.0, 1.0, 0.5), 1) == 8.0
    image, label = np.zeros((4, 4)), np.eye(4, dtype=np.uint8)
    plot_montage(tmp_path / "m.png", [("c1 slice 1", image, label, 1.0)] * 5)
    plot_score_curve(tmp_path / "c.png", "c1", np.array([0.0, 0.5, 0.1]), [0], [1], "entropy", 0)
    assert (tmp_path / "m.png").stat().st_size > 0 and (tmp_path / "c.png").stat().st_size > 0


# ---- bad input: one UserError, nothing written

@pytest.fixture
def raw_dataset(tmp_path, monkeypatch):
    """$nnUNet_raw/Dataset042_Tiny with one (empty) training image and the ignore label; no trained model."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    folder = tmp_path / "nnUNet_raw" / "Dataset042_Tiny"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "imagesTr" / "c1_0000.nii.gz").write_bytes(b"")
    document = {"channel_names": {"0": "x"}, "labels": {"background": 0, "cell": 1, "ignore": 2},
                "numTraining": 1, "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(document))
    monkeypatch.chdir(tmp_path)
    return folder


@pytest.mark.parametrize("change, kwargs, message", [
    (None, {"n": 0}, "-n 0: give the number of slices"),
    (None, {"min_gap": -1}, "--min-gap -1"),
    (None, {"dataset": 43}, "dataset 43 not found in nnUNet_raw"),
    (None, {"cases": ["c9"]}, "case c9 is not a training case of Dataset042_Tiny: choose --cases from c1"),
    ("no ignore", {}, "no ignore label"),
    (None, {}, "no trained model at .*nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth: train it"),
])
def test_bad_input_is_one_user_error_and_writes_nothing(raw_dataset, change, kwargs, message):
    if change == "no ignore":
        document = json.loads((raw_dataset / "dataset.json").read_text())
        del document["labels"]["ignore"]
        (raw_dataset / "dataset.json").write_text(json.dumps(document))
    arguments = {"dataset": 42, "configuration": "3d_fullres", "trainer": "nnUNetTrainer", "n": 2, **kwargs}
    with pytest.raises(UserError, match=message):
        suggest_slices(**arguments)
    assert not list(raw_dataset.parents[1].glob("*suggestions*"))


# ---- the real predictor, in process, on a hand-built untrained model (no training, a few seconds)

SHAPE = (8, 16, 16)  # (z, y, x); spacing (2, 1, 1) as the plans': nnU-Net neither resamples nor crops


def hand_built_plans() -> dict:
    n = 2
    architecture = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * n, "strides": [[1, 1, 1], [2, 2, 2]], "n_conv_per_stage": [1] * n,
            "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    resampling = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": "Dataset042_Tiny", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.0, 1.0, 1.0], "original_median_shape_after_transp": list(SHAPE),
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {"max": 1.0, "mean": 0.5, "median": 0.5, "min": 0.0,
                                                              "percentile_00_5": 0.0, "percentile_99_5": 1.0,
                                                              "std": 0.2}},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": list(SHAPE), "median_image_size_in_voxels": list(SHAPE),
            "spacing": [2.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {**resampling, "order": 3},
            "resampling_fn_seg_kwargs": {**resampling, "is_seg": True},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": resampling, "architecture": architecture, "batch_dice": False,
        }},
    }


@pytest.fixture
def hand_built(raw_dataset, monkeypatch):
    """Two cases of SHAPE in raw_dataset: dataset.json lists c1's annotated slices (0, 4), c2's (6) are only in
    its label file. ``model(trainer, student=False)`` writes an untrained model folder for ``trainer``."""
    import SimpleITK as sitk
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnunet_ext.nnunet_paths import EXT_TRAINER_VAR, ext_trainer_value

    monkeypatch.setenv(EXT_TRAINER_VAR, ext_trainer_value(None))
    monkeypatch.setenv("nnUNet_compile", "false")
    rng = np.random.default_rng(0)
    document = json.loads((raw_dataset / "dataset.json").read_text())
    document.update(numTraining=2, annotation_axis=0, annotated_slices={"c1": [0, 4]})
    (raw_dataset / "dataset.json").write_text(json.dumps(document))
    (raw_dataset / "labelsTr").mkdir()
    for case, annotated in (("c1", [0, 4]), ("c2", [6])):
        label = np.full(SHAPE, 2, dtype=np.uint8)
        label[annotated] = 0
        for array, path in ((rng.random(SHAPE, dtype=np.float32), f"imagesTr/{case}_0000.nii.gz"),
                            (label, f"labelsTr/{case}.nii.gz")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((1.0, 1.0, 2.0))  # (x, y, z)
            sitk.WriteImage(image, str(raw_dataset / path))

    def model(trainer: str, student: bool = False):
        plans = hand_built_plans()
        folder = raw_dataset.parents[1] / "nnUNet_results" / raw_dataset.name / f"{trainer}__nnUNetPlans__3d_fullres"
        (folder / "fold_0").mkdir(parents=True)
        (folder / "plans.json").write_text(json.dumps(plans))
        (folder / "dataset.json").write_text(json.dumps(document))
        arch = plans["configurations"]["3d_fullres"]["architecture"]
        torch.manual_seed(0)
        network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                         arch["_kw_requires_import"], 1, 2, deep_supervision=False)
        checkpoint = {"network_weights": network.state_dict(), "trainer_name": trainer,
                      "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2)}
        if student:
            checkpoint["student_weights"] = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v
                                             for k, v in network.state_dict().items()}
        torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")

    return model


def test_stock_model_through_nnunets_predictor(hand_built, raw_dataset, tmp_path):
    hand_built("nnUNetTrainer")
    lines = []
    folder, score, chosen = suggest_slices(42, "3d_fullres", "nnUNetTrainer", 3, min_gap=1, device="cpu",
                                           progress=lines.append)
    assert folder.resolve() == tmp_path / "suggestions_Dataset042_Tiny" and score == "entropy" and len(chosen) == 3
    assert "annotation axis 0 (dataset.json annotation_axis=0" in lines[0]
    # c1: dataset.json's 0 and 4; c2: its label file's 6; nothing within 1 of them or of each other.
    annotated = {"c1": [0, 4], "c2": [6]}
    for s in chosen:
        assert all(abs(s.index - j) > 1 for j in annotated[s.case])
        assert all(abs(s.index - o.index) > 1 for o in chosen if o.case == s.case and o is not s)
    assert "[2/2] c2: 8 slices, 1 annotated" in lines[2]
    rows = read_suggestions(folder)
    assert [(r["case"], int(r["slice"])) for r in rows] == [(s.case, s.index) for s in chosen]
    assert sorted(p.name for p in folder.iterdir()) == ["montage.png", "scores_c1.png", "scores_c2.png",
                                                        "suggestions.csv"]

    # mirror: 8 mirrorings of each case; a new run replaces the folder.
    _, score, mirrored = suggest_slices(42, "3d_fullres", "nnUNetTrainer", 2, score="mirror", device="cpu",
                                        progress=lines.append)
    assert score == "mirror" and len(mirrored) == 2 and all(s.score >= 0 for s in mirrored)
    assert {r["score_name"] for r in read_suggestions(folder)} == {"mirror"}
    with pytest.raises(UserError, match="--score models needs a checkpoint with two networks"):
        suggest_slices(42, "3d_fullres", "nnUNetTrainer", 2, score="models", device="cpu", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_mean_teacher_model_defaults_to_the_disagreement_of_teacher_and_student(hand_built, tmp_path):
    hand_built("MeanTeacherTrainer", student=True)
    folder, score, chosen = suggest_slices(42, "3d_fullres", "MeanTeacherTrainer", 2, cases=["c2"], device="cpu",
                                           out=tmp_path / "mt", progress=lambda line: None)
    assert score == "models" and [s.case for s in chosen] == ["c2", "c2"]
    assert all(s.score > 0 for s in chosen)  # the perturbed student disagrees with the teacher
    assert sorted(p.name for p in folder.iterdir()) == ["montage.png", "scores_c2.png", "suggestions.csv"]


# ---- through the real CLIs

def read_suggestions(folder):
    with open(folder / "suggestions.csv") as f:
        return list(csv.DictReader(f))


def check_suggestions(folder, tiny_dataset, k: int, min_gap: int, score: str, cases: list[str]):
    """K rows of the named score, none annotated or within min_gap of an annotated or another suggested slice."""
    document = json.loads((tiny_dataset.raw / "dataset.json").read_text())
    annotated = document["annotated_slices"]
    rows = read_suggestions(folder)
    assert len(rows) == k
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert {row["score_name"] for row in rows} == {score}
    assert [int(row["rank"]) for row in rows] == list(range(1, k + 1))
    scores = [float(row["score"]) for row in rows]
    assert scores == sorted(scores, reverse=True) and min(scores) >= 0
    for row in rows:
        case, index = row["case"], int(row["slice"])
        assert case in cases and row["axis"] == str(document["annotation_axis"])
        others = [int(r["slice"]) for r in rows if r["case"] == case and r is not row]
        assert all(abs(index - j) > min_gap for j in [*annotated[case], *others])
    assert (folder / "montage.png").is_file()
    assert sorted(p.name for p in folder.glob("scores_*.png")) == sorted(f"scores_{c}.png" for c in cases)
    assert not list(folder.parent.glob(f".{folder.name}.tmp-*"))


@pytest.mark.integration
def test_suggest_with_a_stock_model_through_the_real_clis(tiny_dataset, trained_stock):
    trainer = trained_stock.trainer
    env, ds = train_env(tiny_dataset.env), str(tiny_dataset.dataset_id)
    cases = sorted(json.loads((tiny_dataset.raw / "dataset.json").read_text())["annotated_slices"])[:2]
    base = ["nnunet-ext", "suggest", "-d", ds, "-c", "3d_fullres", "-tr", trainer, "-p", "nnUNetPlans_tiny",
            "-device", "cpu", "--cases", *cases]

    out = tiny_dataset.root / "suggestions_stock"
    run = cli(*base, "-n", "3", "--out", str(out), "--disable-tta", env=env)  # stock: entropy by default
    check_suggestions(out, tiny_dataset, 3, 1, "entropy", cases)
    assert f"wrote 3 suggestions to {out}" in run.stdout

    mirrored = tiny_dataset.root / "suggestions_mirror"
    cli(*base, "-n", "2", "--min-gap", "2", "--score", "mirror", "--out", str(mirrored), env=env)
    check_suggestions(mirrored, tiny_dataset, 2, 2, "mirror", cases)

    refused = cli(*base, "-n", "2", "--score", "models", "--out", str(tiny_dataset.root / "refused"), env=env,
                  check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("nnunet-ext: error: --score models needs a checkpoint")
    assert not (tiny_dataset.root / "refused").exists()


@pytest.mark.integration
def test_suggest_with_a_mean_teacher_model_through_the_real_clis(tiny_dataset):
    trainer = "MeanTeacherTrainer_exttest_noval"
    env, ds = train_env(tiny_dataset.env), str(tiny_dataset.dataset_id)
    cli("nnUNetv2_train", ds, "3d_fullres", "0", "-tr", trainer, "-p", "nnUNetPlans_tiny", "-device", "cpu", env=env)
    cases = sorted(json.loads((tiny_dataset.raw / "dataset.json").read_text())["annotated_slices"])
    out = tiny_dataset.root / "suggestions_mt"
    # Default score of a two-network checkpoint: models (teacher vs student); all training cases.
    cli("nnunet-ext", "suggest", "-d", ds, "-c", "3d_fullres", "-tr", trainer, "-p", "nnUNetPlans_tiny",
        "-device", "cpu", "-n", "4", "--out", str(out), "--disable-tta", env=env)
    check_suggestions(out, tiny_dataset, 4, 1, "models", cases)
