"""MeanTeacherTrainer / MeanTeacherContinuityTrainer inside nnU-Net: real CLIs, checkpoints, exact resume."""

import copy
import json
import math

import pytest
import torch
from conftest import assert_predicts_the_test_volume, cli, read_training_log, record_supervised_loss, train_env
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.semi_supervised import unwrap
from nnunet_ext.trainer_in_process import draw_batches
from nnunet_ext.trainers import MeanTeacherContinuityTrainer, MeanTeacherTrainer
from nnunet_ext.trainers.semi_supervised_base import first_output

pytestmark = pytest.mark.integration
TRAINER = "MeanTeacherContinuityTrainer_exttest_noval"  # final validation: the dense benchmark test runs MT's
IGNORE = 3  # the tiny dataset's ignore label


def test_defaults_are_the_ablations_and_paper_variants_keep_the_papers_loss_settings():
    from nnunet_ext.trainers import (
        MeanTeacherContinuityTrainer_ema99_paperloss,
        MeanTeacherContinuityTrainer_paper,
        MeanTeacherTrainer_ema99_paperloss,
        MeanTeacherTrainer_paper,
    )

    assert MeanTeacherTrainer.continuity_weight == 0.0
    shared = {"ema_alpha": 0.999, "temperature": 0.5, "confidence_threshold": 0.8, "rampup_fraction": 0.2,
              "random_patch_fraction": 0.5}
    ours = {"consistency_weight": 1.0, "continuity_weight": 1.0, "confidence_temperature": 1.0,
            "perturbed_network": "none", "continuity_across_edges": False}
    paper = {"consistency_weight": 10.0, "continuity_weight": 10.0, "confidence_temperature": None,
             "perturbed_network": "student", "continuity_across_edges": True}
    for trainer, settings in [(MeanTeacherContinuityTrainer, {**shared, **ours}),
                              (MeanTeacherContinuityTrainer_paper, {**shared, **paper}),
                              (MeanTeacherContinuityTrainer_ema99_paperloss, {**paper, "ema_alpha": 0.99}),
                              (MeanTeacherTrainer_paper, {**paper, "continuity_weight": 0.0}),
                              (MeanTeacherTrainer_ema99_paperloss, {**paper, "continuity_weight": 0.0})]:
        assert {attribute: getattr(trainer, attribute) for attribute in settings} == settings, trainer.__name__


def test_the_short_budget_default_trains_as_the_ablations_both_removals_variant():
    from nnunet_ext.trainers import (
        MeanTeacherContinuityTrainer_ema99,
        MeanTeacherContinuityTrainer_ema99_fixed_edgeaware_noperturb,
    )

    for attribute in ("ema_alpha", "temperature", "confidence_threshold", "confidence_temperature",
                      "consistency_weight", "continuity_weight", "continuity_across_edges", "rampup_fraction",
                      "perturbed_network", "random_patch_fraction"):
        assert getattr(MeanTeacherContinuityTrainer_ema99, attribute) == \
            getattr(MeanTeacherContinuityTrainer_ema99_fixed_edgeaware_noperturb, attribute), attribute


def test_short_budget_variants_change_only_the_ema_decay():
    from nnunet_ext.trainers import (
        MeanTeacherContinuityTrainer_demo,
        MeanTeacherContinuityTrainer_ema99,
        MeanTeacherTrainer_ema99,
    )

    for variant, base in [(MeanTeacherTrainer_ema99, MeanTeacherTrainer),
                          (MeanTeacherContinuityTrainer_ema99, MeanTeacherContinuityTrainer)]:
        assert issubclass(variant, base) and variant.ema_alpha == 0.99
        assert {k for k in vars(variant) if not k.startswith("__")} == {"ema_alpha"}
    assert MeanTeacherContinuityTrainer_demo.ema_alpha == 0.99


def test_ablation_variants_change_only_their_hypothesis():
    from nnunet_ext.trainers import (
        MeanTeacherContinuityTrainer_ema99,
        MeanTeacherContinuityTrainer_ema99_addedpatches,
        MeanTeacherContinuityTrainer_ema99_fixed,
        MeanTeacherContinuityTrainer_ema99_fixed_edgeaware,
        MeanTeacherContinuityTrainer_ema99_fixed_edgeaware_noperturb,
        MeanTeacherContinuityTrainer_ema99_paperloss,
        MeanTeacherContinuityTrainer_ema99_stocksampling,
        MeanTeacherTrainer_ema99,
        MeanTeacherTrainer_ema99_addedpatches,
        MeanTeacherTrainer_ema99_cleansup,
        MeanTeacherTrainer_ema99_fixed,
        MeanTeacherTrainer_ema99_fixed_noperturb,
        MeanTeacherTrainer_ema99_fixed_nossl,
        MeanTeacherTrainer_ema99_fixed_nossl_stocksampling,
        MeanTeacherTrainer_ema99_fixed_twoviews,
        MeanTeacherTrainer_ema99_lambda1,
        MeanTeacherTrainer_ema99_nossl,
        MeanTeacherTrainer_ema99_paperloss,
        MeanTeacherTrainer_ema99_rawconf,
    )

    fixed = {"consistency_weight": 1.0, "confidence_temperature": 1.0, "perturbed_network": "teacher"}
    for variant, base, changes in [
            (MeanTeacherTrainer_ema99_nossl, MeanTeacherTrainer_ema99_paperloss, {"consistency_weight": 0.0}),
            (MeanTeacherTrainer_ema99_lambda1, MeanTeacherTrainer_ema99_paperloss, {"consistency_weight": 1.0}),
            (MeanTeacherTrainer_ema99_rawconf, MeanTeacherTrainer_ema99_paperloss, {"confidence_temperature": 1.0}),
            (MeanTeacherTrainer_ema99_cleansup, MeanTeacherTrainer_ema99_paperloss, {"perturbed_network": "teacher"}),
            (MeanTeacherTrainer_ema99_fixed, MeanTeacherTrainer_ema99_paperloss, fixed),
            (MeanTeacherTrainer_ema99_fixed_nossl, MeanTeacherTrainer_ema99_fixed, {"consistency_weight": 0.0}),
            (MeanTeacherTrainer_ema99_fixed_nossl_stocksampling, MeanTeacherTrainer_ema99_fixed_nossl,
             {"random_patch_fraction": 0.0}),
            (MeanTeacherTrainer_ema99_fixed_noperturb, MeanTeacherTrainer_ema99_fixed, {"perturbed_network": "none"}),
            (MeanTeacherTrainer_ema99_fixed_twoviews, MeanTeacherTrainer_ema99_fixed,
             {"perturbed_network": "student_consistency"}),
            (MeanTeacherContinuityTrainer_ema99_fixed, MeanTeacherContinuityTrainer_ema99_paperloss,
             {**fixed, "continuity_weight": 1.0}),
            (MeanTeacherContinuityTrainer_ema99_fixed_edgeaware, MeanTeacherContinuityTrainer_ema99_fixed,
             {"continuity_across_edges": False}),
            (MeanTeacherContinuityTrainer_ema99_fixed_edgeaware_noperturb,
             MeanTeacherContinuityTrainer_ema99_fixed_edgeaware, {"perturbed_network": "none"}),
            (MeanTeacherContinuityTrainer_ema99_stocksampling, MeanTeacherContinuityTrainer_ema99,
             {"random_patch_fraction": 0.0})]:
        assert variant.__bases__ == (base,)
        assert {k: v for k, v in vars(variant).items() if not k.startswith("__")} == changes
    for variant, base in [(MeanTeacherTrainer_ema99_addedpatches, MeanTeacherTrainer_ema99),
                          (MeanTeacherContinuityTrainer_ema99_addedpatches, MeanTeacherContinuityTrainer_ema99)]:
        assert issubclass(variant, base) and {k for k in vars(variant) if not k.startswith("__")} == set()
        assert (variant.random_patch_fraction, variant.added_random_patches) == (0.0, 1.0)


def test_paper_variants_change_the_optimizer_and_the_loss_settings(build_in_process):
    from nnunet_ext.trainers import MeanTeacherContinuityTrainer_paper, MeanTeacherTrainer_paper

    for variant, base, own in [(MeanTeacherTrainer_paper, MeanTeacherTrainer, set()),
                               (MeanTeacherContinuityTrainer_paper, MeanTeacherContinuityTrainer,
                                {"continuity_weight"})]:
        assert issubclass(variant, base) and {k for k in vars(variant) if not k.startswith("__")} == own
    trainer = build_in_process(MeanTeacherContinuityTrainer_paper)
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and trainer.initial_lr == 1e-4
    assert trainer.continuity_weight == 10.0 and trainer.confidence_temperature is None
    # nnU-Net steps the scheduler with the epoch: half way the cosine is at half the rate, at the end at 0.
    trainer.lr_scheduler.step(trainer.num_epochs // 2)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-4)
    trainer.lr_scheduler.step(trainer.num_epochs)
    assert trainer.optimizer.param_groups[0]["lr"] == 0.0


@pytest.mark.parametrize("perturbed, student_doubled, teacher_doubled", [
    ("student", True, False), ("teacher", False, True), ("none", False, False)])
def test_perturbed_network_chooses_whose_input_is_perturbed(build_in_process, perturbed, student_doubled,
                                                            teacher_doubled):
    from nnunet_ext.semi_supervised import StrongIntensityPerturbation

    # Brightness x2 on every sample and nothing else: the perturbed input is exactly twice the batch.
    double = StrongIntensityPerturbation(brightness=(2.0, 2.0), p_brightness=1.0, p_noise=0.0, p_contrast=0.0,
                                         p_gamma=0.0, p_blur=0.0)
    variant = type("MeanTeacherTrainer_perturbed", (MeanTeacherTrainer,),
                   {"perturbed_network": perturbed, "strong_perturbation": double, "__module__": __name__})
    trainer = build_in_process(variant)
    (batch,) = draw_batches(trainer, 1)
    seen = {}
    for name, network in (("student", unwrap(trainer.network)), ("teacher", trainer.teacher.module)):
        network.register_forward_pre_hook(lambda module, args, name=name: seen.setdefault(name, args[0].clone()))
    trainer.train_step(batch)
    data = batch["data"]
    assert torch.equal(seen["student"], 2 * data if student_doubled else data)
    assert torch.equal(seen["teacher"], 2 * data if teacher_doubled else data)


def test_two_views_supervise_the_clean_view_and_hold_the_perturbed_one_to_the_teacher(build_in_process,
                                                                                     monkeypatch):
    import nnunet_ext.trainers.mean_teacher as mean_teacher
    from nnunet_ext.semi_supervised import StrongIntensityPerturbation

    double = StrongIntensityPerturbation(brightness=(2.0, 2.0), p_brightness=1.0, p_noise=0.0, p_contrast=0.0,
                                         p_gamma=0.0, p_blur=0.0)
    variant = type("MeanTeacherTrainer_twoviews", (MeanTeacherTrainer,),
                   {"perturbed_network": "student_consistency", "strong_perturbation": double,
                    "__module__": __name__})
    trainer = build_in_process(variant)
    (batch,) = draw_batches(trainer, 1)
    data = batch["data"]
    student = unwrap(trainer.network)
    with torch.no_grad():  # before the step changes the weights; instance norm: each sample alone gives the same
        clean, perturbed = student(data), first_output(student(2 * data))
        teacher = first_output(trainer.teacher.module(data))
    seen = {}
    consistency = mean_teacher.sharpened_consistency_loss

    def recording_consistency(student_logits, teacher_logits, *args):
        seen["student"], seen["teacher"] = student_logits, teacher_logits
        return consistency(student_logits, teacher_logits, *args)

    supervised = record_supervised_loss(trainer)
    monkeypatch.setattr(mean_teacher, "sharpened_consistency_loss", recording_consistency)
    trainer.train_step(batch)
    ((supervised_output, _),) = supervised
    assert len(supervised_output) == len(clean)  # every deep-supervision output, clean view only
    for got, expected in zip(supervised_output, clean, strict=True):
        torch.testing.assert_close(got.detach(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(seen["student"].detach(), perturbed, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(seen["teacher"], teacher, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("across_edges", [True, False])
def test_continuity_leaves_out_the_teachers_edges_on_request(build_in_process, monkeypatch, across_edges):
    import nnunet_ext.trainers.mean_teacher as mean_teacher

    variant = type("MeanTeacherContinuityTrainer_edges", (MeanTeacherContinuityTrainer,),
                   {"continuity_across_edges": across_edges, "__module__": __name__})
    trainer = build_in_process(variant)
    (batch,) = draw_batches(trainer, 1)
    seen = {}
    trainer.teacher.module.register_forward_hook(lambda module, args, out: seen.setdefault("teacher", out))
    continuity = mean_teacher.axial_continuity_loss

    def recording_continuity(probabilities, mask, axis, labels):
        seen["labels"] = labels
        return continuity(probabilities, mask, axis, labels)

    monkeypatch.setattr(mean_teacher, "axial_continuity_loss", recording_continuity)
    trainer.train_step(batch)
    teacher = seen["teacher"][0] if isinstance(seen["teacher"], (list, tuple)) else seen["teacher"]
    if across_edges:
        assert seen["labels"] is None  # every unlabeled pair counts (the paper)
    else:
        assert torch.equal(seen["labels"], teacher.argmax(1, keepdim=True))  # full-resolution teacher classes


def test_a_batch_without_unlabeled_voxels_logs_its_passed_fraction_as_undefined(build_in_process):
    trainer = build_in_process(MeanTeacherTrainer)
    (batch,) = draw_batches(trainer, 1)
    assert (first_output(batch["target"]) == IGNORE).any()  # the tiny dataset's patches hold unlabeled voxels
    assert 0 <= trainer.train_step(batch)["passed_fraction"] <= 1
    # Every voxel annotated: no fraction to report (nan, left out of the epoch mean), rather than 0.
    annotated = {**batch, "target": [torch.where(t == IGNORE, 0, t) for t in batch["target"]]}
    assert math.isnan(trainer.train_step(annotated)["passed_fraction"])


def test_an_unknown_perturbed_network_is_refused(build_in_process):
    variant = type("MeanTeacherTrainer_bad", (MeanTeacherTrainer,), {"perturbed_network": "both",
                                                                     "__module__": __name__})
    with pytest.raises(RuntimeError, match="perturbed_network must be one of"):
        build_in_process(variant)


def test_train_predict_and_resume_through_the_real_clis(tiny_dataset):
    env, ds = train_env(tiny_dataset.env), str(tiny_dataset.dataset_id)
    args = [ds, "3d_fullres", "0", "-tr", TRAINER, "-p", "nnUNetPlans_tiny", "-device", "cpu"]
    cli("nnUNetv2_train", *args, env=env)
    fold = next((tiny_dataset.root / "nnUNet_results").glob(f"Dataset007_*/{TRAINER}__nnUNetPlans_tiny__3d_fullres"
                                                            "/fold_0"))
    log = read_training_log(fold)
    assert "continuity loss along preprocessed axis 0 (dataset.json annotation_axis=0" in log
    assert "'consistency_weight': 1.0" in log and "'continuity_weight': 1.0" in log
    assert log.count("loss_sup ") == 2 and "passed_fraction" in log  # one SSL line per epoch
    assert (fold / "ssl_progress.png").is_file() and (fold / "progress.png").is_file()

    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["trainer_name"] == TRAINER
    teacher, student = final["network_weights"], final["student_weights"]
    assert teacher.keys() == student.keys()
    # 6 EMA updates with warm-up (alpha_5 = 5/6): the teacher lags behind the student.
    assert final["ema_step"] == 6
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)

    assert_predicts_the_test_volume(tiny_dataset, TRAINER)

    # Resume: without the final checkpoint, --c continues from checkpoint_best (saved after epoch 0).
    (fold / "checkpoint_final.pth").unlink()
    best_epoch = torch.load(fold / "checkpoint_best.pth", map_location="cpu", weights_only=False)["current_epoch"]
    cli("nnUNetv2_train", *args, "--c", env=env)
    resumed = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert resumed["current_epoch"] == 2
    assert resumed["ema_step"] == 3 * best_epoch + 3 * (2 - best_epoch)
    log = read_training_log(fold)
    assert log.count("loss_sup ") == 2 + (2 - best_epoch)


def test_on_the_2d_configuration_patches_reach_the_unannotated_slices_stock_never_sees(tiny_dataset_2d,
                                                                                         build_in_process):
    def unannotated_slices(trainer_class) -> tuple[int, int]:
        trainer = build_in_process(trainer_class, configuration="2d")
        targets = torch.cat([first_output(b["target"]) for b in draw_batches(trainer, 10)])
        # Each 2d patch is one slice along the annotation axis: dense, or ignore everywhere but padding.
        return int((targets == IGNORE).flatten(1).any(1).sum()), len(targets)

    # Stock centres its patches on annotated voxels or on foreground, which only the annotated slices hold.
    assert unannotated_slices(nnUNetTrainer)[0] == 0
    # Half of ours are centred on a random voxel, 3 in 4 of which lie on an unannotated slice (every 4th annotated).
    unannotated, patches = unannotated_slices(MeanTeacherTrainer)
    assert 0 < unannotated < patches


def test_added_random_patches_precede_stocks_batch_which_alone_the_supervised_loss_sees(tiny_dataset_2d,
                                                                                       build_in_process):
    from nnunet_ext.trainers import MeanTeacherTrainer_ema99_addedpatches

    trainer = build_in_process(MeanTeacherTrainer_ema99_addedpatches, configuration="2d")
    # Tiny plans: batch 2, one of them foreground-oversampled; as many random patches again go in front.
    assert (trainer.batch_size, trainer.added_patches, trainer.supervised_batch_size) == (4, 2, 2)
    batches = draw_batches(trainer, 10)
    has_ignore = torch.stack([(first_output(b["target"]) == IGNORE).flatten(1).any(1) for b in batches])
    assert not has_ignore[:, 2:].any()  # stock's two patches: annotated slices only, as stock samples them
    assert has_ignore[:, :2].any()  # 3 in 4 random slices are unannotated

    seen = record_supervised_loss(trainer)
    batch = batches[0]
    trainer.train_step(batch)
    ((output, target),) = seen
    assert [len(o) for o in output] == [2] * len(output)
    for got, expected in zip(target, batch["target"], strict=True):
        assert torch.equal(got, expected[2:])


def test_continuity_with_added_patches_trains_and_predicts_through_the_real_clis(tiny_dataset):
    env, ds = train_env(tiny_dataset.env), str(tiny_dataset.dataset_id)
    trainer = "MeanTeacherContinuityTrainer_addedpatches_exttest_noval"
    cli("nnUNetv2_train", ds, "3d_fullres", "0", "-tr", trainer, "-p", "nnUNetPlans_tiny", "-device", "cpu", env=env)
    fold = next((tiny_dataset.root / "nnUNet_results").glob(f"Dataset*/{trainer}__nnUNetPlans_tiny__3d_fullres/fold_0"))
    log = read_training_log(fold)
    assert "'random_patch_fraction': 0.0, 'added_random_patches': 1.0" in log
    assert "training batches of 4: 2 random-voxel patches in front of nnU-Net's 2" in log  # tiny plans: batch 2
    assert_predicts_the_test_volume(tiny_dataset, trainer)


def test_added_random_patches_with_probabilistic_oversampling_are_refused(build_in_process):
    from nnunet_ext.trainers import MeanTeacherTrainer_ema99_addedpatches

    class ProbabilisticVariant(MeanTeacherTrainer_ema99_addedpatches):
        def initialize(self):
            self.probabilistic_oversampling = True  # nnU-Net sets it in __init__, read by initialize
            super().initialize()

    with pytest.raises(RuntimeError, match="set probabilistic_oversampling = False or added_random_patches = 0"):
        build_in_process(ProbabilisticVariant)


def test_continuity_on_the_2d_configuration_is_refused_with_the_fix(tiny_dataset_2d, build_in_process):
    with pytest.raises(RuntimeError, match="slicing axis of the 2d configuration.*use MeanTeacherTrainer"):
        build_in_process(MeanTeacherContinuityTrainer, configuration="2d")


def test_mean_teacher_trains_and_predicts_the_2d_configuration_through_the_real_clis(tiny_dataset_2d):
    env, ds = train_env(tiny_dataset_2d.env), str(tiny_dataset_2d.dataset_id)
    trainer = "MeanTeacherTrainer_exttest_noval"
    cli("nnUNetv2_train", ds, "2d", "0", "-tr", trainer, "-p", "nnUNetPlans_tiny", "-device", "cpu", env=env)
    fold = next((tiny_dataset_2d.root / "nnUNet_results").glob(f"Dataset007_*/{trainer}__nnUNetPlans_tiny__2d/fold_0"))
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["ema_step"] == 6 and final["network_weights"].keys() == final["student_weights"].keys()
    assert_predicts_the_test_volume(tiny_dataset_2d, trainer, "2d")


@pytest.fixture
def in_process(build_in_process):
    """Build trainers in this process on the shared tiny dataset (results in tmp_path)."""
    return lambda trainer_class=MeanTeacherContinuityTrainer: build_in_process(trainer_class)


def state_of(trainer):
    return {"student": copy.deepcopy(unwrap(trainer.network).state_dict()),
            "teacher": copy.deepcopy(trainer.teacher.module.state_dict()),
            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
            "ema_step": trainer.teacher.step, "epoch": trainer.current_epoch}


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoint_round_trip_resumes_the_exact_next_step(in_process, tmp_path):
    trainer = in_process()
    batches = draw_batches(trainer, 3)
    trainer.current_epoch = 2  # mid ramp-up, so both SSL weights are non-zero
    for batch in batches[:2]:
        trainer.train_step(batch)
    path = str(tmp_path / "checkpoint.pth")
    trainer.save_checkpoint(path)

    resumed = in_process()
    resumed.load_checkpoint(path)
    before, after = state_of(trainer), state_of(resumed)
    assert after["ema_step"] == before["ema_step"] == 2
    assert after["epoch"] == before["epoch"] + 1  # nnU-Net stores the epoch to continue with
    assert_same_tensors(before["student"], after["student"])
    assert_same_tensors(before["teacher"], after["teacher"])
    assert json.dumps(before["optimizer"]["param_groups"]) == json.dumps(after["optimizer"]["param_groups"])
    for slot, values in before["optimizer"]["state"].items():
        assert_same_tensors(values, after["optimizer"]["state"][slot])

    # The same next step (same batch, same perturbation draw) gives the same weights.
    resumed.current_epoch = trainer.current_epoch
    for t in (trainer, resumed):
        torch.manual_seed(123)
        t.train_step(batches[2])
    assert_same_tensors(unwrap(trainer.network).state_dict(), unwrap(resumed.network).state_dict())
    assert_same_tensors(trainer.teacher.module.state_dict(), resumed.teacher.module.state_dict())


def test_teacher_is_what_validation_and_checkpoints_see(in_process, tmp_path, monkeypatch):
    trainer = in_process()
    (batch,) = draw_batches(trainer, 1)
    for _ in range(3):
        trainer.train_step(batch)
    seen = []
    stock_validation_step = nnUNetTrainer.validation_step

    def spy(self, b):
        seen.append(self.network)
        return stock_validation_step(self, b)

    monkeypatch.setattr(nnUNetTrainer, "validation_step", spy)
    trainer.validation_step(batch)
    assert seen == [trainer.teacher.module]
    assert trainer.network is not trainer.teacher.module  # the student is back in place afterwards
    path = tmp_path / "c.pth"
    trainer.save_checkpoint(str(path))
    saved = torch.load(path, map_location="cpu", weights_only=False)
    assert_same_tensors(saved["network_weights"], trainer.teacher.module.state_dict())
    assert_same_tensors(saved["student_weights"], unwrap(trainer.network).state_dict())


def test_dataset_without_ignore_label_is_refused(tiny_env, monkeypatch, tmp_path):
    from nnunet_ext.nnunet_paths import dataset_folder

    folder = dataset_folder(tiny_env.dataset_id)
    plans = json.loads((folder / "nnUNetPlans_tiny.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((folder / "dataset.json").read_text())
    del dataset_json["labels"]["ignore"]
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    trainer = MeanTeacherTrainer(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="MeanTeacherTrainer needs unlabeled voxels.*no ignore label"):
        trainer.initialize()
