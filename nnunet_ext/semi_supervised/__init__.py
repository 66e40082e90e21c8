"""Torch-only semi-supervised components (no nnU-Net imports): EMA teacher, ramp-ups and a cosine decay, strong intensity
perturbations, the unlabeled-voxel mask, the consistency / axial-continuity / cross-pseudo-supervision losses,
3D CutMix, a softmax-averaging ensemble, and pseudo-label targets with a voxel-weighted Dice + CE."""

from nnunet_ext.semi_supervised.consistency import sharpened_consistency_loss
from nnunet_ext.semi_supervised.continuity import axial_continuity_loss
from nnunet_ext.semi_supervised.cps import cross_pseudo_supervision_loss
from nnunet_ext.semi_supervised.cutmix import box_mask, cutmix, random_boxes, resize_mask
from nnunet_ext.semi_supervised.ema import EMATeacher, unwrap
from nnunet_ext.semi_supervised.ensemble import SoftmaxEnsemble
from nnunet_ext.semi_supervised.masks import unlabeled_mask
from nnunet_ext.semi_supervised.perturbations import StrongIntensityPerturbation
from nnunet_ext.semi_supervised.pseudo_label import VoxelWeightedDiceCE, split_pseudo_label_target
from nnunet_ext.semi_supervised.rampup import cosine_decay, linear_warmup, sigmoid_rampup

__all__ = [
    "EMATeacher",
    "SoftmaxEnsemble",
    "StrongIntensityPerturbation",
    "VoxelWeightedDiceCE",
    "axial_continuity_loss",
    "box_mask",
    "cosine_decay",
    "cross_pseudo_supervision_loss",
    "cutmix",
    "linear_warmup",
    "random_boxes",
    "resize_mask",
    "sharpened_consistency_loss",
    "sigmoid_rampup",
    "split_pseudo_label_target",
    "unlabeled_mask",
    "unwrap",
]
