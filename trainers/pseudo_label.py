"""2D -> 3D pseudo-label weighting (Castelli et al.): a 3D network trained on the sparse labels plus the labels a
2D network inferred for the unannotated voxels,

    L = L_s(annotated voxels) + alpha * L_p(ignore-label voxels against the pseudo-labels)

L_s is nnU-Net's own loss; L_p is the same Dice + CE (same Dice module, weights and deep supervision) restricted to
the ignore-label voxels. The pseudo-labels (``nnunet-ext pseudolabels``) are loaded as extra segmentation channels,
so every spatial transform and the deep-supervision downsampling move them with the image and the labels.
"""

import torch
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnunet_ext.pseudo_label_generation import (
    PseudoLabelDataset,
    load_record,
    missing_cases,
    pseudo_label_folder,
    pseudolabels_command,
)
from nnunet_ext.semi_supervised import VoxelWeightedDiceCE, split_pseudo_label_target, unlabeled_mask
from nnunet_ext.trainers.semi_supervised_base import AddedRandomPatches, SemiSupervisedTrainer, first_output


def nearest_segmentation_sampling(transforms):
    """Make nnU-Net's spatial transform sample every segmentation channel nearest-neighbour.

    Stock nnU-Net interpolates each segmentation channel label by label and takes the argmax. That would treat the
    confidence channel as categories, and it can pick different classes in the label and the pseudo-label channel
    at the same voxel (the ignore label competes in one, dense classes in the other). Nearest-neighbour reads all
    channels from the same source voxel. ``transforms``: nnU-Net's ``ComposeTransforms``; changed in place.
    """
    spatial = [t for t in transforms.transforms if isinstance(t, SpatialTransform)]
    if not spatial:
        raise RuntimeError("no SpatialTransform in the training transforms: the pseudo-label trainers expect "
                           "nnUNetTrainer.get_training_transforms")
    for transform in spatial:
        transform.mode_seg = "nearest"
    return transforms


class PseudoLabelWeightedTrainer(SemiSupervisedTrainer):
    """3D training on sparse labels + alpha-weighted 2D pseudo-labels on the ignore-label voxels (alpha = 0.5).

    On the 2d configuration (pseudo-labels made ``--to 2d``) it is 2D self-training: stock 2d centres its patches on
    annotated voxels, so it only ever sees the annotated slices; here the random-voxel patches are unannotated slices.
    Use the ``_addedpatches`` variants there: replacing half of 2d's small batch halves the supervised patches.
    """

    pseudo_label_weight: float = 0.5  # alpha
    # Multiply each voxel's weight by the source model's confidence in its pseudo-label (PseudoLabelConfidenceTrainer).
    confidence_weighting: bool = False
    # The configuration whose model creates the pseudo-labels: checked against their record, named in the fix command.
    pseudo_label_source: str = "2d"
    ssl_log_keys = ("loss_sup", "loss_pseudo", "pseudo_fraction", "mean_pseudo_weight")

    def initialize(self):
        if self.is_cascaded or self.label_manager.has_regions:
            raise RuntimeError(f"{type(self).__name__} needs a configuration without previous stage and a dataset "
                               f"without regions: pseudo-labels are one class per voxel in extra segmentation "
                               f"channels; train 2d or 3d_fullres of a label-based dataset")
        super().initialize()
        record = load_record(self.pseudo_label_folder())
        if record is None:
            raise RuntimeError(f"{type(self).__name__}: no pseudo-labels for fold {self.fold} in "
                               f"{self.pseudo_label_folder()}: create them with `{self.pseudo_label_fix()}`")
        source = record.get("source", {}).get("configuration")
        if source is not None and source != self.pseudo_label_source:  # `pseudolabels --from` another configuration
            raise RuntimeError(f"{type(self).__name__} learns from {self.pseudo_label_source} pseudo-labels, but those "
                               f"in {self.pseudo_label_folder()} come from {source}: recreate them with "
                               f"`{self.pseudo_label_fix()}`")
        self.print_to_log_file(f"pseudo-labels from {record['source']} in {self.pseudo_label_folder()} "
                               f"({record['validation_policy']})")
        self.pseudo_label_loss = self._build_pseudo_label_loss()

    def hyperparameters(self) -> dict:
        return {**super().hyperparameters(), "pseudo_label_weight": self.pseudo_label_weight,
                "confidence_weighting": self.confidence_weighting}

    def pseudo_label_folder(self):
        return pseudo_label_folder(self.preprocessed_dataset_folder_base, self.configuration_manager.data_identifier,
                                   self.fold)

    def pseudo_label_fix(self) -> str:
        """The exact command that creates this trainer's pseudo-labels."""
        return pseudolabels_command(self.plans_manager.dataset_name, self.plans_manager.plans_name, self.fold,
                                    self.configuration_name, self.pseudo_label_source)

    def _build_pseudo_label_loss(self):
        """L_p from the pieces of the trainer's own loss: its Dice module, CE/Dice weights and deep supervision."""
        loss, ds_weights = self.loss, None
        if isinstance(loss, DeepSupervisionWrapper):
            loss, ds_weights = loss.loss, loss.weight_factors
        if not isinstance(loss, DC_and_CE_loss):
            raise RuntimeError(f"{type(self).__name__} builds the pseudo-label loss from nnU-Net's DC_and_CE_loss, "
                               f"got {type(loss).__name__}: keep nnUNetTrainer._build_loss")
        pseudo = VoxelWeightedDiceCE(loss.dc, loss.weight_ce, loss.weight_dice)
        return DeepSupervisionWrapper(pseudo, ds_weights) if ds_weights is not None else pseudo

    # ---- data: pseudo-labels as segmentation channels 1 and 2 of the training cases
    def get_tr_and_val_datasets(self):
        train, val = super().get_tr_and_val_datasets()
        missing = missing_cases(self.pseudo_label_folder(), train.identifiers)
        if missing:
            raise RuntimeError(f"{type(self).__name__}: no pseudo-labels for {len(missing)} training cases of fold "
                               f"{self.fold} ({', '.join(missing[:3])}, ...) in {self.pseudo_label_folder()}: create "
                               f"them with `{self.pseudo_label_fix()}`")
        return PseudoLabelDataset(train, self.pseudo_label_folder(), self.pseudo_label_fix()), val

    @staticmethod
    def get_training_transforms(*args, **kwargs):
        transforms = super(PseudoLabelWeightedTrainer, PseudoLabelWeightedTrainer).get_training_transforms(*args,
                                                                                                          **kwargs)
        return nearest_segmentation_sampling(transforms)

    # ---- the step
    def voxel_weights(self, unlabeled: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """(B, 1, *spatial) weight of each voxel in L_p: alpha (x confidence) on unlabeled voxels, 0 elsewhere."""
        weight = confidence if self.confidence_weighting else torch.ones_like(confidence)
        return self.pseudo_label_weight * weight * unlabeled

    def split_targets(self, target):
        """nnU-Net's target (a tensor or a deep-supervision list) split into labels, pseudo-labels and L_p's voxel
        weights, each with the target's structure."""
        labels, pseudo_labels, weights = [], [], []
        for t in target if isinstance(target, list) else [target]:
            label, pseudo_label, confidence = split_pseudo_label_target(t)
            labels.append(label)
            pseudo_labels.append(pseudo_label)
            weights.append(self.voxel_weights(unlabeled_mask(label, self.label_manager.ignore_label), confidence))
        if isinstance(target, list):
            return labels, pseudo_labels, weights
        return labels[0], pseudo_labels[0], weights[0]

    def pseudo_label_term(self, output, pseudo_labels, weights) -> tuple[torch.Tensor, dict]:
        """L_p of the network's output and the values logged about it."""
        loss_pseudo = self.pseudo_label_loss(output, pseudo_labels, weights)
        full_resolution = first_output(weights)
        selected = full_resolution > 0
        # 0 / 0 = nan in a batch without pseudo-labelled voxels: the epoch mean then leaves that step out.
        return loss_pseudo, {"loss_pseudo": loss_pseudo.item(), "pseudo_fraction": selected.float().mean().item(),
                             "mean_pseudo_weight": (full_resolution.sum() / selected.sum()).item()}

    def train_step(self, batch: dict) -> dict:
        data, target = self.batch_to_device(batch)
        labels, pseudo_labels, weights = self.split_targets(target)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            output = self.network(data)
            loss_sup = self.supervised_loss(output, labels)
            loss_pseudo, logs = self.pseudo_label_term(output, pseudo_labels, weights)
            loss = loss_sup + loss_pseudo
        self.optimizer_step(loss)
        return {"loss": loss.detach().cpu().numpy(), "loss_sup": loss_sup.item(), **logs}


class PseudoLabelConfidenceTrainer(PseudoLabelWeightedTrainer):
    """The variant that weights each pseudo-labelled voxel by the 2D model's confidence instead of a constant."""

    pseudo_label_weight: float = 1.0
    confidence_weighting: bool = True


class PseudoLabelSelfTrainingTrainer(PseudoLabelWeightedTrainer):
    """Self-training: the pseudo-labels come from stock 3d_fullres itself (for isotropic data such as FIB-SEM, where
    3d_fullres beats 2d and a 2D source would hold the 3D network back)."""

    pseudo_label_source: str = "3d_fullres"


class PseudoLabelEnsembleTrainer(PseudoLabelWeightedTrainer):
    """The pseudo-labels come from the ensemble of stock 2d and stock 3d_fullres (their mean probability), so no
    choice of source configuration is needed: 2d is the better stock on anisotropic stacks, 3d_fullres on isotropic
    data."""

    pseudo_label_source: str = "2d+3d_fullres"


class PseudoLabelWeightedTrainer_addedpatches(AddedRandomPatches, PseudoLabelWeightedTrainer):
    """PseudoLabelWeightedTrainer with its random-voxel patches added to nnU-Net's batch instead of replacing half of
    it: on the 2d configuration (tiny plans: batch 2) replacing half halves the patches the supervised loss sees."""


class PseudoLabelEnsembleTrainer_addedpatches(AddedRandomPatches, PseudoLabelEnsembleTrainer):
    """PseudoLabelEnsembleTrainer with its random-voxel patches added (see PseudoLabelWeightedTrainer_addedpatches)."""
