"""nnUNetTrainer subclasses of nnunet-ext. Every name in ``__all__`` is a trainer nnU-Net finds via ``nnunet-ext env``."""

from nnunet_ext.trainers.cps import CPSCutMixTrainer, CPSCutMixTrainer_ensemble
from nnunet_ext.trainers.demo import MeanTeacherContinuityTrainer_demo, nnUNetTrainer_demo
from nnunet_ext.trainers.mean_teacher import MeanTeacherContinuityTrainer, MeanTeacherTrainer

__all__ = [
    "MeanTeacherTrainer",
    "MeanTeacherContinuityTrainer",
    "CPSCutMixTrainer",
    "CPSCutMixTrainer_ensemble",
    "nnUNetTrainer_demo",
    "MeanTeacherContinuityTrainer_demo",
]
