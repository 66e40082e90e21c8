"""The trainers ``nnunet-ext demo`` compares, all on one short CPU budget."""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.trainers.budget import TrainingBudgetMixin
from nnunet_ext.trainers.mean_teacher import MeanTeacherContinuityTrainer_ema99


class DemoBudget(TrainingBudgetMixin):
    """The short budget of ``nnunet-ext demo`` (CPU, tiny plans), the same for every trainer it compares."""

    # Few long epochs: nnU-Net's per-epoch plotting and checkpointing cost about a second each on CPU.
    budget_epochs = 25
    budget_iterations_per_epoch = 40
    budget_val_iterations_per_epoch = 4


class nnUNetTrainer_demo(DemoBudget, nnUNetTrainer):
    """Stock nnU-Net on the demo budget: the reference."""


class MeanTeacherContinuityTrainer_demo(DemoBudget, MeanTeacherContinuityTrainer_ema99):
    """MeanTeacherContinuityTrainer on the demo budget, with the short-budget EMA decay 0.99 (see the README)."""
