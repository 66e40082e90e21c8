"""PseudoLabelWeightedTrainer and `nnunet-ext pseudolabels` inside nnU-Net: the 2D -> 3D and self-training workflows
through the real CLIs, the pseudo-labels' alignment with the labels after nnU-Net's augmentation, and the
missing-pseudo-label stop.

Folds of the shared tiny dataset used here: 0 = the CLI workflows (the 2D source, self-training and the 2D + 3D
ensemble, each creating its pseudo-labels before training), 2 = dense-ground-truth pseudo-labels (alignment), 3 and
4 = missing pseudo-labels.
"""

import hashlib
import json

import blosc2
import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_pickle
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from conftest import assert_predicts_the_test_volume, cli, read_training_log, record_supervised_loss, train_env
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_ext.nnunet_paths import dataset_folder
from nnunet_ext.pseudo_label_generation import (
    load_record,
    pseudo_label_array,
    pseudo_label_folder,
    save_pseudo_labels,
    to_preprocessed_geometry,
    write_record,
)
from nnunet_ext.semi_supervised.pseudo_label import CONFIDENCE_SCALE
from nnunet_ext.trainer_in_process import draw_batches
from nnunet_ext.trainers import (
    MeanTeacherContinuityPseudoLabelTrainer_ema99,
    PseudoLabelConfidenceTrainer,
    PseudoLabelEnsembleTrainer,
    PseudoLabelSelfTrainingTrainer,
    PseudoLabelWeightedTrainer,
    PseudoLabelWeightedTrainer_addedpatches,
)

pytestmark = pytest.mark.integration
PLANS = "nnUNetPlans_tiny"
DATA_IDENTIFIER = "nnUNetPlans_3d_fullres"
IGNORE = 3
MODEL_2D = "nnUNetTrainer_exttest_noval"


@pytest.fixture(scope="module")
def trained_2d(tiny_dataset_2d) -> str:
    """The 2D source model of fold 0 (test budget), trained through the real CLI; its trainer."""
    cli("nnUNetv2_train", str(tiny_dataset_2d.dataset_id), "2d", "0", "-tr", MODEL_2D, "-p", PLANS, "-device", "cpu",
        env=train_env(tiny_dataset_2d.env))
    return MODEL_2D


def softmax_on_preprocessed(results, dataset, configuration: str, data: np.ndarray) -> torch.Tensor:
    """A fold-0 model's class probabilities for a preprocessed case, no mirroring (what `--disable-tta` predicts)."""
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    model_folder = results / dataset.name / f"{MODEL_2D}__{PLANS}__{configuration}"
    predictor.initialize_from_trained_model_folder(str(model_folder), (0,))
    return torch.softmax(predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).float(), 0)


def test_2d_training_pseudolabels_3d_training_and_prediction_through_the_clis(tiny_dataset, trained_2d, monkeypatch):
    env, ds = train_env(tiny_dataset.env), str(tiny_dataset.dataset_id)
    results = tiny_dataset.root / "nnUNet_results"
    preprocessed = tiny_dataset.root / "nnUNet_preprocessed"

    run = cli("nnunet-ext", "pseudolabels", "-d", ds, "--from", "2d", "-tr", MODEL_2D, "-p", PLANS, "-f", "0",
              "--to", "3d_fullres", "-device", "cpu", "--disable-tta", env=env)
    (dataset,) = preprocessed.glob("Dataset007_*")
    folder = pseudo_label_folder(dataset, DATA_IDENTIFIER, 0)
    split = json.loads((dataset / "splits_final.json").read_text())[0]
    record = load_record(folder)
    assert record["cases"] == split["train"] and record["excluded_validation_cases"] == split["val"]
    assert record["source"]["trainer"] == MODEL_2D and record["source"]["configuration"] == "2d"
    assert record["source"]["fold"] == 0 and record["target"]["data_identifier"] == DATA_IDENTIFIER
    assert record["method"] == "pseudo-labels: 2d -> 3d_fullres"
    assert sorted(p.stem for p in folder.glob("*.b2nd")) == split["train"]  # validation cases excluded
    assert f"validation cases excluded: {split['val'][0]}" in run.stdout

    # Here 2d and 3d_fullres share their preprocessed geometry, so the pseudo-labels must be the 2D model's own
    # prediction on the 3d_fullres preprocessed data: the round trip through the original geometry is exact.
    monkeypatch.setenv("nnUNet_extTrainer", tiny_dataset.env["nnUNet_extTrainer"])  # to rebuild the 2D trainer
    case = split["train"][0]
    data = blosc2.open(urlpath=str(dataset / DATA_IDENTIFIER / f"{case}.b2nd"), mode="r")[:]
    probabilities = softmax_on_preprocessed(results, dataset, "2d", data)
    stored = blosc2.open(urlpath=str(folder / f"{case}.b2nd"), mode="r")[:]
    assert np.array_equal(stored[0], probabilities.argmax(0).numpy())
    expected_confidence = np.rint(probabilities.amax(0).numpy() * CONFIDENCE_SCALE)
    assert np.abs(stored[1].astype(int) - expected_confidence).max() <= 1

    trainer = "PseudoLabelWeightedTrainer_exttest_noval"  # final validation: the dense benchmark test runs it
    cli("nnUNetv2_train", ds, "3d_fullres", "0", "-tr", trainer, "-p", PLANS, "-device", "cpu", env=env)
    fold = next(results.glob(f"Dataset007_*/{trainer}__{PLANS}__3d_fullres/fold_0"))
    log = read_training_log(fold)
    assert "'pseudo_label_weight': 0.5" in log and "'confidence_weighting': False" in log
    assert f"pseudo-labels from {{'trainer': '{MODEL_2D}'" in log
    assert log.count("loss_pseudo ") == 2 and "mean_pseudo_weight 0.5" in log  # one line per epoch, alpha = 0.5
    assert (fold / "ssl_progress.png").is_file()
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["trainer_name"] == trainer and final["current_epoch"] == 2

    assert_predicts_the_test_volume(tiny_dataset, trainer, plans=PLANS)


def test_self_training_from_stock_3d_fullres_through_the_clis(tiny_dataset, trained_stock):
    """Self-training: pseudo-labels from the stock 3d_fullres model, then PseudoLabelSelfTrainingTrainer on them."""
    env, ds = train_env(tiny_dataset.env), str(tiny_dataset.dataset_id)
    cli("nnunet-ext", "pseudolabels", "-d", ds, "--from", "3d_fullres", "-tr", trained_stock.trainer, "-p", PLANS,
        "-f", "0", "--to", "3d_fullres", "-device", "cpu", "--disable-tta", env=env)
    (dataset,) = (tiny_dataset.root / "nnUNet_preprocessed").glob("Dataset007_*")
    record = load_record(pseudo_label_folder(dataset, DATA_IDENTIFIER, 0))
    assert record["source"]["trainer"] == trained_stock.trainer and record["source"]["configuration"] == "3d_fullres"
    assert record["method"] == "self-training: 3d_fullres -> 3d_fullres"

    trainer = "PseudoLabelSelfTrainingTrainer_exttest_noval"
    cli("nnUNetv2_train", ds, "3d_fullres", "0", "-tr", trainer, "-p", PLANS, "-device", "cpu", env=env)
    fold = next((tiny_dataset.root / "nnUNet_results").glob(f"Dataset007_*/{trainer}__{PLANS}__3d_fullres/fold_0"))
    log = read_training_log(fold)
    assert f"pseudo-labels from {{'trainer': '{trained_stock.trainer}'" in log
    assert "'configuration': '3d_fullres'" in log
    assert log.count("loss_pseudo ") == 2  # one line per epoch
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["trainer_name"] == trainer and final["current_epoch"] == 2


def test_2d_self_training_on_its_own_pseudo_labels_through_the_clis(tiny_dataset_2d, trained_2d, monkeypatch):
    """The 2d configuration as the learner: stock 2d's pseudo-labels in the 2d preprocessed geometry, then
    PseudoLabelWeightedTrainer_addedpatches on 2d sees the unannotated slices that stock 2d never samples."""
    env, ds = train_env(tiny_dataset_2d.env), str(tiny_dataset_2d.dataset_id)
    results = tiny_dataset_2d.root / "nnUNet_results"
    cli("nnunet-ext", "pseudolabels", "-d", ds, "--from", "2d", "-tr", trained_2d, "-p", PLANS, "-f", "0",
        "--to", "2d", "-device", "cpu", "--disable-tta", env=env)
    (dataset,) = (tiny_dataset_2d.root / "nnUNet_preprocessed").glob("Dataset007_*")
    folder = pseudo_label_folder(dataset, "nnUNetPlans_2d", 0)
    record = load_record(folder)
    assert record["method"] == "self-training: 2d -> 2d" and record["target"]["data_identifier"] == "nnUNetPlans_2d"

    # The stored labels are the 2D model's own prediction on its preprocessed data (no round-trip loss here either).
    monkeypatch.setenv("nnUNet_extTrainer", tiny_dataset_2d.env["nnUNet_extTrainer"])
    case = record["cases"][0]
    data = blosc2.open(urlpath=str(dataset / "nnUNetPlans_2d" / f"{case}.b2nd"), mode="r")[:]
    probabilities = softmax_on_preprocessed(results, dataset, "2d", data)
    stored = blosc2.open(urlpath=str(folder / f"{case}.b2nd"), mode="r")[:]
    assert np.array_equal(stored[0], probabilities.argmax(0).numpy())

    # The variant the README recommends on 2d: stock's batch of 2 for L_s, 2 random-voxel patches added for L_p.
    trainer = "PseudoLabelWeightedTrainer_addedpatches_exttest_noval"
    cli("nnUNetv2_train", ds, "2d", "0", "-tr", trainer, "-p", PLANS, "-device", "cpu", env=env)
    fold = next(results.glob(f"Dataset007_*/{trainer}__{PLANS}__2d/fold_0"))
    log = read_training_log(fold)
    assert "training batches of 4: 2 random-voxel patches in front of nnU-Net's 2" in log
    fractions = [float(line.split("pseudo_fraction ")[1].split(",")[0]) for line in log.splitlines()
                 if "pseudo_fraction " in line]
    # 12 random slices, 3 in 4 unannotated: all 12 annotated (no pseudo-labelled voxel) has odds 4^-12.
    assert len(fractions) == 2 and sum(fractions) > 0
    assert_predicts_the_test_volume(tiny_dataset_2d, trainer, configuration="2d", plans=PLANS)


def test_ensemble_pseudolabels_are_the_mean_of_stock_2d_and_3d_fullres_through_the_clis(tiny_dataset, trained_2d,
                                                                                       trained_stock, monkeypatch):
    """`--from 2d+3d_fullres` averages both models' probabilities; PseudoLabelEnsembleTrainer trains on them."""
    env, ds = train_env(tiny_dataset.env), str(tiny_dataset.dataset_id)
    results = tiny_dataset.root / "nnUNet_results"
    assert trained_stock.trainer == trained_2d  # `-tr` names one trainer for both configurations
    cli("nnunet-ext", "pseudolabels", "-d", ds, "--from", "2d+3d_fullres", "-tr", trained_2d, "-p", PLANS, "-f", "0",
        "--to", "3d_fullres", "-device", "cpu", "--disable-tta", env=env)
    (dataset,) = (tiny_dataset.root / "nnUNet_preprocessed").glob("Dataset007_*")
    folder = pseudo_label_folder(dataset, DATA_IDENTIFIER, 0)
    record = load_record(folder)
    source = record["source"]
    assert record["method"] == "pseudo-labels: the mean probability of 2d and 3d_fullres -> 3d_fullres"
    assert source["configuration"] == "2d+3d_fullres"
    assert [m["configuration"] for m in source["models"]] == ["2d", "3d_fullres"]
    stock_checkpoint = trained_stock.fold / "checkpoint_final.pth"
    assert source["models"][1] == {"configuration": "3d_fullres", "checkpoint": str(stock_checkpoint),
                                   "checkpoint_sha256": hashlib.sha256(stock_checkpoint.read_bytes()).hexdigest()}

    # 2d and 3d_fullres share their preprocessed geometry here: the stored labels are the argmax of the mean of the
    # two models' own predictions, their confidence that mean's maximum.
    monkeypatch.setenv("nnUNet_extTrainer", tiny_dataset.env["nnUNet_extTrainer"])
    case = json.loads((dataset / "splits_final.json").read_text())[0]["train"][0]
    data = blosc2.open(urlpath=str(dataset / DATA_IDENTIFIER / f"{case}.b2nd"), mode="r")[:]
    each = [softmax_on_preprocessed(results, dataset, c, data) for c in ("2d", "3d_fullres")]
    mean = (each[0] + each[1]) / 2
    stored = blosc2.open(urlpath=str(folder / f"{case}.b2nd"), mode="r")[:]
    assert np.array_equal(stored[0], mean.argmax(0).numpy())
    assert np.abs(stored[1].astype(int) - np.rint(mean.amax(0).numpy() * CONFIDENCE_SCALE)).max() <= 1
    for single in each:  # neither model alone: its confidence is off by more than rounding somewhere
        assert np.abs(stored[1].astype(int) - np.rint(single.amax(0).numpy() * CONFIDENCE_SCALE)).max() > 1

    trainer = "PseudoLabelEnsembleTrainer_exttest_noval"
    cli("nnUNetv2_train", ds, "3d_fullres", "0", "-tr", trainer, "-p", PLANS, "-device", "cpu", env=env)
    fold = next(results.glob(f"Dataset007_*/{trainer}__{PLANS}__3d_fullres/fold_0"))
    log = read_training_log(fold)
    assert "'configuration': '2d+3d_fullres'" in log and log.count("loss_pseudo ") == 2  # one line per epoch
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["trainer_name"] == trainer and final["current_epoch"] == 2


@pytest.fixture
def in_process(build_in_process):
    """Build trainers in this process on the shared tiny dataset (results in tmp_path)."""
    return lambda trainer_class, fold: build_in_process(trainer_class, PLANS, fold=fold)


# Confidence stored per dense class, so the confidence channel can be checked after augmentation too.
CONFIDENCE_OF_CLASS = {0: 0.6, 1: 0.8, 2: 1.0}


def write_dense_truth_pseudo_labels(tiny_dataset, fold: int) -> list[str]:
    """Pseudo-labels of every case = its dense ground truth (labelsTr_dense), brought in by our geometry."""
    dataset = dataset_folder(tiny_dataset.dataset_id)
    plans = PlansManager(str(dataset / f"{PLANS}.json"))
    configuration = plans.get_configuration("3d_fullres")
    reader = plans.image_reader_writer_class()
    cases = sorted(p.stem for p in (dataset / DATA_IDENTIFIER).glob("*.pkl"))
    folder = pseudo_label_folder(dataset, DATA_IDENTIFIER, fold)
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        dense, _ = reader.read_seg(str(tiny_dataset.raw / "labelsTr_dense" / f"{case}.nii.gz"))
        probabilities = np.zeros((3, *dense.shape[1:]), np.float32)
        for c, confidence in CONFIDENCE_OF_CLASS.items():
            here = dense[0] == c
            probabilities[:, here] = (1 - confidence) / 2
            probabilities[c, here] = confidence
        properties = load_pickle(str(dataset / DATA_IDENTIFIER / f"{case}.pkl"))
        array = pseudo_label_array(to_preprocessed_geometry(probabilities, properties, plans, configuration))
        save_pseudo_labels(array, folder, case, configuration.patch_size)
    write_record(folder, {"source": {"dense ground truth": "labelsTr_dense"}, "fold": fold, "cases": cases,
                          "validation_policy": "test"})
    return cases


def test_pseudo_labels_stay_aligned_with_the_labels_through_augmentation(tiny_dataset, in_process, monkeypatch):
    write_dense_truth_pseudo_labels(tiny_dataset, fold=2)
    spatially_transformed = []
    stock_parameters = SpatialTransform.get_parameters

    def spy(self, **data_dict):
        parameters = stock_parameters(self, **data_dict)
        spatially_transformed.append(parameters["grid"] is not None)  # rotated and/or scaled: interpolated
        return parameters

    monkeypatch.setattr(SpatialTransform, "get_parameters", spy)
    trainer = in_process(PseudoLabelConfidenceTrainer, fold=2)
    batches = draw_batches(trainer, 40)  # 80 patches
    assert sum(spatially_transformed) >= 10  # p = 1 - 0.8 * 0.8 = 0.36 per patch

    quantised = {c: round(v * CONFIDENCE_SCALE) for c, v in CONFIDENCE_OF_CLASS.items()}
    annotated_total = unlabeled_total = 0
    for batch in batches:
        assert isinstance(batch["target"], list) and len(batch["target"]) > 1  # deep supervision scales
        for target in batch["target"]:
            assert target.shape[1] == 3
            labels, pseudo, confidence = target[:, 0], target[:, 1], target[:, 2]
            annotated = labels != IGNORE
            # The dense truth arrives exactly where the labels are annotated (incl. padding, 0 in both).
            assert torch.equal(pseudo[annotated], labels[annotated].to(pseudo.dtype))
            # Confidence travels with its pseudo-label; padding (-1 -> 0) gives 0 in every channel.
            expected = torch.tensor([quantised[c] for c in range(3)], dtype=confidence.dtype)[pseudo.long()]
            padded = (confidence == 0) & (pseudo == 0) & (labels == 0)
            assert torch.all((confidence == expected) | padded)
            annotated_total += int(annotated.sum())
            unlabeled_total += int((~annotated & (pseudo > 0)).sum())
    assert annotated_total > 0 and unlabeled_total > 0  # both kinds of voxels were checked

    # One step: the logged mean weight is the mean stored confidence on the unlabeled voxels of the batch.
    batch = batches[0]
    full = batch["target"][0]
    unlabeled = full[:, 0] == IGNORE
    expected_mean = (full[:, 2][unlabeled].float() / CONFIDENCE_SCALE).mean().item()
    step = trainer.train_step(batch)
    assert step["mean_pseudo_weight"] == pytest.approx(expected_mean, rel=1e-5)
    assert step["pseudo_fraction"] == pytest.approx(unlabeled.float().mean().item())
    assert np.isfinite(step["loss"]) and step["loss_pseudo"] != 0

    # Validation batches keep nnU-Net's plain one-channel labels.
    _, validation = trainer.get_dataloaders()
    assert next(validation)["target"][0].shape[1] == 1


def test_added_random_patches_get_pseudo_labels_but_no_supervised_loss(tiny_dataset, in_process):
    write_dense_truth_pseudo_labels(tiny_dataset, fold=2)

    trainer = in_process(PseudoLabelWeightedTrainer_addedpatches, fold=2)
    assert (trainer.batch_size, trainer.added_patches) == (4, 2)  # tiny plans: batch 2, as many added in front
    (batch,) = draw_batches(trainer, 1)
    seen = record_supervised_loss(trainer)
    step = trainer.train_step(batch)
    # L_sup: stock's two patches' labels (channel 0 of the target) only.
    ((output, target),) = seen
    assert [len(o) for o in output] == [2] * len(output)
    for got, expected in zip(target, batch["target"], strict=True):
        assert torch.equal(got, expected[2:, :1])
    # L_p: every patch's unlabeled voxels, the added ones included.
    full = batch["target"][0]
    assert step["pseudo_fraction"] == pytest.approx((full[:, 0] == IGNORE).float().mean().item())


def test_steps_without_pseudo_labelled_voxels_do_not_pull_the_logged_mean_weight_down(tiny_dataset, in_process):
    write_dense_truth_pseudo_labels(tiny_dataset, fold=2)
    trainer = in_process(PseudoLabelWeightedTrainer, fold=2)
    (batch,) = draw_batches(trainer, 1)
    _, pseudo_labels, weights = trainer.split_targets(batch["target"])
    with torch.no_grad():
        output = trainer.network(batch["data"])
        _, none_selected = trainer.pseudo_label_term(output, pseudo_labels, [torch.zeros_like(w) for w in weights])
        _, some_selected = trainer.pseudo_label_term(output, pseudo_labels, weights)
    assert np.isnan(none_selected["mean_pseudo_weight"]) and none_selected["pseudo_fraction"] == 0
    assert some_selected["mean_pseudo_weight"] == pytest.approx(0.5)  # alpha, no confidence weighting

    # The epoch mean of two such steps: the weight over the step that had pseudo-labelled voxels, the fraction over both.
    steps = [{"loss": 1.0, "loss_sup": 1.0, **logged} for logged in (none_selected, some_selected)]
    trainer.on_train_epoch_end(steps)
    assert trainer.logger.get_value("mean_pseudo_weight", step=None)[-1] == pytest.approx(0.5)
    assert trainer.logger.get_value("pseudo_fraction", step=None)[-1] == pytest.approx(
        some_selected["pseudo_fraction"] / 2)


def test_mean_teacher_on_pseudo_labels_adds_every_term_on_the_student(tiny_dataset, in_process):
    write_dense_truth_pseudo_labels(tiny_dataset, fold=2)
    trainer = in_process(MeanTeacherContinuityPseudoLabelTrainer_ema99, fold=2)
    trainer.current_epoch = trainer.num_epochs  # ramp-ups done: lambda_cons = lambda_cont = 1
    assert trainer.continuity_axis is not None and trainer.perturbed_network == "teacher"
    (batch,) = draw_batches(trainer, 1)
    target = batch["target"]
    labels = [t[:, :1] for t in target]  # channel 0: nnU-Net's labels; 1-2: pseudo-label and confidence
    unlabeled = labels[0] == IGNORE
    with torch.no_grad():  # the student's input is nnU-Net's batch unchanged, so its output is this one
        output = trainer.network(batch["data"])
        expected_sup = trainer.loss(output, labels).item()
        alpha = [0.5 * (t[:, :1] == IGNORE).float() for t in target]
        expected_pseudo = trainer.pseudo_label_loss(output, [t[:, 1:2] for t in target], alpha).item()
    teacher_before = [p.clone() for p in trainer.teacher.module.parameters()]

    step = trainer.train_step(batch)
    assert set(trainer.ssl_log_keys) <= set(step)
    assert step["lambda_cons"] == 1.0 and step["lambda_cont"] == 1.0
    assert step["loss_sup"] == pytest.approx(expected_sup, rel=1e-5)
    assert step["loss_pseudo"] == pytest.approx(expected_pseudo, rel=1e-5)
    assert step["mean_pseudo_weight"] == pytest.approx(0.5)
    assert step["pseudo_fraction"] == pytest.approx(unlabeled.float().mean().item())
    total = step["loss_sup"] + step["loss_pseudo"] + step["loss_cons"] + step["loss_cont"]
    assert float(step["loss"]) == pytest.approx(total, rel=1e-5)
    assert step["loss_cons"] > 0 and step["loss_cont"] > 0
    # The EMA teacher followed the student's step.
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, trainer.teacher.module.parameters()))


def test_missing_or_mismatched_pseudo_labels_stop_with_the_command_that_creates_them(in_process, tiny_dataset):
    command = ("nnunet-ext pseudolabels -d Dataset007_SynthMicroscopy --from 2d -tr nnUNetTrainer "
               "-p nnUNetPlans_tiny -f 3 --to 3d_fullres")
    with pytest.raises(RuntimeError, match=f"no pseudo-labels for fold 3 .*create them with `{command}`"):
        in_process(PseudoLabelWeightedTrainer, fold=3)

    # Pseudo-labels from another configuration than the trainer learns from (self-training's, from 3d_fullres).
    folder = pseudo_label_folder(dataset_folder(tiny_dataset.dataset_id), DATA_IDENTIFIER, 4)
    folder.mkdir(parents=True, exist_ok=True)
    write_record(folder, {"source": {"configuration": "3d_fullres"}, "fold": 4, "cases": [],
                          "validation_policy": "test"})
    with pytest.raises(RuntimeError, match="learns from 2d pseudo-labels, but those in .* come from 3d_fullres: "
                                           "recreate them with `nnunet-ext pseudolabels .* --from 2d "):
        in_process(PseudoLabelWeightedTrainer, fold=4)
    with pytest.raises(RuntimeError, match="learns from 2d\\+3d_fullres pseudo-labels, .* come from 3d_fullres: "
                                           "recreate them with `nnunet-ext pseudolabels .* --from 2d\\+3d_fullres "):
        in_process(PseudoLabelEnsembleTrainer, fold=4)

    # A record without the case files (e.g. another split): stops when the training cases are loaded.
    trainer = in_process(PseudoLabelSelfTrainingTrainer, fold=4)
    with pytest.raises(RuntimeError, match="no pseudo-labels for 4 training cases of fold 4 .*--from 3d_fullres "
                                           "-tr nnUNetTrainer -p nnUNetPlans_tiny -f 4 --to 3d_fullres`"):
        trainer.get_tr_and_val_datasets()


def test_pseudolabels_bad_input_is_one_error_line(tiny_dataset, monkeypatch, capsys):
    result = cli("nnunet-ext", "pseudolabels", "-d", str(tiny_dataset.dataset_id), "-tr", "NoSuchTrainer", "-p", PLANS,
                 "-f", "1", "-device", "cpu", env=tiny_dataset.env, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("nnunet-ext: error: no source model at ")
    assert ("train it with `nnUNetv2_train Dataset007_SynthMicroscopy 2d 1 -tr NoSuchTrainer -p nnUNetPlans_tiny`"
            in lines[0])
    (dataset,) = (tiny_dataset.root / "nnUNet_preprocessed").glob("Dataset007_*")
    assert not pseudo_label_folder(dataset, DATA_IDENTIFIER, 1).exists()

    from nnunet_ext.cli import main

    for key, value in tiny_dataset.env.items():
        monkeypatch.setenv(key, value)
    for args, fragment in [(["-f", "x"], "invalid fold 'x'"),
                           (["--to", "3d_lowres"], "configuration '3d_lowres' is not in nnUNetPlans_tiny.json"),
                           (["-p", "NoPlans"], "plans 'NoPlans' not found"),
                           (["--from", "2d+2d"], "invalid --from '2d+2d': give a configuration")]:
        assert main(["pseudolabels", "-d", str(tiny_dataset.dataset_id), "-p", PLANS, *args]) == 2
        assert fragment in capsys.readouterr().err
