"""Test-only trainers, found by nnU-Net because the tests prepend this folder to nnUNet_extTrainer.

Defined here on purpose (not in the package): they also exercise nnU-Net's multi-folder lookup. They are only
used with nnUNet_n_proc_DA=0, where nothing needs to pickle them.
"""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.trainers import CPSCutMixTrainer, CPSCutMixTrainer_ensemble, MeanTeacherContinuityTrainer
from nnunet_ext.trainers.budget import TrainingBudgetMixin


class TestBudget(TrainingBudgetMixin):
    budget_epochs = 2
    budget_iterations_per_epoch = 3
    budget_val_iterations_per_epoch = 1


class nnUNetTrainer_exttest(TestBudget, nnUNetTrainer):
    pass


class MeanTeacherContinuityTrainer_exttest(TestBudget, MeanTeacherContinuityTrainer):
    pass


class CPSCutMixTrainer_exttest(TestBudget, CPSCutMixTrainer):
    pass


class CPSCutMixTrainer_ensemble_exttest(TestBudget, CPSCutMixTrainer_ensemble):
    pass
