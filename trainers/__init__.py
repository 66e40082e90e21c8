"""nnUNetTrainer subclasses of nnunet-ext. Every name in ``__all__`` is a trainer nnU-Net finds via ``nnunet-ext env``."""

from nnunet_ext.trainers.cps import CPSCutMixTrainer, CPSCutMixTrainer_ensemble
from nnunet_ext.trainers.demo import MeanTeacherContinuityTrainer_demo, nnUNetTrainer_demo
from nnunet_ext.trainers.mean_teacher import (MeanTeacherContinuityTrainer, MeanTeacherContinuityTrainer_ema99,
                                              MeanTeacherTrainer, MeanTeacherTrainer_ema99)
from nnunet_ext.trainers.pseudo_label import PseudoLabelConfidenceTrainer, PseudoLabelWeightedTrainer

__all__ = [
    "MeanTeacherTrainer",
    "MeanTeacherContinuityTrainer",
    "MeanTeacherTrainer_ema99",
    "MeanTeacherContinuityTrainer_ema99",
    "CPSCutMixTrainer",
    "CPSCutMixTrainer_ensemble",
    "nnUNetTrainer_demo",
    "MeanTeacherContinuityTrainer_demo",
    "PseudoLabelWeightedTrainer",
    "PseudoLabelConfidenceTrainer",
]
