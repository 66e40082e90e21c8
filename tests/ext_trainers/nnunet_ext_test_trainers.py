"""Test-only trainers, found by nnU-Net because the tests prepend this folder to nnUNet_extTrainer.

Defined here on purpose (not in the package): they also exercise nnU-Net's multi-folder lookup. They are only
used with nnUNet_n_proc_DA=0, where nothing needs to pickle them.
"""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.trainers import (
    CPSCutMixTrainer,
    CPSCutMixTrainer_ensemble,
    CPSCutMixTrainer_mixedsup,
    MeanTeacherContinuityTrainer,
    MeanTeacherContinuityTrainer_ema99_addedpatches,
    MeanTeacherTrainer,
    PseudoLabelEnsembleTrainer,
    PseudoLabelSelfTrainingTrainer,
    PseudoLabelWeightedTrainer,
    PseudoLabelWeightedTrainer_addedpatches,
)
from nnunet_ext.trainers.budget import TrainingBudgetMixin


class TestBudget(TrainingBudgetMixin):
    budget_epochs = 2
    budget_iterations_per_epoch = 3
    budget_val_iterations_per_epoch = 1


class NoFinalValidation:
    """For a run whose final validation no test looks at: skips it (its two spawned worker pools take most of a
    tiny run's time). The benchmark tests and the ensemble test still run it for every trainer family."""

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("final validation skipped (test trainer)")


class nnUNetTrainer_exttest(TestBudget, nnUNetTrainer):
    pass


class nnUNetTrainer_exttest_noval(NoFinalValidation, nnUNetTrainer_exttest):
    pass


class MeanTeacherTrainer_exttest_noval(NoFinalValidation, TestBudget, MeanTeacherTrainer):
    pass


class MeanTeacherContinuityTrainer_exttest_noval(NoFinalValidation, TestBudget, MeanTeacherContinuityTrainer):
    pass


class MeanTeacherContinuityTrainer_addedpatches_exttest_noval(NoFinalValidation, TestBudget,
                                                             MeanTeacherContinuityTrainer_ema99_addedpatches):
    pass


class PseudoLabelWeightedTrainer_exttest_noval(NoFinalValidation, TestBudget, PseudoLabelWeightedTrainer):
    pass


class PseudoLabelWeightedTrainer_addedpatches_exttest_noval(NoFinalValidation, TestBudget,
                                                           PseudoLabelWeightedTrainer_addedpatches):
    pass


class PseudoLabelSelfTrainingTrainer_exttest_noval(NoFinalValidation, TestBudget, PseudoLabelSelfTrainingTrainer):
    pass


class PseudoLabelEnsembleTrainer_exttest_noval(NoFinalValidation, TestBudget, PseudoLabelEnsembleTrainer):
    pass


class CPSCutMixTrainer_exttest_noval(NoFinalValidation, TestBudget, CPSCutMixTrainer):
    pass


class CPSCutMixTrainer_ensemble_exttest(TestBudget, CPSCutMixTrainer_ensemble):
    pass


class CPSCutMixTrainer_mixedsup_exttest_noval(NoFinalValidation, TestBudget, CPSCutMixTrainer_mixedsup):
    pass
