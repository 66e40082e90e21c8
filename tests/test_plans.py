"""plans.py: the generic variant helper and the tiny variant, on a hand-built plans file."""

import json

import pytest
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_ext.errors import UserError
from nnunet_ext.plans import (
    attention_feature_maps,
    derive_attention_plans,
    derive_plans,
    derive_tiny_plans,
    resolve_configuration,
)


def architecture(dim: int, strides: list, features: list) -> dict:
    n = len(strides)
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n, "features_per_stage": features,
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": [[3] * dim] * n, "strides": strides,
            "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def stock_plans() -> dict:
    return {
        "dataset_name": "Dataset042_Hand", "plans_name": "nnUNetPlans",
        "configurations": {
            "2d": {"data_identifier": "nnUNetPlans_2d", "batch_size": 12, "patch_size": [192, 160],
                   "architecture": architecture(2, [[1, 1], [2, 2], [2, 2], [2, 2]], [32, 64, 128, 256])},
            "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2, "patch_size": [20, 160, 160],
                           "architecture": architecture(3, [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                                                        [32, 64, 128, 256, 320])},
            "3d_lowres": {"inherits_from": "3d_fullres", "data_identifier": "nnUNetPlans_3d_lowres",
                          "patch_size": [30, 20, 64]},
        },
    }


@pytest.fixture
def preprocessed(tmp_path, monkeypatch):
    folder = tmp_path / "Dataset042_Hand"
    folder.mkdir()
    (folder / "nnUNetPlans.json").write_text(json.dumps(stock_plans()))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    return folder


def test_resolve_configuration_applies_the_parent_first():
    resolved = resolve_configuration(stock_plans(), "3d_lowres")
    assert resolved["patch_size"] == [30, 20, 64]
    assert resolved["batch_size"] == 2
    assert "inherits_from" not in resolved


def test_tiny_variant_values(preprocessed):
    path = derive_tiny_plans(42)
    assert path == preprocessed / "nnUNetPlans_tiny.json"
    tiny = json.loads(path.read_text())
    assert tiny["plans_name"] == "nnUNetPlans_tiny"
    full = tiny["configurations"]["3d_fullres"]
    # Strides of the first 3 stages multiply to (2, 4, 4): 20 stays, 160 -> 32 in-plane.
    assert full["patch_size"] == [20, 32, 32]
    assert full["batch_size"] == 2
    kwargs = full["architecture"]["arch_kwargs"]
    assert kwargs["n_stages"] == 3
    assert kwargs["features_per_stage"] == [8, 16, 32]
    assert kwargs["strides"] == [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    assert kwargs["n_conv_per_stage"] == [1, 1, 1] and kwargs["n_conv_per_stage_decoder"] == [1, 1]
    assert full["data_identifier"] == "nnUNetPlans_3d_fullres"
    assert tiny["configurations"]["2d"]["patch_size"] == [64, 64]
    lowres = tiny["configurations"]["3d_lowres"]
    # 30 is divisible by 2 along z; 20 < 32 along y becomes 20 (divisible by 4); 64 -> 32.
    assert lowres["inherits_from"] == "3d_fullres" and lowres["patch_size"] == [30, 20, 32]
    assert lowres["data_identifier"] == "nnUNetPlans_3d_lowres"
    # The source plans are untouched.
    assert json.loads((preprocessed / "nnUNetPlans.json").read_text()) == stock_plans()


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres", "3d_lowres"])
def test_tiny_networks_build_and_run_on_their_patch(preprocessed, configuration):
    plans = PlansManager(str(derive_tiny_plans(42)))
    config = plans.get_configuration(configuration)
    network = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                     config.network_arch_init_kwargs_req_import, 1, 3, deep_supervision=True)
    with torch.no_grad():
        outputs = network(torch.zeros(1, 1, *config.patch_size))
    assert outputs[0].shape == (1, 3, *config.patch_size)


def test_derive_plans_applies_the_edit_to_every_configuration(preprocessed):
    seen = []

    def edit(name, config):
        seen.append((name, config["batch_size"]))
        return {"batch_size": config["batch_size"] + 1}

    derived = json.loads(derive_plans("Dataset042_Hand", "nnUNetPlans", "nnUNetPlans_bs", edit).read_text())
    assert seen == [("2d", 12), ("3d_fullres", 2), ("3d_lowres", 2)]
    assert [derived["configurations"][c]["batch_size"] for c in ("2d", "3d_fullres", "3d_lowres")] == [13, 3, 3]


@pytest.mark.parametrize("dataset, source, target, message", [
    (43, "nnUNetPlans", "x", "dataset 43 not found"),
    (42, "nnUNetResEncUNetMPlans", "x", "plans 'nnUNetResEncUNetMPlans' not found"),
    (42, "nnUNetPlans", "nnUNetPlans", "equals its source"),
    ("abc", "nnUNetPlans", "x", "invalid dataset"),
])
def test_bad_input_names_the_fix_and_writes_nothing(preprocessed, dataset, source, target, message):
    with pytest.raises(UserError, match=message):
        derive_plans(dataset, source, target, lambda name, config: {})
    assert sorted(p.name for p in preprocessed.iterdir()) == ["nnUNetPlans.json"]


def test_unset_preprocessed_folder_is_reported(monkeypatch):
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    with pytest.raises(UserError, match="nnUNet_preprocessed is not set"):
        derive_tiny_plans(42)


ATTENTION_UNET = "nnunet_ext.architectures.axial_attention_unet.AxialAttentionPlainConvUNet"


def test_attention_variant_swaps_the_class_and_adds_the_kwargs(preprocessed):
    path = derive_attention_plans(42)
    assert path == preprocessed / "nnUNetPlans_axialattn.json"
    variant = json.loads(path.read_text())
    assert variant["plans_name"] == "nnUNetPlans_axialattn"
    for name in ("2d", "3d_fullres", "3d_lowres"):
        stock = resolve_configuration(stock_plans(), name)
        config = resolve_configuration(variant, name)
        assert config["architecture"]["network_class_name"] == ATTENTION_UNET
        kwargs = dict(config["architecture"]["arch_kwargs"])
        assert [kwargs.pop(k) for k in ("attention_stages", "attention_heads", "attention_gates")] == [2, 4, False]
        assert kwargs == stock["architecture"]["arch_kwargs"]
        assert config["data_identifier"] == stock["data_identifier"]
        assert config["patch_size"] == stock["patch_size"]
    assert json.loads((preprocessed / "nnUNetPlans.json").read_text()) == stock_plans()


def test_attention_variant_on_top_of_tiny_plans(preprocessed):
    derive_tiny_plans(42)
    path = derive_attention_plans(42, "nnUNetPlans_tiny", stages=1, heads=2, gates=True)
    assert path.name == "nnUNetPlans_tiny_axialattn.json"
    config = json.loads(path.read_text())["configurations"]["3d_fullres"]
    kwargs = config["architecture"]["arch_kwargs"]
    assert (kwargs["n_stages"], kwargs["attention_stages"], kwargs["attention_heads"], kwargs["attention_gates"]) == (
        3, 1, 2, True)
    # Tiny 3d_fullres: patch (20, 32, 32), strides (1,1,1), (1,2,2): the deepest decoder stage at (20, 16, 16).
    assert attention_feature_maps(config, 1) == [(16, [20, 16, 16])]


def test_attention_feature_maps_of_the_deepest_decoder_stages():
    config = stock_plans()["configurations"]["3d_fullres"]
    # Patch (20, 160, 160); the decoder's deepest stage merges encoder stage 3, whose strides multiply to
    # (1·1·2·2, 1·2·2·2, 1·2·2·2) = (4, 8, 8): (5, 20, 20); the next one stage 2, (2, 4, 4): (10, 40, 40).
    assert attention_feature_maps(config, 2) == [(256, [5, 20, 20]), (128, [10, 40, 40])]
    assert attention_feature_maps(config, 0) == []


def other_network_plans() -> dict:
    plans = stock_plans()
    plans["configurations"]["2d"]["architecture"]["network_class_name"] = "dynamic_network_architectures." \
        "architectures.primus.Primus"
    return plans


@pytest.mark.parametrize("options, message", [
    ({"stages": 4}, "--stages 4: configuration '2d' has 3 decoder stages, choose 0..3"),
    ({"stages": -1}, "--stages -1"),
    ({"heads": 3}, r"--heads 3: twice the heads must divide the channels of the attention stages of configuration "
                   r"'2d' \(128, 64\)"),
    ({"heads": 0}, "--heads 0"),
    ({"plans": other_network_plans()}, "configuration '2d' uses dynamic_network_architectures.architectures.primus"
                                       ".Primus: `plans attention` extends PlainConvUNet and ResidualEncoderUNet"),
])
def test_bad_attention_options_name_the_fix_and_write_nothing(preprocessed, options, message):
    if "plans" in options:
        (preprocessed / "nnUNetPlans.json").write_text(json.dumps(options.pop("plans")))
    with pytest.raises(UserError, match=message):
        derive_attention_plans(42, **options)
    assert sorted(p.name for p in preprocessed.iterdir()) == ["nnUNetPlans.json"]
