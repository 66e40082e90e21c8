"""Re-exports our trainers for nnU-Net's ``nnUNet_extTrainer`` lookup (defined in nnunet_ext.trainers)."""

from nnunet_ext.trainers import *  # noqa: F401,F403
