"""Training length as class attributes: nnU-Net hard-codes 1000 epochs x 250 iterations in ``__init__``."""

import torch


class TrainingBudgetMixin:
    """Mix in before an nnUNetTrainer subclass; a variant changes only these attributes."""

    budget_epochs: int = 1000
    budget_iterations_per_epoch: int = 250
    budget_val_iterations_per_epoch: int = 50

    # Same signature as nnUNetTrainer: nnU-Net rebuilds trainers from their recorded init arguments.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.budget_epochs
        self.num_iterations_per_epoch = self.budget_iterations_per_epoch
        self.num_val_iterations_per_epoch = self.budget_val_iterations_per_epoch
