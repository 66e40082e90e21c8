"""nnUNetTrainer subclasses of nnunet-ext. Every name in ``__all__`` is a trainer nnU-Net finds via ``nnunet-ext env``."""

from nnunet_ext.trainers.budget import nnUNetTrainer_demo

__all__ = ["nnUNetTrainer_demo"]
