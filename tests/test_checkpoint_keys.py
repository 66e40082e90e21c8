"""Our trainers write their checkpoints themselves, with a copy of nnU-Net's key list: every key stock nnUNetTrainer
writes must be in ours, so that an nnunetv2 upgrade that adds a key fails here."""

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.trainers import CPSCutMixTrainer, MeanTeacherTrainer

pytestmark = pytest.mark.integration


def saved_keys(trainer, path) -> set[str]:
    trainer.save_checkpoint(str(path))
    return set(torch.load(path, map_location="cpu", weights_only=False))


# PseudoLabelWeightedTrainer is left out: it does not initialize without pseudo-label files.
@pytest.mark.parametrize("trainer_class", [MeanTeacherTrainer, CPSCutMixTrainer])
def test_checkpoint_holds_every_key_of_stock_nnunet(build_in_process, tmp_path, trainer_class):
    stock_keys = saved_keys(build_in_process(nnUNetTrainer), tmp_path / "stock.pth")
    ours = tmp_path / "ours.pth"
    our_keys = saved_keys(build_in_process(trainer_class), ours)
    assert stock_keys <= our_keys, (f"missing {sorted(stock_keys - our_keys)}: update SemiSupervisedTrainer's "
                                    f"save_checkpoint/load_checkpoint to nnUNetTrainer's")
    build_in_process(trainer_class).load_checkpoint(str(ours))
