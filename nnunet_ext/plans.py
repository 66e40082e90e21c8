"""Plans variants derived from nnU-Net's auto-configured plans.

A variant keeps every configuration's ``data_identifier``, so it trains on the preprocessed data that
``nnUNetv2_plan_and_preprocess`` already wrote; select it with ``nnUNetv2_train ... -p <variant>``.
"""

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import deepcopy
from functools import partial
from pathlib import Path

import numpy as np

from nnunet_ext.errors import UserError, replace_text
from nnunet_ext.nnunet_paths import dataset_folder

# (configuration name, resolved configuration) -> keys to set in that configuration of the variant
ConfigurationEdit = Callable[[str, dict], dict]

TINY_PLANS = "nnUNetPlans_tiny"
TINY_STAGES = 3
TINY_FEATURES = (8, 16, 32)
TINY_BATCH_SIZE = 2
# Largest patch edge per dimensionality: small enough for sub-second CPU iterations, large enough for 3 stages.
TINY_PATCH_EDGE = {2: 64, 3: 32}

ATTENTION_SUFFIX = "_axialattn"
# Stock U-Net class (last component of its dotted name, as nnU-Net's own fallback lookup) -> attention variant
ATTENTION_NETWORKS = {
    "PlainConvUNet": "nnunet_ext.architectures.axial_attention_unet.AxialAttentionPlainConvUNet",
    "ResidualEncoderUNet": "nnunet_ext.architectures.axial_attention_unet.AxialAttentionResEncUNet",
}


# A plans identifier names <identifier>.json in the dataset's preprocessed folder and a results folder part
# (<trainer>__<plans>__<configuration>): a plain name, never a path.
_PLANS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def check_plans_name(name, option: str) -> str:
    """``name`` if it is a plain plans identifier; UserError otherwise (``-o ../../x`` would write elsewhere)."""
    if not isinstance(name, str) or not _PLANS_NAME.fullmatch(name):
        raise UserError(f"invalid plans identifier {name!r} for {option}: use letters, digits, '_' or '-' (no path), "
                        f"e.g. nnUNetPlans_tiny")
    return name


def load_plans(path: Path) -> dict:
    """A plans file as a dict with a ``configurations`` mapping; UserError naming the file if it is truncated
    (not JSON) or incomplete, so that nnU-Net's own code does not fail later with a traceback."""
    try:
        plans = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid JSON ({getattr(error, 'msg', error)}), the file is truncated or damaged: "
                        f"rerun nnUNetv2_plan_and_preprocess (or the command that wrote it)") from None
    configurations = plans.get("configurations") if isinstance(plans, dict) else None
    if not isinstance(configurations, dict) or not all(isinstance(c, dict) for c in configurations.values()):
        raise UserError(f"{path}: incomplete plans (no 'configurations' mapping): rerun nnUNetv2_plan_and_preprocess "
                        f"(or the command that wrote it)")
    return plans


@contextmanager
def complete_plans(path: Path) -> Iterator[None]:
    """Inside, a key missing from the plans at ``path`` (KeyError) becomes one UserError line naming the file."""
    try:
        yield
    except KeyError as error:
        raise UserError(f"{path}: incomplete plans (no key {error}): rerun nnUNetv2_plan_and_preprocess "
                        f"(or the command that wrote it)") from None


def resolve_configuration(plans: dict, name: str) -> dict:
    """A configuration with its ``inherits_from`` chain applied (parents first), like nnU-Net's PlansManager."""
    configuration = deepcopy(plans["configurations"][name])
    parent = configuration.pop("inherits_from", None)
    if parent is None:
        return configuration
    resolved = resolve_configuration(plans, parent)
    resolved.update(configuration)
    return resolved


def derive_plans(dataset: str | int, source: str, target: str, edit: ConfigurationEdit) -> Path:
    """Write ``<target>.json`` beside ``<source>.json`` in the dataset's preprocessed folder.

    Args:
        dataset: dataset id or name in ``$nnUNet_preprocessed``.
        source: plans identifier to derive from, e.g. ``nnUNetPlans``.
        target: plans identifier of the new variant (its ``plans_name``).
        edit: called once per configuration with the resolved configuration; the keys it returns are set
            in that configuration (inheritance links are kept).
    Returns:
        Path of the written plans file (written atomically).
    """
    check_plans_name(source, "-p")
    check_plans_name(target, "-o")
    folder = dataset_folder(dataset)
    source_file = folder / f"{source}.json"
    if not source_file.is_file():
        available = sorted(p.stem for p in folder.glob("*Plans*.json"))
        raise UserError(f"plans {source!r} not found in {folder} (available: {', '.join(available) or 'none'}): "
                        f"run `nnUNetv2_plan_and_preprocess -d ID` or pass -p with one of these")
    if target == source:
        raise UserError(f"the variant name {target!r} equals its source plans: choose another name")
    plans = load_plans(source_file)
    derived = deepcopy(plans)
    derived["plans_name"] = target
    with complete_plans(source_file):
        for name in plans["configurations"]:
            derived["configurations"][name].update(edit(name, resolve_configuration(plans, name)))
    path = folder / f"{target}.json"
    replace_text(path, json.dumps(derived, indent=4))  # nnU-Net's own plans layout (indent 4, keys in order)
    return path


def tiny_configuration(name: str, configuration: dict) -> dict:
    """CPU-sized edit of one configuration: 3 stages of 8/16/32 features, one conv each, patch <= 32^3 (64^2).

    Strides and kernel sizes are the first stages of the auto-configured ones, so the anisotropy handling of
    the original plans is kept; each patch edge stays divisible by the network's total stride along it.
    """
    architecture = deepcopy(configuration["architecture"])
    kwargs = architecture["arch_kwargs"]
    n_stages = min(TINY_STAGES, kwargs["n_stages"])
    strides = kwargs["strides"][:n_stages]
    total_stride = np.prod(np.array(strides, dtype=int), axis=0)
    cap = TINY_PATCH_EDGE[len(configuration["patch_size"])]
    patch_size = [int(max(s, min(p, cap) // s * s)) for p, s in zip(configuration["patch_size"], total_stride)]
    kwargs.update(
        n_stages=n_stages,
        features_per_stage=[min(f, t) for f, t in zip(kwargs["features_per_stage"], TINY_FEATURES)],
        strides=strides,
        kernel_sizes=kwargs["kernel_sizes"][:n_stages],
        n_conv_per_stage_decoder=[1] * (n_stages - 1),
    )
    # PlainConvUNet counts convs per stage, the residual encoder U-Nets count blocks.
    for key in ("n_conv_per_stage", "n_blocks_per_stage"):
        if key in kwargs:
            kwargs[key] = [1] * n_stages
    return {"patch_size": patch_size, "batch_size": TINY_BATCH_SIZE, "architecture": architecture}


def derive_tiny_plans(dataset: str | int, source: str = "nnUNetPlans", target: str = TINY_PLANS) -> Path:
    """``nnunet-ext plans tiny``: a CPU-sized variant of ``source`` on the same preprocessed data."""
    return derive_plans(dataset, source, target, tiny_configuration)


def attention_configuration(name: str, configuration: dict, stages: int = 2, heads: int = 4,
                            gates: bool = False) -> dict:
    """Edit of one configuration: the same U-Net with axial attention in its ``stages`` deepest decoder stages.

    Every plans kwarg is kept; the network class becomes its attention variant (plain-conv or residual
    encoder) and ``attention_stages``, ``attention_heads``, ``attention_gates`` are added.
    """
    architecture = deepcopy(configuration["architecture"])
    source_class = architecture["network_class_name"]
    target_class = ATTENTION_NETWORKS.get(source_class.rsplit(".", 1)[-1])
    if target_class is None:
        raise UserError(f"configuration {name!r} uses {source_class}: `plans attention` extends PlainConvUNet "
                        f"and ResidualEncoderUNet plans (nnUNetPlans, the ResEnc presets); pass -p with one of those")
    kwargs = architecture["arch_kwargs"]
    decoder_stages = kwargs["n_stages"] - 1
    if not 0 <= stages <= decoder_stages:
        raise UserError(f"--stages {stages}: configuration {name!r} has {decoder_stages} decoder stages, "
                        f"choose 0..{decoder_stages}")
    channels = [channels for channels, _ in attention_feature_maps(configuration, stages)]
    if heads < 1 or any(c % (2 * heads) for c in channels):
        raise UserError(f"--heads {heads}: twice the heads must divide the channels of the attention stages of "
                        f"configuration {name!r} ({', '.join(map(str, channels))}), since queries and keys "
                        f"have half of them: choose fewer heads, e.g. 4")
    architecture["network_class_name"] = target_class
    kwargs.update(attention_stages=stages, attention_heads=heads, attention_gates=gates)
    return {"architecture": architecture}


def attention_feature_maps(configuration: dict, stages: int) -> list[tuple[int, list[int]]]:
    """(channels, feature-map size) of the ``stages`` deepest decoder stages of a configuration's U-Net for its
    patch size, deepest first: where axial attention goes and what its cost grows with."""
    kwargs = configuration["architecture"]["arch_kwargs"]
    n_stages, features = kwargs["n_stages"], kwargs["features_per_stage"]
    features = [features] * n_stages if isinstance(features, int) else features
    strides = np.array([[s] * len(configuration["patch_size"]) if isinstance(s, int) else s
                        for s in kwargs["strides"]], dtype=int)
    maps = []
    for s in range(stages):
        level = n_stages - 2 - s  # the encoder stage whose skip this decoder stage merges
        size = np.array(configuration["patch_size"]) // np.prod(strides[:level + 1], axis=0)
        maps.append((int(features[level]), [int(v) for v in size]))
    return maps


def derive_attention_plans(dataset: str | int, source: str = "nnUNetPlans", target: str | None = None,
                           stages: int = 2, heads: int = 4, gates: bool = False) -> Path:
    """``nnunet-ext plans attention``: ``source`` with axial attention (``<source>_axialattn`` by default)."""
    edit = partial(attention_configuration, stages=stages, heads=heads, gates=gates)
    return derive_plans(dataset, source, source + ATTENTION_SUFFIX if target is None else target, edit)
