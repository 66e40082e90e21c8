"""nnU-Net v2 extensions for sparsely annotated 3D microscopy."""

__version__ = "0.1.0"
