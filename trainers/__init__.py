"""nnUNetTrainer subclasses of nnunet-ext. Every name in ``__all__`` is a trainer nnU-Net finds via ``nnunet-ext env``."""

from nnunet_ext.trainers.cps import (
    CPSCutMixTrainer,
    CPSCutMixTrainer_cleansup,
    CPSCutMixTrainer_ensemble,
    CPSCutMixTrainer_mixedsup,
)
from nnunet_ext.trainers.demo import MeanTeacherContinuityTrainer_demo, nnUNetTrainer_demo
from nnunet_ext.trainers.mean_teacher import (
    MeanTeacherContinuityTrainer,
    MeanTeacherContinuityTrainer_ema99,
    MeanTeacherContinuityTrainer_ema99_paperloss,
    MeanTeacherContinuityTrainer_paper,
    MeanTeacherTrainer,
    MeanTeacherTrainer_ema99,
    MeanTeacherTrainer_ema99_paperloss,
    MeanTeacherTrainer_paper,
)
from nnunet_ext.trainers.mean_teacher_ablation import (
    MeanTeacherContinuityTrainer_ema99_addedpatches,
    MeanTeacherContinuityTrainer_ema99_fixed,
    MeanTeacherContinuityTrainer_ema99_fixed_edgeaware,
    MeanTeacherContinuityTrainer_ema99_fixed_edgeaware_noperturb,
    MeanTeacherContinuityTrainer_ema99_stocksampling,
    MeanTeacherTrainer_ema99_addedpatches,
    MeanTeacherTrainer_ema99_cleansup,
    MeanTeacherTrainer_ema99_fixed,
    MeanTeacherTrainer_ema99_fixed_noperturb,
    MeanTeacherTrainer_ema99_fixed_nossl,
    MeanTeacherTrainer_ema99_fixed_nossl_stocksampling,
    MeanTeacherTrainer_ema99_fixed_twoviews,
    MeanTeacherTrainer_ema99_lambda1,
    MeanTeacherTrainer_ema99_nossl,
    MeanTeacherTrainer_ema99_rawconf,
)
from nnunet_ext.trainers.mean_teacher_pseudo_label import (
    MeanTeacherContinuityPseudoLabelTrainer,
    MeanTeacherContinuityPseudoLabelTrainer_ema99,
)
from nnunet_ext.trainers.pseudo_label import (
    PseudoLabelConfidenceTrainer,
    PseudoLabelEnsembleTrainer,
    PseudoLabelSelfTrainingTrainer,
    PseudoLabelWeightedTrainer,
)

__all__ = [
    "MeanTeacherTrainer",
    "MeanTeacherContinuityTrainer",
    "MeanTeacherTrainer_ema99",
    "MeanTeacherContinuityTrainer_ema99",
    "MeanTeacherTrainer_paper",
    "MeanTeacherContinuityTrainer_paper",
    "MeanTeacherTrainer_ema99_paperloss",
    "MeanTeacherContinuityTrainer_ema99_paperloss",
    "MeanTeacherTrainer_ema99_nossl",
    "MeanTeacherTrainer_ema99_lambda1",
    "MeanTeacherTrainer_ema99_rawconf",
    "MeanTeacherTrainer_ema99_cleansup",
    "MeanTeacherTrainer_ema99_fixed",
    "MeanTeacherTrainer_ema99_fixed_nossl",
    "MeanTeacherTrainer_ema99_fixed_nossl_stocksampling",
    "MeanTeacherTrainer_ema99_fixed_noperturb",
    "MeanTeacherTrainer_ema99_fixed_twoviews",
    "MeanTeacherContinuityTrainer_ema99_fixed",
    "MeanTeacherContinuityTrainer_ema99_fixed_edgeaware",
    "MeanTeacherContinuityTrainer_ema99_fixed_edgeaware_noperturb",
    "MeanTeacherTrainer_ema99_addedpatches",
    "MeanTeacherContinuityTrainer_ema99_addedpatches",
    "MeanTeacherContinuityTrainer_ema99_stocksampling",
    "CPSCutMixTrainer",
    "CPSCutMixTrainer_ensemble",
    "CPSCutMixTrainer_cleansup",
    "CPSCutMixTrainer_mixedsup",
    "nnUNetTrainer_demo",
    "MeanTeacherContinuityTrainer_demo",
    "PseudoLabelWeightedTrainer",
    "PseudoLabelConfidenceTrainer",
    "PseudoLabelSelfTrainingTrainer",
    "PseudoLabelEnsembleTrainer",
    "MeanTeacherContinuityPseudoLabelTrainer",
    "MeanTeacherContinuityPseudoLabelTrainer_ema99",
]
