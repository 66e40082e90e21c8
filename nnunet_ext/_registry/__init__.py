"""The folder ``nnUNet_extTrainer`` points at (``nnunet-ext env`` prints the line).

nnU-Net imports every module in this folder as a *top-level* module and drops it again afterwards, so
no class may be defined here: the module below only re-exports the classes of ``nnunet_ext.trainers``,
which keeps them picklable and makes nnU-Net return the very same class objects.
"""
