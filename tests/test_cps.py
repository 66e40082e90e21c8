"""CPSCutMixTrainer / CPSCutMixTrainer_ensemble inside nnU-Net: real CLIs, the step's wiring, validation per branch,
checkpoints, exact resume, DDP."""

import copy
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import (
    TINY_DATASET_ID,
    assert_predicts_the_test_volume,
    cli,
    read_training_log,
    record_supervised_loss,
    train_env,
)
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch.nn.parallel import DistributedDataParallel as DDP

import nnunet_ext.trainers.cps as cps_module
from nnunet_ext.semi_supervised import SoftmaxEnsemble, box_mask, cutmix, random_boxes, unlabeled_mask, unwrap
from nnunet_ext.trainer_in_process import build_trainer, draw_batches
from nnunet_ext.trainers import (
    CPSCutMixTrainer,
    CPSCutMixTrainer_cleansup,
    CPSCutMixTrainer_ensemble,
    CPSCutMixTrainer_mixedsup,
)
from nnunet_ext.trainers.semi_supervised_base import first_output

pytestmark = pytest.mark.integration
TRAINER = "CPSCutMixTrainer_exttest_noval"  # final validation: the ensemble test runs it
ENSEMBLE = "CPSCutMixTrainer_ensemble_exttest"
IGNORE = 3  # the synthetic dataset's ignore label


def test_defaults_of_the_method():
    for attribute, value in [("cps_weight", 1.0), ("cps_warmup", (0.05, 0.20)), ("cps_loss", "dice"),
                             ("cutmix_fraction", (0.25, 0.5)), ("branch_dice_ema", 0.9),
                             ("supervised_input", "clean")]:
        assert getattr(CPSCutMixTrainer, attribute) == value
    assert issubclass(CPSCutMixTrainer_ensemble, CPSCutMixTrainer)


def test_supervised_input_variants_change_that_one_setting():
    for variant, input_ in [(CPSCutMixTrainer_cleansup, "clean"), (CPSCutMixTrainer_mixedsup, "mixed")]:
        assert variant.__bases__ == (CPSCutMixTrainer,)
        assert {k: v for k, v in vars(variant).items() if not k.startswith("__")} == {"supervised_input": input_}


def results_folder(tiny_dataset, trainer: str):
    return next((tiny_dataset.root / "nnUNet_results").glob(f"Dataset007_*/{trainer}__nnUNetPlans_tiny__3d_fullres"
                                                            "/fold_0"))


def test_train_predict_and_resume_through_the_real_clis(tiny_dataset):
    env, ds = train_env(tiny_dataset.env), str(tiny_dataset.dataset_id)
    args = [ds, "3d_fullres", "0", "-tr", TRAINER, "-p", "nnUNetPlans_tiny", "-device", "cpu"]
    cli("nnUNetv2_train", *args, env=env)
    fold = results_folder(tiny_dataset, TRAINER)
    log = read_training_log(fold)
    assert "'cps_weight': 1.0, 'cps_warmup': (0.05, 0.2), 'cps_loss': 'dice'" in log
    # One SSL line and one line of per-branch pseudo Dice per epoch; lambda 0 at epoch 0 (0 % of training), full
    # at epoch 1 (50 %).
    assert log.count("loss_sup_a ") == 2 and log.count("pseudo Dice per branch: a ") == 2
    assert "lambda_cps 0, " in log and "lambda_cps 1, " in log
    assert (fold / "ssl_progress.png").is_file() and (fold / "progress.png").is_file()

    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["trainer_name"] == TRAINER
    branches, chosen = final["cps_branch_weights"], final["cps_inference_network"]
    assert chosen in ("a", "b") and branches.keys() == {"a", "b"}
    assert all(torch.equal(final["network_weights"][k], v) for k, v in branches[chosen].items())
    assert any(not torch.equal(branches["a"][k], branches["b"][k]) for k in branches["a"])
    assert final["cps_optimizer_b_state"]["state"] and final["optimizer_state"]["state"]
    assert_predicts_the_test_volume(tiny_dataset, TRAINER)

    # Resume: without the final checkpoint, --c continues from checkpoint_best.
    (fold / "checkpoint_final.pth").unlink()
    best_epoch = torch.load(fold / "checkpoint_best.pth", map_location="cpu", weights_only=False)["current_epoch"]
    cli("nnUNetv2_train", *args, "--c", env=env)
    resumed = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert resumed["current_epoch"] == 2
    assert read_training_log(fold).count("loss_sup_a ") == 2 + (2 - best_epoch)
    assert len(resumed["logging"]["ema_dice_a"]) == 2


def test_ensemble_trains_and_predicts_through_the_real_clis(tiny_dataset):
    env, ds = train_env(tiny_dataset.env), str(tiny_dataset.dataset_id)
    cli("nnUNetv2_train", ds, "3d_fullres", "0", "-tr", ENSEMBLE, "-p", "nnUNetPlans_tiny", "-device", "cpu", env=env)
    fold = results_folder(tiny_dataset, ENSEMBLE)
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["cps_inference_network"] == "ensemble"
    weights, branches = final["network_weights"], final["cps_branch_weights"]
    expected = {f"members.{i}.{k}": v for i, name in enumerate("ab") for k, v in branches[name].items()}
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], v) for k, v in expected.items())
    assert "network_weights: ensemble" in read_training_log(fold)
    assert_predicts_the_test_volume(tiny_dataset, ENSEMBLE)


def test_pagano_et_al_mixed_supervision_trains_and_predicts_through_the_real_clis(tiny_dataset):
    trainer = "CPSCutMixTrainer_mixedsup_exttest_noval"
    cli("nnUNetv2_train", str(tiny_dataset.dataset_id), "3d_fullres", "0", "-tr", trainer, "-p", "nnUNetPlans_tiny",
        "-device", "cpu", env=train_env(tiny_dataset.env))
    log = read_training_log(results_folder(tiny_dataset, trainer))
    assert "'supervised_input': 'mixed'" in log and log.count("loss_sup_a ") == 2
    assert_predicts_the_test_volume(tiny_dataset, trainer)


# ------------------------------------------------------------------------------------------------ in-process checks

@pytest.fixture
def in_process(build_in_process):
    """Build trainers in this process on the shared tiny dataset (results in tmp_path)."""
    return lambda trainer_class=CPSCutMixTrainer: build_in_process(trainer_class)


def test_warmup_schedule(in_process):
    trainer = in_process()
    trainer.num_epochs = 100
    # 0 up to 5 % of training, then (t - 0.05) / 0.15: epoch 8 -> 0.03 / 0.15 = 0.2, epoch 11 -> 0.4; 1 from 20 %.
    for epoch, expected in [(0, 0.0), (5, 0.0), (8, 0.2), (11, 0.4), (20, 1.0), (99, 1.0)]:
        trainer.current_epoch = epoch
        assert trainer.cps_lambda() == pytest.approx(expected)
    trainer.cps_weight = 2.0
    trainer.current_epoch = 11
    assert trainer.cps_lambda() == pytest.approx(0.8)


@pytest.mark.parametrize("attribute, value", [("cps_loss", "mse"), ("cps_warmup", (0.2, 0.05)),
                                              ("cutmix_fraction", (0.0, 0.5)), ("branch_dice_ema", 1.0)])
def test_bad_hyperparameters_are_refused_at_start(in_process, attribute, value):
    variant = type("CPSCutMixTrainer_bad", (CPSCutMixTrainer,), {attribute: value})
    with pytest.raises(RuntimeError, match=f"CPSCutMixTrainer_bad: {attribute} must be .*fix the class attribute"):
        in_process(variant)


def test_branches_are_independent_networks(in_process):
    trainer = in_process()
    a, b = unwrap(trainer.network), unwrap(trainer.network_b)
    assert a is not b and a.state_dict().keys() == b.state_dict().keys()
    assert all(not torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items() if k.endswith("conv.weight"))
    params_a = {id(p) for p in a.parameters()}
    assert all(id(p) not in params_a for group in trainer.optimizer_b.param_groups for p in group["params"])
    assert [id(p) for group in trainer.optimizer_b.param_groups for p in group["params"]] == \
        [id(p) for p in b.parameters()]


def test_the_mixed_variant_step_mixes_inputs_targets_and_pseudo_labels(in_process, monkeypatch):
    trainer = in_process(CPSCutMixTrainer_mixedsup)
    trainer.current_epoch = trainer.num_epochs // 2  # full CPS weight
    (batch,) = draw_batches(trainer, 1)
    data, target = batch["data"], batch["target"]
    assert isinstance(target, list) and len(target) == 2  # deep supervision: two resolutions of the tiny plans
    # What the step must compute, from the weights before it and the box it will draw with the same seed.
    with torch.no_grad():
        labels = {name: first_output(net(data)).argmax(1, keepdim=True)
                  for name, (net, _) in trainer.branches().items()}
    torch.manual_seed(11)
    mask = box_mask(random_boxes(data.shape[0], tuple(data.shape[2:]), trainer.cutmix_fraction), data.shape[2:])
    mixed_target = [cutmix(t, mask) for t in target]

    seen = {"inputs": [], "cps": []}
    for network, _ in trainer.branches().values():
        network.register_forward_pre_hook(lambda _, args: seen["inputs"].append(args[0]) if torch.is_grad_enabled()
                                          else None)
    supervised = record_supervised_loss(trainer)
    cps_loss = cps_module.cross_pseudo_supervision_loss
    monkeypatch.setattr(cps_module, "cross_pseudo_supervision_loss",
                        lambda logits, pseudo, m, kind: (seen["cps"].append((pseudo, m)), cps_loss(logits, pseudo, m,
                                                                                                      kind))[1])
    torch.manual_seed(11)
    before = copy.deepcopy(batch)
    result = trainer.train_step(batch)

    assert len(seen["inputs"]) == 2 and all(torch.equal(x, cutmix(data, mask)) for x in seen["inputs"])
    assert not torch.equal(seen["inputs"][0], data)  # something was pasted
    for _, targets in supervised:  # every deep-supervision level, mixed with the (downsampled) box
        assert all(torch.equal(t, expected) for t, expected in zip(targets, mixed_target, strict=True))
    (pseudo_a, mask_a), (pseudo_b, mask_b) = seen["cps"]
    assert torch.equal(pseudo_a, cutmix(labels["b"], mask))  # A learns B's labels of the unmixed batch, mixed
    assert torch.equal(pseudo_b, cutmix(labels["a"], mask))
    assert torch.equal(mask_a, unlabeled_mask(mixed_target[0], IGNORE)) and torch.equal(mask_b, mask_a)
    # Agreement: unlabeled voxels of the unmixed batch where both argmax maps agree.
    unlabeled = unlabeled_mask(target[0], IGNORE)
    agreement = ((labels["a"] == labels["b"]) & unlabeled).sum() / unlabeled.sum()
    assert result["agreement"] == pytest.approx(agreement.item())
    assert result["lambda_cps"] == 1.0 and result["loss_cps"] > 0
    assert torch.equal(batch["data"], before["data"]) and all(map(torch.equal, batch["target"], before["target"]))


def test_the_default_supervises_the_unmixed_batch_and_mixes_for_cps_only(in_process):
    trainer = in_process()
    trainer.current_epoch = trainer.num_epochs // 2  # full CPS weight
    (batch,) = draw_batches(trainer, 1)
    data, target = batch["data"], batch["target"]
    torch.manual_seed(11)
    mask = box_mask(random_boxes(data.shape[0], tuple(data.shape[2:]), trainer.cutmix_fraction), data.shape[2:])
    seen = []
    for network, _ in trainer.branches().values():
        network.register_forward_pre_hook(lambda _, args: seen.append(args[0]) if torch.is_grad_enabled() else None)

    # Each branch's step by hand on a copy: L_sup on the unmixed batch plus L_cps of the mixed input against the
    # other branch's mixed labels from before either step, both gradients in one clipped SGD step.
    expected = in_process()
    networks = {name: unwrap(network) for name, (network, _) in expected.branches().items()}
    for name, (network, _) in trainer.branches().items():
        networks[name].load_state_dict(unwrap(network).state_dict())
    with torch.no_grad():
        labels = {name: first_output(network(data)).argmax(1, keepdim=True) for name, network in networks.items()}
    mixed = cutmix(data, mask)
    loss_sup = {}
    for (name, (_, optimizer)), other in zip(expected.branches().items(), ("b", "a")):
        network = networks[name]
        loss_sup[name] = expected.loss(network(data), target)
        loss_cps = cps_module.cross_pseudo_supervision_loss(first_output(network(mixed)), cutmix(labels[other], mask),
                                                            unlabeled_mask(cutmix(target[0], mask), IGNORE), "dice")
        optimizer.zero_grad()
        (loss_sup[name] + loss_cps).backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
        optimizer.step()

    torch.manual_seed(11)
    result = trainer.train_step(batch)
    assert [torch.equal(x, data) for x in seen] == [True, True, False, False]  # both clean passes, then the mixed
    assert all(torch.equal(x, mixed) for x in seen[2:])
    for name, (network, _) in trainer.branches().items():
        assert result[f"loss_sup_{name}"] == pytest.approx(loss_sup[name].item(), rel=1e-5)
        for key, value in unwrap(network).state_dict().items():
            assert torch.allclose(value, networks[name].state_dict()[key], atol=1e-6), (name, key)


@pytest.mark.parametrize("base", [CPSCutMixTrainer_mixedsup, CPSCutMixTrainer])
def test_added_random_patches_stay_out_of_the_supervised_loss_of_both_branches(in_process, base):
    class AddedPatches(base):
        random_patch_fraction = 0.0
        added_random_patches = 1.0

    trainer = in_process(AddedPatches)
    assert (trainer.batch_size, trainer.added_patches) == (4, 2)  # tiny plans: batch 2, as many added in front
    (batch,) = draw_batches(trainer, 1)
    seen = record_supervised_loss(trainer)
    inputs = []
    for network, _ in trainer.branches().values():
        network.register_forward_pre_hook(lambda _, args: inputs.append(len(args[0])) if torch.is_grad_enabled() else None)
    trainer.current_epoch = trainer.num_epochs // 2  # full CPS weight
    torch.manual_seed(3)
    trainer.train_step(batch)
    assert len(seen) == 2  # one supervised loss per branch
    # Every pass forwards all four patches (the clean ones also give the added patches' pseudo-labels).
    assert inputs == ([4, 4, 4, 4] if base.supervised_input == "clean" else [4, 4])
    for output, target in seen:
        assert [len(o) for o in output] == [2] * len(output) and [len(t) for t in target] == [2] * len(target)
        if base.supervised_input == "clean":  # the unmixed batch: exactly stock's two patches
            for got, expected in zip(target, batch["target"], strict=True):
                assert torch.equal(got, expected[2:])


def test_a_batch_without_unlabeled_voxels_logs_its_agreement_as_undefined(in_process):
    trainer = in_process()
    (batch,) = draw_batches(trainer, 1)
    # Every voxel annotated: the branches' agreement on unlabeled voxels is nan (left out of the epoch mean), not 0.
    annotated = {**batch, "target": [torch.where(t == IGNORE, 0, t) for t in batch["target"]]}
    assert np.isnan(trainer.train_step(annotated)["agreement"])


def test_identical_branches_agree_everywhere(in_process):
    trainer = in_process()
    unwrap(trainer.network_b).load_state_dict(unwrap(trainer.network).state_dict())
    (batch,) = draw_batches(trainer, 1)
    assert trainer.train_step(batch)["agreement"] == 1.0


def state_of(trainer):
    return {"a": copy.deepcopy(unwrap(trainer.network).state_dict()),
            "b": copy.deepcopy(unwrap(trainer.network_b).state_dict()),
            "optimizer_a": copy.deepcopy(trainer.optimizer.state_dict()),
            "optimizer_b": copy.deepcopy(trainer.optimizer_b.state_dict()), "epoch": trainer.current_epoch}


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_optimizer(a: dict, b: dict):
    assert json.dumps(a["param_groups"]) == json.dumps(b["param_groups"])
    assert a["state"].keys() == b["state"].keys() and a["state"]
    for slot, values in a["state"].items():
        assert_same_tensors(values, b["state"][slot])


def test_checkpoint_round_trip_resumes_the_exact_next_step(in_process, tmp_path):
    trainer = in_process()
    batches = draw_batches(trainer, 3)
    trainer.current_epoch = trainer.num_epochs // 2  # full CPS weight
    for batch in batches[:2]:
        trainer.train_step(batch)
    path = str(tmp_path / "checkpoint.pth")
    trainer.save_checkpoint(path)

    resumed = in_process()
    resumed.load_checkpoint(path)
    before, after = state_of(trainer), state_of(resumed)
    assert after["epoch"] == before["epoch"] + 1  # nnU-Net stores the epoch to continue with
    for name in ("a", "b"):
        assert_same_tensors(before[name], after[name])
        assert_same_optimizer(before[f"optimizer_{name}"], after[f"optimizer_{name}"])
    assert any(not torch.equal(before["a"][k], before["b"][k]) for k in before["a"])

    # The same next step (same batch, same CutMix boxes) gives the same weights for both networks.
    resumed.current_epoch = trainer.current_epoch
    for t in (trainer, resumed):
        torch.manual_seed(123)
        t.train_step(batches[2])
    assert_same_tensors(unwrap(trainer.network).state_dict(), unwrap(resumed.network).state_dict())
    assert_same_tensors(unwrap(trainer.network_b).state_dict(), unwrap(resumed.network_b).state_dict())


def test_resume_refuses_a_checkpoint_without_both_networks(in_process, tmp_path):
    trainer = in_process()
    path = str(tmp_path / "c.pth")
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["cps_branch_weights"]
    with pytest.raises(RuntimeError, match="lacks 'cps_branch_weights'.*Start without --c"):
        in_process().load_checkpoint(checkpoint)


def test_validation_scores_each_branch_like_stock_nnunet(in_process):
    trainer = in_process()
    (batch,) = draw_batches(trainer, 1)
    assert (batch["target"][0] == IGNORE).any()
    before = copy.deepcopy(batch)
    trainer.on_validation_epoch_start()
    with torch.no_grad():
        ours = trainer.validation_step(batch)
        for name, network in (("a", trainer.network), ("b", trainer.network_b)):
            with trainer.network_in_place(network):
                stock = nnUNetTrainer.validation_step(trainer, copy.deepcopy(before))
            for key, value in stock.items():
                np.testing.assert_array_equal(ours[f"{key}_{name}"], value)
    # nnU-Net's validation_step zeroes the ignore voxels of its target in place: ours leaves the batch intact.
    assert all(map(torch.equal, batch["target"], before["target"]))


def counts(tp, fp, fn) -> dict:
    return {"tp_hard": np.array(tp, float), "fp_hard": np.array(fp, float), "fn_hard": np.array(fn, float),
            "loss": np.array(0.5)}


def epoch_outputs(a: dict, b: dict) -> list[dict]:
    return [{**{f"{k}_a": v for k, v in a.items()}, **{f"{k}_b": v for k, v in b.items()}}]


def test_network_weights_follow_the_branch_with_the_better_ema_pseudo_dice(in_process, tmp_path):
    trainer = in_process()
    # Per class Dice 2 tp / (2 tp + fp + fn), averaged over the two foreground classes:
    #   epoch 0: a (4/6, 2/3) -> 2/3;  b (2/2, 0/2) -> 1/2.  EMA a 2/3, b 1/2               -> a
    #   epoch 1: a (0, 0) -> 0;        b (1, 1) -> 1.        EMA a 0.9 * 2/3 = 0.6, b 0.55   -> a
    #   epoch 2: a 0;                  b 1.                  EMA a 0.54, b 0.595             -> b
    zero, one = counts([0, 0], [1, 1], [1, 1]), counts([3, 3], [0, 0], [0, 0])
    table = [(counts([2, 1], [1, 0], [1, 1]), counts([1, 0], [0, 0], [0, 2]), 2 / 3, 1 / 2, "a", 2 / 3),
             (zero, one, 0.6, 0.55, "a", 0.0),
             (zero, one, 0.54, 0.595, "b", 1.0)]
    for epoch, (a, b, ema_a, ema_b, chosen, nnunet_dice) in enumerate(table):
        trainer.current_epoch = epoch
        trainer.on_validation_epoch_end(epoch_outputs(a, b))
        assert trainer.logger.get_value("ema_dice_a", step=-1) == pytest.approx(ema_a)
        assert trainer.logger.get_value("ema_dice_b", step=-1) == pytest.approx(ema_b)
        assert trainer.inference_name() == chosen
        assert trainer.logger.get_value("mean_fg_dice", step=-1) == pytest.approx(nnunet_dice)
    assert trainer.inference_network() is unwrap(trainer.network_b)
    path = tmp_path / "c.pth"
    trainer.save_checkpoint(str(path))
    saved = torch.load(path, map_location="cpu", weights_only=False)
    assert saved["cps_inference_network"] == "b"
    assert_same_tensors(saved["network_weights"], unwrap(trainer.network_b).state_dict())


def test_ensemble_is_what_validation_checkpoints_and_the_predictor_see(in_process, tmp_path):
    trainer = in_process(CPSCutMixTrainer_ensemble)
    ensemble = trainer.inference_network()
    assert isinstance(ensemble, SoftmaxEnsemble)
    assert list(ensemble.members) == [unwrap(trainer.network), unwrap(trainer.network_b)]  # shared, not copies
    (batch,) = draw_batches(trainer, 1)
    trainer.train_step(batch)  # changes the branches, and so the ensemble
    with torch.no_grad():
        outputs = trainer.validation_step(batch)
    assert {"tp_hard_a", "tp_hard_b", "tp_hard_ensemble"} <= outputs.keys()
    trainer.on_validation_epoch_end([outputs])
    ensemble_dice = np.nanmean([2 * t / (2 * t + p + n) for t, p, n in zip(
        outputs["tp_hard_ensemble"], outputs["fp_hard_ensemble"], outputs["fn_hard_ensemble"])])
    assert trainer.logger.get_value("mean_fg_dice", step=-1) == pytest.approx(ensemble_dice)

    path = tmp_path / "c.pth"
    trainer.save_checkpoint(str(path))
    weights = torch.load(path, map_location="cpu", weights_only=False)["network_weights"]
    # What nnUNetv2_predict does: build with the trainer's static method, deep supervision off, load network_weights.
    network = CPSCutMixTrainer_ensemble.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, trainer.num_input_channels,
        trainer.label_manager.num_segmentation_heads, enable_deep_supervision=False)
    network.load_state_dict(weights)
    network.eval()
    with torch.no_grad():
        trainer.set_deep_supervision_enabled(False)
        branches = [torch.softmax(unwrap(n)(batch["data"]), 1) for n in (trainer.network, trainer.network_b)]
        expected = torch.log((branches[0] + branches[1]) / 2)
        assert torch.allclose(network(batch["data"]), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------- DDP

def _ddp_cps_worker(rank: int, world_size: int, folder: str, env: dict, trainer_class: type) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)
    torch.manual_seed(rank)  # different initial weights and data per rank: DDP must make the networks agree
    trainer = build_trainer(trainer_class, TINY_DATASET_ID, "nnUNetPlans_tiny", scratch=f"{folder}/scratch{rank}")
    batches = draw_batches(trainer, 2)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size)
    try:
        # What nnU-Net's initialize does under DDP (there with device_ids=[rank], CUDA only): wrap every network,
        # and build the loss for DDP (batch Dice over ranks, no zero-weight deep-supervision output).
        trainer.is_ddp = True
        trainer.network, trainer.network_b = DDP(trainer.network), DDP(trainer.network_b)
        trainer.loss = trainer._build_loss()
        trainer.current_epoch = trainer.num_epochs // 2
        initial = {name: copy.deepcopy(unwrap(net).state_dict()) for name, (net, _) in trainer.branches().items()}
        for batch in batches:
            trainer.train_step(batch)
        # Per-branch pseudo Dice from this rank's counts, summed over ranks.
        counts_a = [counts([2, 1], [1, 0], [1, 1]), counts([0, 1], [0, 1], [1, 0])][rank]
        trainer.current_epoch = 0
        trainer.on_validation_epoch_end(epoch_outputs(counts_a, counts([1, 1], [0, 0], [0, 0])))
        torch.save({"initial": initial,
                    "final": {name: unwrap(net).state_dict() for name, (net, _) in trainer.branches().items()},
                    "val_dice_a": trainer.logger.get_value("val_dice_a", step=-1)}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed + gloo")
@pytest.mark.parametrize("trainer_class", [CPSCutMixTrainer_mixedsup, CPSCutMixTrainer])
def test_both_networks_stay_identical_on_ddp_ranks(tiny_dataset, tmp_path, trainer_class):
    env = {k: v for k, v in train_env(tiny_dataset.env).items() if k.startswith("nnUNet")}
    mp.start_processes(_ddp_cps_worker, args=(2, str(tmp_path), env, trainer_class), nprocs=2, join=True,
                       start_method="forkserver")
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2))
    for name in ("a", "b"):
        assert_same_tensors(rank0["final"][name], rank1["final"][name])  # gradients averaged over ranks
        assert any(not torch.equal(rank0["final"][name][k], v) for k, v in rank0["initial"][name].items())
    assert any(not torch.equal(rank0["final"]["a"][k], v) for k, v in rank0["final"]["b"].items())
    # Summed counts: tp (2, 2), fp (1, 1), fn (2, 1) -> Dice (4/7, 4/6), mean 13/21 on both ranks.
    assert rank0["val_dice_a"] == pytest.approx(13 / 21) and rank1["val_dice_a"] == pytest.approx(13 / 21)
