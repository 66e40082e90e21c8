"""`nnunet-ext plans attention` on the shared tiny dataset: stock nnU-Net trains and predicts with it."""

import json

import numpy as np
import pytest
import torch
from conftest import assert_predicts_the_test_volume, cli, train_env

from nnunet_ext.architectures import AxialAttentionPlainConvUNet, SequentialAxialAttention
from nnunet_ext.plans import derive_attention_plans
from nnunet_ext.trainer_in_process import draw_batches
from nnunet_ext.trainers import MeanTeacherContinuityTrainer

pytestmark = pytest.mark.integration
PLANS = "nnUNetPlans_tiny_axialattn"
TRAINER = "nnUNetTrainer_exttest_noval"  # final validation is not looked at


def test_stock_trainer_trains_and_predicts_with_attention_plans(tiny_dataset):
    env, ds = tiny_dataset.env, str(tiny_dataset.dataset_id)
    written = cli("nnunet-ext", "plans", "attention", "-d", ds, "-p", "nnUNetPlans_tiny", "-o", PLANS, "--stages", "1",
                  "--gates", env=env)
    # Tiny plans: features 8/16/32, patch (16, 32, 32), strides (1,1,1), (1,2,2), (2,2,2): the deeper decoder
    # stage runs at (16, 16, 16) with 16 channels (the other one at full resolution: too slow for this test).
    assert "3d_fullres: axial attention (4 heads) on 16 x 16x16x16; attention gates on every skip" in written.stdout
    preprocessed = next((tiny_dataset.root / "nnUNet_preprocessed").glob("Dataset007_*"))
    tiny = json.loads((preprocessed / "nnUNetPlans_tiny.json").read_text())["configurations"]["3d_fullres"]
    plans = json.loads((preprocessed / f"{PLANS}.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    assert plans["plans_name"] == PLANS and config["data_identifier"] == tiny["data_identifier"]
    assert config["architecture"]["network_class_name"] == (f"{AxialAttentionPlainConvUNet.__module__}."
                                                            f"{AxialAttentionPlainConvUNet.__name__}")
    kwargs = config["architecture"]["arch_kwargs"]
    assert (kwargs["attention_stages"], kwargs["attention_heads"], kwargs["attention_gates"]) == (1, 4, True)
    assert {k: v for k, v in kwargs.items() if not k.startswith("attention_")} == tiny["architecture"]["arch_kwargs"]

    cli("nnUNetv2_train", ds, "3d_fullres", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu", env=train_env(env))
    fold = next((tiny_dataset.root / "nnUNet_results").glob(f"Dataset007_*/{TRAINER}__{PLANS}__3d_fullres/fold_0"))
    weights = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    assert "decoder.gates.1.psi.weight" in weights and "decoder.attention.1.out.weight" not in weights
    assert weights["decoder.attention.0.out.weight"].abs().sum() > 0  # trained away from its zero start

    assert_predicts_the_test_volume(tiny_dataset, TRAINER, plans=PLANS)


def test_too_many_attention_stages_is_one_error_line(tiny_dataset):
    result = cli("nnunet-ext", "plans", "attention", "-d", str(tiny_dataset.dataset_id), "-p", "nnUNetPlans_tiny",
                 "-o", "nnUNetPlans_tiny_attn3", "--stages", "3", env=tiny_dataset.env, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "nnunet-ext: error: --stages 3: configuration '2d' has 2 decoder stages, choose 0..2"]
    assert not list((tiny_dataset.root / "nnUNet_preprocessed").glob("Dataset007_*/nnUNetPlans_tiny_attn3.json"))


def test_mean_teacher_continuity_trains_the_attention_network(tiny_env, build_in_process):
    """Mean Teacher + continuity on attention plans: the student and its EMA teacher both carry the attention blocks."""
    derive_attention_plans(tiny_env.dataset_id, "nnUNetPlans_tiny", "nnUNetPlans_tiny_axialattn_mt")
    trainer = build_in_process(MeanTeacherContinuityTrainer, "nnUNetPlans_tiny_axialattn_mt")
    trainer.current_epoch = trainer.num_epochs // 2  # both SSL losses at full weight
    (batch,) = draw_batches(trainer, 1)
    loss = trainer.train_step(batch)["loss"]
    assert np.isfinite(loss)
    for network in (trainer.network, trainer.teacher.module):
        assert sum(isinstance(m, SequentialAxialAttention) for m in network.modules()) == 2
