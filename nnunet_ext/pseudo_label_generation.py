"""2D -> 3D pseudo-labels (Castelli et al., 2D+3D training on sparse annotations), stored beside nnU-Net's data.

A model of one configuration (the 2D network, ``2d``), or the mean of several (``2d+3d_fullres``: the 2D and 3D
networks' ensemble, averaged as ``nnUNetv2_ensemble`` does), predicts the training cases of a fold through nnU-Net's
predictor; its probabilities, which come back in the original image geometry, are brought into the preprocessed
geometry of another configuration (``3d_fullres``) exactly as nnU-Net's preprocessor moves the images (transpose,
crop to the stored bounding box, resample to the configuration's spacing). Per case one uint8 blosc2 array
(2, *preprocessed shape) is written: channel 0 the pseudo-label class, channel 1 its confidence x 255.

Layout, beside nnU-Net's preprocessed folders:
    $nnUNet_preprocessed/DatasetXXX/<data_identifier>_pseudolabels/fold_F/<case>.b2nd + pseudolabels.json

Fold policy: the pseudo-labels of fold F come from the 2D model of fold F and cover the training cases of fold F
only. Those are the cases the 2D model trained on (its sparse annotated slices label their unannotated voxels,
as in the paper); the 3D model of fold F trains on exactly these cases. Fold F's validation cases are excluded:
the 3D trainer never trains on them (validation scores its real annotations only), so nothing derived from them
reaches the 3D model, and neither model of fold F has seen them. ``pseudolabels.json`` records this.
"""

import hashlib
import json
import os
import secrets
import shutil
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import blosc2
import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice
from batchgenerators.utilities.file_and_folder_operations import load_json, load_pickle
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, infer_dataset_class
from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

from nnunet_ext.errors import UserError
from nnunet_ext.nnunet_paths import dataset_folder, require_folder
from nnunet_ext.plans import check_plans_name, complete_plans, load_plans
from nnunet_ext.semi_supervised.pseudo_label import CONFIDENCE_SCALE

RECORD_FILE = "pseudolabels.json"
FILE_ENDING = ".b2nd"
VALIDATION_POLICY = (
    "training cases of the fold only, labelled by the source model of the same fold (which trained on their "
    "annotated voxels); the fold's validation cases are excluded: the target model never trains on them and "
    "validation scores their real annotations, so nothing derived from them reaches it")


def parse_fold(fold) -> int | str:
    """nnU-Net's fold argument: an integer or ``'all'``."""
    if fold == "all":
        return "all"
    try:
        return int(fold)
    except (TypeError, ValueError):
        raise UserError(f"invalid fold {fold!r}: give an integer (0-4 for nnU-Net's 5-fold split) or 'all'") from None


def source_configurations(source: str) -> list[str]:
    """The configurations of a pseudo-label source: ``2d`` -> [2d], ``2d+3d_fullres`` -> [2d, 3d_fullres]."""
    configurations = source.split("+")
    if not all(configurations) or len(set(configurations)) != len(configurations):
        raise UserError(f"invalid --from {source!r}: give a configuration (e.g. 2d) or distinct configurations "
                        f"joined by + (e.g. 2d+3d_fullres) whose models' mean probability makes the pseudo-labels")
    return configurations


def source_description(source: str, to_configuration: str) -> str:
    """What a pseudo-label record's "method" says: which models' predictions became labels of which configuration."""
    configurations = source_configurations(source)
    models = (f"the mean probability of {' and '.join(configurations)}" if len(configurations) > 1
              else configurations[0])
    kind = "self-training" if configurations == [to_configuration] else "pseudo-labels"
    return f"{kind}: {models} -> {to_configuration}"


def pseudo_label_folder(preprocessed_dataset_folder: str | Path, data_identifier: str, fold: int | str) -> Path:
    """Where the pseudo-labels of one fold live for a configuration's preprocessed data (``data_identifier``)."""
    return Path(preprocessed_dataset_folder) / f"{data_identifier}_pseudolabels" / f"fold_{fold}"


def pseudolabels_command(dataset: str, plans: str, fold: int | str, to_configuration: str,
                         from_configuration: str = "2d", trainer: str = "nnUNetTrainer") -> str:
    """The ``nnunet-ext pseudolabels`` command line that creates the pseudo-labels of one fold."""
    return (f"nnunet-ext pseudolabels -d {dataset} --from {from_configuration} -tr {trainer} -p {plans} -f {fold} "
            f"--to {to_configuration}")


def load_record(folder: Path) -> dict | None:
    """The ``pseudolabels.json`` of a pseudo-label folder, or None when there is none."""
    path = Path(folder) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def missing_cases(folder: Path, identifiers) -> list[str]:
    """The identifiers without a pseudo-label file in ``folder``."""
    return [i for i in identifiers if not (Path(folder) / f"{i}{FILE_ENDING}").is_file()]


def fold_split(preprocessed_dataset_folder: Path, identifiers: list[str], fold: int | str) -> tuple[list, list]:
    """(training, validation) cases of a fold, from nnU-Net's ``splits_final.json`` (all cases for ``'all'``)."""
    if fold == "all":
        return sorted(identifiers), []
    splits_file = Path(preprocessed_dataset_folder) / "splits_final.json"
    if not splits_file.is_file():
        raise UserError(f"{splits_file} does not exist: train the source model of fold {fold} first "
                        f"(nnUNetv2_train writes the split)")
    splits = json.loads(splits_file.read_text())
    if not 0 <= fold < len(splits):
        raise UserError(f"fold {fold} is not in {splits_file} ({len(splits)} folds): add it there, or use a fold "
                        f"in 0..{len(splits) - 1} or 'all'")
    return list(splits[fold]["train"]), list(splits[fold]["val"])


# ---- geometry: the original image space -> a configuration's preprocessed space

def to_preprocessed_geometry(probabilities: np.ndarray, properties: dict, plans_manager,
                             configuration_manager) -> np.ndarray:
    """Bring per-class maps from the original image geometry into a configuration's preprocessed geometry.

    The same steps as nnU-Net's ``DefaultPreprocessor.run_case_npy`` applies to an image: ``transpose_forward``,
    crop to ``properties['bbox_used_for_cropping']``, resample from the original to the configuration's spacing
    with the configuration's ``resampling_fn_probabilities``.

    Args:
        probabilities: (C, *original shape) float, in the axis order of nnU-Net's image reader (as nnU-Net's
            predictor returns probabilities).
        properties: the case's preprocessed ``.pkl`` properties of the target configuration.
        plans_manager, configuration_manager: nnU-Net's managers of the target plans and configuration.

    Returns:
        (C, *preprocessed shape) float32.
    """
    transpose = plans_manager.transpose_forward
    if probabilities.ndim != 1 + len(transpose):
        raise ValueError(f"probabilities must be (C, *spatial) with {len(transpose)} spatial dims, "
                         f"got {probabilities.shape}")
    transposed = probabilities.transpose([0, *[i + 1 for i in transpose]])
    if tuple(transposed.shape[1:]) != tuple(properties["shape_before_cropping"]):
        raise ValueError(f"probabilities of shape {probabilities.shape[1:]} do not match the preprocessed case "
                         f"(shape before cropping {tuple(properties['shape_before_cropping'])} after transpose "
                         f"{transpose})")
    cropped = transposed[(slice(None), *bounding_box_to_slice(properties["bbox_used_for_cropping"]))]
    original_spacing = [properties["spacing"][i] for i in transpose]
    target_spacing = list(configuration_manager.spacing)
    if len(target_spacing) < len(original_spacing):  # a 2d configuration keeps the spacing between slices
        target_spacing = [original_spacing[0], *target_spacing]
    new_shape = compute_new_shape(cropped.shape[1:], original_spacing, target_spacing)
    resampled = configuration_manager.resampling_fn_probabilities(np.ascontiguousarray(cropped, dtype=np.float32),
                                                                  new_shape, original_spacing, target_spacing)
    return np.asarray(resampled, dtype=np.float32)


def pseudo_label_array(probabilities: np.ndarray) -> np.ndarray:
    """(C, *spatial) class probabilities -> (2, *spatial) uint8: argmax class, max probability x 255 (rounded)."""
    if probabilities.ndim < 2 or probabilities.shape[0] > 256:
        raise ValueError(f"probabilities must be (C, *spatial) with at most 256 classes, got {probabilities.shape}")
    labels = probabilities.argmax(0).astype(np.uint8)
    confidence = np.rint(np.clip(probabilities.max(0), 0, 1) * CONFIDENCE_SCALE).astype(np.uint8)
    return np.stack([labels, confidence])


def save_pseudo_labels(array: np.ndarray, folder: Path, identifier: str, patch_size) -> Path:
    """Write one case's (2, *spatial) uint8 array as blosc2, chunked for patch reads like nnU-Net's data."""
    blocks, chunks = comp_blosc2_params(array.shape, tuple(patch_size), array.itemsize)
    path = Path(folder) / f"{identifier}{FILE_ENDING}"
    blosc2.asarray(np.ascontiguousarray(array), urlpath=str(path), chunks=chunks, blocks=blocks, mode="w")
    return path


def write_record(folder: Path, record: dict) -> Path:
    path = Path(folder) / RECORD_FILE
    path.write_text(json.dumps(record, indent=2))
    return path


def replace_folder(tmp: Path, target: Path) -> None:
    """Move a finished work folder into place, replacing an older version of it."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old)
    else:
        os.rename(tmp, target)


# ---- reading them back as extra segmentation channels

class StackedChannels:
    """Lazy channel-wise concatenation of (C_i, *spatial) arrays (blosc2 or numpy), read as int16 on indexing.

    nnU-Net's data loader only reads ``shape``/``dtype`` and slices patches (``seg[:, z0:z1, y0:y1, x0:x1]``), so
    only the patch is decompressed from each part.
    """

    def __init__(self, parts):
        spatial = {tuple(p.shape[1:]) for p in parts}
        if len(spatial) != 1:
            raise ValueError(f"parts must share their spatial shape, got {[tuple(p.shape) for p in parts]}")
        self.parts = parts
        self.shape = (sum(p.shape[0] for p in parts), *spatial.pop())
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.int16)

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            return self[:][key]
        channels, spatial = key[0], key[1:]
        stacked = np.concatenate([np.asarray(p[(slice(None), *spatial)]).astype(np.int16) for p in self.parts])
        return stacked[channels]

    def __array__(self, dtype=None, copy=None):
        return self[:] if dtype is None else self[:].astype(dtype)


class PseudoLabelDataset:
    """Wraps an nnU-Net dataset: ``load_case`` returns seg as (3, *spatial) = labels, pseudo-label, confidence."""

    def __init__(self, dataset, folder: Path, fix: str):
        self.dataset = dataset
        self.identifiers = dataset.identifiers
        self.folder = str(folder)
        self.fix = fix  # the command that recreates the pseudo-labels, for errors

    def __len__(self) -> int:
        return len(self.identifiers)

    def load_case(self, identifier: str):
        data, seg, seg_prev, properties = self.dataset.load_case(identifier)
        pseudo = blosc2.open(urlpath=os.path.join(self.folder, identifier + FILE_ENDING), mode="r",
                             dparams={"nthreads": 1}, **({} if os.name == "nt" else {"mmap_mode": "r"}))
        if tuple(pseudo.shape[1:]) != tuple(seg.shape[1:]):
            raise RuntimeError(f"pseudo-labels of {identifier} in {self.folder} have shape {pseudo.shape[1:]}, the "
                               f"preprocessed case {seg.shape[1:]}: the data was preprocessed again; recreate them "
                               f"with `{self.fix}`")
        return data, StackedChannels((seg, pseudo)), seg_prev, properties


# ---- the command

def mean_probabilities(predictors, image: np.ndarray, image_properties: dict) -> np.ndarray:
    """The predictors' mean class probabilities of one image, in its original geometry (where each model returns
    them, so they average voxel by voxel); summed in place, so a second model costs one volume more, not a stack."""
    total = predictors[0].predict_single_npy_array(image, image_properties, save_or_return_probabilities=True)[1]
    for predictor in predictors[1:]:
        total += predictor.predict_single_npy_array(image, image_properties, save_or_return_probabilities=True)[1]
    if len(predictors) > 1:
        total /= len(predictors)
    return total


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def torch_device(name: str) -> torch.device:
    """The torch device of a -device option; UserError when this machine lacks it."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA is not available on this machine: pass -device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("MPS is not available on this machine: pass -device cpu")
    return torch.device(name)


def create_pseudolabels(dataset: str | int, from_configuration: str = "2d", to_configuration: str = "3d_fullres",
                        trainer: str = "nnUNetTrainer", fold: int | str = 0, plans: str = "nnUNetPlans",
                        checkpoint: str = "checkpoint_final.pth", device: str = "cuda", use_mirroring: bool = True,
                        progress=print) -> Path:
    """``nnunet-ext pseudolabels``: pseudo-label the training cases of ``fold`` for ``to_configuration``.

    Args:
        dataset: dataset id or name (preprocessed for ``to_configuration``, raw images in $nnUNet_raw).
        from_configuration, trainer, plans, fold, checkpoint: the source model
            ``$nnUNet_results/Dataset/<trainer>__<plans>__<from_configuration>/fold_<fold>/<checkpoint>``;
            configurations joined by ``+`` (``2d+3d_fullres``) average the probabilities of their models.
        to_configuration: the configuration of ``plans`` whose preprocessed geometry the pseudo-labels follow.
        device: ``cuda``, ``cpu`` or ``mps``, as for ``nnUNetv2_predict``.
        use_mirroring: nnU-Net's mirroring test-time augmentation.
        progress: called with one line per written case.

    Returns:
        The folder of the pseudo-labels (see the module docstring). An existing one is replaced atomically.
    """
    fold = parse_fold(fold)
    preprocessed = dataset_folder(dataset)
    dataset_name = preprocessed.name
    plans_file = preprocessed / f"{check_plans_name(plans, '-p')}.json"
    if not plans_file.is_file():
        raise UserError(f"plans {plans!r} not found in {preprocessed}: pass -p with one of "
                        f"{', '.join(sorted(p.stem for p in preprocessed.glob('*Plans*.json'))) or 'none'}")
    plans_manager = PlansManager(load_plans(plans_file))
    if to_configuration not in plans_manager.available_configurations:
        raise UserError(f"configuration {to_configuration!r} is not in {plans_file.name} (available: "
                        f"{', '.join(plans_manager.available_configurations)})")
    dataset_json_file = preprocessed / "dataset.json"
    if not dataset_json_file.is_file():
        raise UserError(f"{preprocessed} has no dataset.json: rerun `nnUNetv2_plan_and_preprocess -d "
                        f"{dataset_name}` (it copies the raw dataset's dataset.json there)")
    dataset_json = load_json(str(dataset_json_file))
    with complete_plans(plans_file):  # nnU-Net's managers read keys lazily: read here all that is used below
        configuration_manager = plans_manager.get_configuration(to_configuration)
        previous_stage = configuration_manager.previous_stage_name
        data_identifier = configuration_manager.data_identifier
        _ = (plans_manager.transpose_forward, configuration_manager.spacing, configuration_manager.patch_size,
             configuration_manager.resampling_fn_probabilities)
        label_manager = plans_manager.get_label_manager(dataset_json)
    if previous_stage is not None:
        raise UserError(f"{to_configuration} is a cascade stage: its segmentation channels are taken by the previous "
                        f"stage; use a configuration without previous stage (e.g. 3d_fullres)")
    if label_manager.has_regions:
        raise UserError("region-based datasets are not supported: pseudo-labels are one class per voxel")
    data_folder = preprocessed / data_identifier
    if not data_folder.is_dir():
        raise UserError(f"{data_folder} does not exist: run `nnUNetv2_preprocess -d {dataset_name} -c "
                        f"{to_configuration} -plans_name {plans}` first")

    results = require_folder("nnUNet_results") / dataset_name
    checkpoints = {}  # configuration -> the checkpoint file of its source model
    for configuration in source_configurations(from_configuration):
        model_folder = results / convert_trainer_plans_config_to_identifier(trainer, plans, configuration)
        checkpoints[configuration] = model_folder / f"fold_{fold}" / checkpoint
        if not checkpoints[configuration].is_file():
            raise UserError(f"no source model at {checkpoints[configuration]}: train it with `nnUNetv2_train "
                            f"{dataset_name} {configuration} {fold} -tr {trainer} -p {plans}` (or pass "
                            f"-tr/-p/-f/--checkpoint)")

    dataset_class = infer_dataset_class(str(data_folder))
    identifiers = dataset_class.get_identifiers(str(data_folder))
    train_cases, val_cases = fold_split(preprocessed, identifiers, fold)
    raw_files = get_filenames_of_train_images_and_targets(str(dataset_folder(dataset_name, "nnUNet_raw")),
                                                          dataset_json)
    absent = [c for c in train_cases if c not in raw_files]
    if absent:
        raise UserError(f"raw images of {', '.join(absent[:3])} not found in the raw dataset {dataset_name}: "
                        f"the raw and preprocessed datasets must be the same")

    predictors = []
    for checkpoint_file in checkpoints.values():
        predictor = nnUNetPredictor(use_mirroring=use_mirroring, device=torch_device(device), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(checkpoint_file.parent.parent), (fold,), checkpoint)
        predictors.append(predictor)
    reader = predictors[0].plans_manager.image_reader_writer_class()

    target = pseudo_label_folder(preprocessed, configuration_manager.data_identifier, fold)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        for n, case in enumerate(train_cases, 1):
            image, image_properties = reader.read_images(raw_files[case]["images"])
            probabilities = mean_probabilities(predictors, image, image_properties)
            properties = load_pickle(str(data_folder / f"{case}.pkl"))
            try:
                array = pseudo_label_array(to_preprocessed_geometry(probabilities, properties, plans_manager,
                                                                    configuration_manager))
            except ValueError as error:
                raise UserError(f"{case}: {error}: the raw image changed since preprocessing; rerun "
                                f"nnUNetv2_preprocess for {to_configuration}") from None
            preprocessed_shape = dataset_class(str(data_folder), [case]).load_case(case)[1].shape[1:]
            if array.shape[1:] != tuple(preprocessed_shape):
                raise UserError(f"{case}: the pseudo-labels came out as {array.shape[1:]}, the preprocessed case is "
                                f"{tuple(preprocessed_shape)}: rerun nnUNetv2_preprocess for {to_configuration}")
            save_pseudo_labels(array, tmp, case, configuration_manager.patch_size)
            progress(f"[{n}/{len(train_cases)}] {case}: pseudo-labels {array.shape[1:]}")
        write_record(tmp, {
            "method": source_description(from_configuration, to_configuration),
            "source": {"trainer": trainer, "plans": predictors[0].plans_manager.plans_name,
                       "configuration": from_configuration, "fold": fold, "use_mirroring": use_mirroring,
                       "models": [{"configuration": configuration, "checkpoint": str(file),
                                   "checkpoint_sha256": _sha256(file)} for configuration, file in checkpoints.items()]},
            "target": {"plans": plans, "configuration": to_configuration,
                       "data_identifier": configuration_manager.data_identifier},
            "fold": fold,
            "cases": train_cases,
            "excluded_validation_cases": val_cases,
            "validation_policy": VALIDATION_POLICY,
            "channels": ["pseudo_label", f"confidence_x{CONFIDENCE_SCALE}"],
            "labels": dataset_json["labels"],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "nnunetv2_version": version("nnunetv2"),
        })
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _run(args) -> None:
    folder = create_pseudolabels(args.dataset, args.from_configuration, args.to_configuration, args.trainer,
                                 args.fold, args.plans, args.checkpoint, args.device, not args.disable_tta)
    record = load_record(folder)
    print(f"wrote pseudo-labels of {len(record['cases'])} training cases to {folder} (validation cases excluded: "
          f"{', '.join(record['excluded_validation_cases']) or 'none'})")


def register_cli(subparsers) -> None:
    """Add ``pseudolabels`` to the top-level ``nnunet-ext`` subcommands (``argparse`` subparsers)."""
    summary = ("pseudo-label a fold's training cases with a trained model (e.g. 2d) in the preprocessed geometry of "
               "another configuration (e.g. 3d_fullres), for PseudoLabelWeightedTrainer")
    parser = subparsers.add_parser("pseudolabels", help=summary, description=summary)
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    parser.add_argument("--from", dest="from_configuration", default="2d",
                        help="configuration of the model that predicts (default 2d); several joined by + "
                             "(2d+3d_fullres) average their models' probabilities")
    parser.add_argument("--to", dest="to_configuration", default="3d_fullres",
                        help="configuration whose preprocessed data the pseudo-labels follow (default 3d_fullres)")
    parser.add_argument("-tr", "--trainer", default="nnUNetTrainer",
                        help="trainer of that model (default nnUNetTrainer)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier of both (default nnUNetPlans)")
    parser.add_argument("-f", "--fold", default="0", help="fold of the model and of the 3D training (default 0)")
    parser.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file name")
    parser.add_argument("-device", "--device", default="cuda", choices=("cuda", "cpu", "mps"),
                        help="as for nnUNetv2_predict (default cuda)")
    parser.add_argument("--disable-tta", action="store_true", help="no mirroring test-time augmentation (faster)")
    parser.set_defaults(func=_run)
