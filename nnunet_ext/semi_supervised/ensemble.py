"""Several segmentation networks as one: their softmax outputs are averaged."""

import torch
from torch import nn


class _DeepSupervisionSwitch:
    """What nnU-Net reads and sets as ``network.decoder.deep_supervision``, forwarded to every member."""

    def __init__(self, members: nn.ModuleList):
        self._members = members

    @property
    def deep_supervision(self) -> bool:
        return all(member.decoder.deep_supervision for member in self._members)

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        for member in self._members:
            member.decoder.deep_supervision = enabled


class SoftmaxEnsemble(nn.Module):
    """Returns ``log(mean_k softmax(member_k(x)))``, so that nnU-Net's softmax of the output is the members' average.

    nnU-Net treats the output as logits: its sliding-window and mirroring averages then act on it as on any logits.
    ``decoder.deep_supervision`` sets the members' flag; with it on, the output is one such average per
    resolution. The state dict holds the members under ``members.0.``, ``members.1.``, ...

    Args:
        *members: networks with the same input and output shapes (e.g. nnU-Net's from one plans), at least one.
    """

    def __init__(self, *members: nn.Module):
        super().__init__()
        if not members:
            raise ValueError("SoftmaxEnsemble needs at least one member network")
        self.members = nn.ModuleList(members)

    @property
    def decoder(self) -> _DeepSupervisionSwitch:
        return _DeepSupervisionSwitch(self.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(B, C_in, *spatial) -> float32 (B, C, *spatial) log-probabilities, or a list of them per resolution."""
        outputs = [member(x) for member in self.members]
        if isinstance(outputs[0], (list, tuple)):
            return [self._log_mean_softmax(level) for level in zip(*outputs)]
        return self._log_mean_softmax(outputs)

    @staticmethod
    def _log_mean_softmax(logits: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        mean = torch.stack([torch.softmax(l.float(), dim=1) for l in logits]).mean(0)
        # Clamp: a probability that underflows to 0 would give -inf, and 0 * -inf = nan in weighted averages.
        return torch.log(mean.clamp_min(torch.finfo(torch.float32).tiny))
