"""Training length as class attributes: nnU-Net hard-codes 1000 epochs x 250 iterations in ``__init__``."""

import torch


class TrainingBudgetMixin:
    """Mix in before an nnUNetTrainer subclass; a variant changes only these attributes."""

    budget_epochs: int = 1000
    budget_iterations_per_epoch: int = 250
    budget_val_iterations_per_epoch: int = 50

    # Same signature as nnUNetTrainer: nnU-Net rebuilds trainers from their recorded init arguments.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.budget_epochs
        self.num_iterations_per_epoch = self.budget_iterations_per_epoch
        self.num_val_iterations_per_epoch = self.budget_val_iterations_per_epoch


def budget_variant(base: type, name: str, epochs: int, iterations: int, val_iterations: int, module: str) -> type:
    """``base`` on a budget of ``epochs`` x ``iterations`` (``val_iterations`` per validation), named ``name``.

    ``module`` is the ``__name__`` of the module that binds the class to ``name``, so it can be found again.
    """
    attributes = {"budget_epochs": epochs, "budget_iterations_per_epoch": iterations,
                  "budget_val_iterations_per_epoch": val_iterations, "__module__": module,
                  "__doc__": f"{base.__name__} on a budget of {epochs} epochs x {iterations} iterations."}
    return type(name, (TrainingBudgetMixin, base), attributes)
