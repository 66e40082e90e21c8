"""Test-only trainer, found by nnU-Net because the tests prepend this folder to nnUNet_extTrainer.

Defined here on purpose (not in the package): it also exercises nnU-Net's multi-folder lookup. It is only
used with nnUNet_n_proc_DA=0, where nothing needs to pickle it.
"""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.trainers.budget import TrainingBudgetMixin


class nnUNetTrainer_exttest(TrainingBudgetMixin, nnUNetTrainer):
    budget_epochs = 2
    budget_iterations_per_epoch = 3
    budget_val_iterations_per_epoch = 1
