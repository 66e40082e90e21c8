"""nnU-Net's data folders and dataset lookup, with one-line errors that say how to fix the setup."""

import os
from pathlib import Path

import nnunet_ext._registry
from nnunet_ext.errors import UserError

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
EXT_TRAINER_VAR = "nnUNet_extTrainer"


def registry_folder() -> str:
    """The installed folder that nnUNet_extTrainer must contain for nnU-Net to find our trainers."""
    return os.path.dirname(os.path.abspath(nnunet_ext._registry.__file__))


def ext_trainer_value(current: str | None) -> str:
    """nnUNet_extTrainer with our registry appended to ``current`` (unchanged if already there)."""
    ours = registry_folder()
    parts = [p for p in (current or "").split(os.pathsep) if p]
    return os.pathsep.join(parts if ours in parts else parts + [ours])


def require_folder(var: str) -> Path:
    """The folder named by environment variable ``var``; UserError if unset."""
    value = os.environ.get(var)
    if not value:
        raise UserError(f"{var} is not set: export {var}=/path/to/{var} "
                        f"(or run `eval \"$(nnunet-ext env --root DIR)\"` to set all nnU-Net folders)")
    return Path(value)


def nnunet_folders_beside(raw_dir: Path) -> list[Path]:
    """The nnUNet_preprocessed and nnUNet_results folders that belong with the raw folder ``raw_dir``.

    nnU-Net looks a dataset id up in all three folders and fails ("More than one dataset name found") when they
    disagree, so a new id must be free in each: the exported folders when ``raw_dir`` is $nnUNet_raw, else its
    siblings when it is named nnUNet_raw (the layout of `nnunet-ext env --root`, the demo and the benchmark).
    """
    raw_dir = Path(raw_dir).resolve()
    if os.environ.get("nnUNet_raw") and Path(os.environ["nnUNet_raw"]).resolve() == raw_dir:
        return [Path(os.environ[var]) for var in NNUNET_FOLDERS[1:] if os.environ.get(var)]
    if raw_dir.name == NNUNET_FOLDERS[0]:
        return [raw_dir.parent / var for var in NNUNET_FOLDERS[1:]]
    return []


def raw_output_folder(out: str | None) -> Path:
    """Where a command writes a raw dataset: ``--out`` when given, else $nnUNet_raw."""
    return Path(out) if out else require_folder("nnUNet_raw")


def dataset_folder(dataset: str | int, base_var: str = "nnUNet_preprocessed") -> Path:
    """Folder of a dataset given as id (``501``) or name (``Dataset501_X``) inside $base_var."""
    base = require_folder(base_var)
    text = str(dataset)
    if text.startswith("Dataset"):
        candidates = [base / text]
    elif text.isdigit() and 1 <= int(text) <= 999:
        candidates = sorted(base.glob(f"Dataset{int(text):03d}_*")) if base.is_dir() else []
    else:
        raise UserError(f"invalid dataset {text!r}: give a dataset id (1-999) or a name like Dataset501_Name")
    found = [c for c in candidates if c.is_dir()]
    if not found:
        hint = ("run `nnUNetv2_plan_and_preprocess -d ID` first" if base_var == "nnUNet_preprocessed"
                else "check the id or create the dataset first")
        raise UserError(f"dataset {text} not found in {base_var}={base}: {hint}")
    if len(found) > 1:
        raise UserError(f"dataset id {text} is ambiguous in {base}: {', '.join(f.name for f in found)}; "
                        f"pass the full dataset name")
    return found[0]
