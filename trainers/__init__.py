"""nnUNetTrainer subclasses of nnunet-ext. Every name in ``__all__`` is a trainer nnU-Net finds via ``nnunet-ext env``."""

from nnunet_ext.trainers.demo import MeanTeacherContinuityTrainer_demo, nnUNetTrainer_demo
from nnunet_ext.trainers.mean_teacher import MeanTeacherContinuityTrainer, MeanTeacherTrainer
from nnunet_ext.trainers.pseudo_label import PseudoLabelConfidenceTrainer, PseudoLabelWeightedTrainer

__all__ = [
    "MeanTeacherTrainer",
    "MeanTeacherContinuityTrainer",
    "nnUNetTrainer_demo",
    "MeanTeacherContinuityTrainer_demo",
    "PseudoLabelWeightedTrainer",
    "PseudoLabelConfidenceTrainer",
]
