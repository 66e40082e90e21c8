"""build_trainer sets cuDNN up as nnUNetv2_train does, so GPU step times match real training."""

import pytest
import torch

import nnunet_ext.trainer_in_process as in_process


class _StopAfterSetup(Exception):
    """Raised where build_trainer would start reading the dataset: what it did before is what is checked."""


def _stop(*args, **kwargs):
    raise _StopAfterSetup


def test_nnunet_cudnn_settings_autotune_and_allow_nondeterminism(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    in_process.use_nnunet_cudnn_settings()
    assert torch.backends.cudnn.benchmark is True
    assert torch.backends.cudnn.deterministic is False


@pytest.mark.parametrize(("device", "expected_calls"), [("cuda", 1), ("cuda:0", 1), ("cpu", 0)])
def test_build_trainer_uses_nnunet_cudnn_settings_on_gpus_only(monkeypatch, device, expected_calls):
    calls = []
    monkeypatch.setattr(in_process, "use_nnunet_cudnn_settings", lambda: calls.append(device))
    monkeypatch.setattr(in_process, "dataset_folder", _stop)
    with pytest.raises(_StopAfterSetup):
        in_process.build_trainer(object, 1, "nnUNetPlans", device=device)
    assert len(calls) == expected_calls
