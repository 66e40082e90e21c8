"""Cross Pseudo Supervision with 3D CutMix (Chen et al. 2021; Pagano et al. 2023 on sparse FIB-SEM annotations).

Two networks A and B from the same plans, independently initialised. Every step mixes the batch with one CutMix box
per sample, and each network is trained with

    L_k = L_sup(out_k(batch), target) + lambda(t) * L_cps(out_k(mixed batch), mixed pseudo-labels of the other network)

L_sup is nnU-Net's own Dice + CE with the ignore label on the unmixed batch, stock nnU-Net's, as Chen et al. and
French et al. mix only for the unsupervised term; L_cps (soft Dice, or CE) counts the mixed target's ignore voxels
only. The pseudo-labels are the other network's argmax on the *unmixed* batch, mixed with the same box. lambda is 0
for the first 5 % of training, linear to full weight at 20 %, then constant. Per network and step: a forward and
backward pass on each of the two batches, each graph freed before the next forward; the unmixed passes of both
networks come first, before either steps, and their argmax maps are the pseudo-labels.

``supervised_input = "mixed"`` (``CPSCutMixTrainer_mixedsup``, Pagano et al.'s recipe) trains L_sup on the mixed
input and target in the same pass as L_cps: one forward and backward per network and step (the pseudo-labels from a
forward pass under no_grad), and lower Dice on this project's benchmarks.

Memory: the networks' forward/backward passes run one after the other, so one step holds the activations of one
network at a time, as stock nnU-Net does (and, in the clean recipe, both networks' gradients between the passes).
"""

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_ext.semi_supervised import (
    SoftmaxEnsemble,
    box_mask,
    cross_pseudo_supervision_loss,
    cutmix,
    linear_warmup,
    random_boxes,
    unlabeled_mask,
    unwrap,
)
from nnunet_ext.semi_supervised.cps import CPS_LOSSES
from nnunet_ext.trainers.semi_supervised_base import SemiSupervisedTrainer, first_output

BRANCHES = ("a", "b")
SUPERVISED_INPUTS = ("mixed", "clean")


class CPSCutMixTrainer(SemiSupervisedTrainer):
    """CPS + CutMix; ``checkpoint['network_weights']`` is the branch with the better EMA validation pseudo Dice.

    Deep supervision: the supervised loss uses every resolution. The CutMix mask is drawn at full resolution and
    downsampled to each deep-supervision target by nearest-exact selection, the rule by which nnU-Net downsampled the
    targets themselves, so every mixed low-resolution target is exactly the downsampled mixed full-resolution target
    (``nnunet_ext.semi_supervised.cutmix``). L_cps uses the full-resolution output only, as the pseudo-labels are
    full-resolution argmax maps.

    Validation scores both branches on every validation batch; each branch keeps an EMA of its pseudo Dice
    (nnU-Net's 0.9 / 0.1 rule, logged as ``ema_dice_a`` / ``ema_dice_b``, so it resumes with the checkpoint), and
    the branch with the higher EMA (A on a tie) is the inference network: nnU-Net's own pseudo Dice, checkpoint_best
    and ``network_weights`` follow it.
    """

    cps_weight: float = 1.0
    cps_warmup: tuple[float, float] = (0.05, 0.20)  # fractions of training: 0 until the first, full from the second
    cps_loss: str = "dice"  # or "ce"
    cutmix_fraction: tuple[float, float] = (0.25, 0.5)  # of the patch volume covered by the box
    branch_dice_ema: float = 0.9  # nnU-Net's EMA of the pseudo Dice
    supervised_input: str = "clean"  # or "mixed": L_sup on the CutMix-ed batch, as Pagano et al. supervise
    ssl_log_keys = ("loss_sup_a", "loss_sup_b", "loss_cps", "lambda_cps", "agreement")
    ssl_validation_log_keys = ("val_dice_a", "val_dice_b", "ema_dice_a", "ema_dice_b")

    @staticmethod
    def build_branch_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                  num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        """One of the two networks: nnU-Net's network from the plans."""
        return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)

    def initialize(self):
        self._check_hyperparameters()
        # nnU-Net's initialize builds self.network with build_network_architecture, which nnUNetv2_predict calls too:
        # that may be the exported pair (the ensemble variant), while training needs one branch per network.
        self.build_network_architecture = self.build_branch_architecture
        try:
            super().initialize()  # branch A: self.network, self.optimizer, self.lr_scheduler (DDP, compile)
        finally:
            del self.build_network_architecture
        # Built after A from the same random stream: an independent initialisation (DDP copies rank 0's to all).
        self.network_b, self.optimizer_b, self.lr_scheduler_b = self._build_branch_b()

    def _check_hyperparameters(self) -> None:
        name = type(self).__name__
        start, end = self.cps_warmup
        low, high = self.cutmix_fraction
        for ok, what in [(self.cps_loss in CPS_LOSSES, f"cps_loss must be one of {CPS_LOSSES}, got {self.cps_loss!r}"),
                         (0 <= start < end, f"cps_warmup must be (start, end) with 0 <= start < end, got "
                                            f"{self.cps_warmup}"),
                         (0 < low <= high <= 1, f"cutmix_fraction must be (low, high) with 0 < low <= high <= 1, "
                                                f"got {self.cutmix_fraction}"),
                         (0 <= self.branch_dice_ema < 1, f"branch_dice_ema must be in [0, 1), got "
                                                         f"{self.branch_dice_ema}"),
                         (self.supervised_input in SUPERVISED_INPUTS, f"supervised_input must be one of "
                                                                      f"{SUPERVISED_INPUTS}, got "
                                                                      f"{self.supervised_input!r}")]:
            if not ok:
                raise RuntimeError(f"{name}: {what}; fix the class attribute in your trainer variant")

    def _build_branch_b(self):
        network = self.build_branch_architecture(self.plans_manager, self.configuration_manager,
                                                 self.num_input_channels, self.label_manager.num_segmentation_heads,
                                                 self.enable_deep_supervision).to(self.device)
        if self._do_i_compile():
            network = torch.compile(network)
        with self.network_in_place(network):  # the same optimizer and schedule as A, whatever a variant configures
            optimizer, lr_scheduler = self.configure_optimizers()
        if self.is_ddp:  # as nnU-Net wraps A
            network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
            network = DDP(network, device_ids=[self.local_rank])
        return network, optimizer, lr_scheduler

    def hyperparameters(self) -> dict:
        return {**super().hyperparameters(), "cps_weight": self.cps_weight, "cps_warmup": self.cps_warmup,
                "cps_loss": self.cps_loss, "cutmix_fraction": self.cutmix_fraction,
                "branch_dice_ema": self.branch_dice_ema, "supervised_input": self.supervised_input}

    def training_networks(self) -> tuple[torch.nn.Module, ...]:
        return self.network, self.network_b

    def branches(self) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
        """Branch name -> (training network, optimizer)."""
        return {"a": (self.network, self.optimizer), "b": (self.network_b, self.optimizer_b)}

    def cps_lambda(self) -> float:
        """Weight of L_cps at the current epoch: linear warm-up over ``cps_warmup`` (fractions of training)."""
        return self.cps_weight * linear_warmup(self.current_epoch / self.num_epochs, *self.cps_warmup)

    # ---- training
    def on_train_epoch_start(self):
        super().on_train_epoch_start()  # A: train mode, learning rate
        self.network_b.train()
        self.lr_scheduler_b.step(self.current_epoch)

    def unmixed_passes(self, data: torch.Tensor, target) -> tuple[dict, dict]:
        """Each network's argmax on the unmixed batch and, with clean supervision, its L_sup, before either steps.

        With clean supervision the training pass for L_sup (gradients accumulated, graph freed) also gives the
        pseudo-labels, which thus cost no forward pass of their own; the mixed recipe runs one under no_grad.
        """
        if self.supervised_input == "mixed":
            with torch.no_grad(), self.autocast():
                return {name: first_output(network(data)).argmax(1, keepdim=True)
                        for name, (network, _) in self.branches().items()}, {}
        labels, loss_sup = {}, {}
        for name, (network, _) in self.branches().items():
            with self.autocast():
                output = network(data)
                loss = self.supervised_loss(output, target)  # added random patches stay out of it
            labels[name] = first_output(output).detach().argmax(1, keepdim=True)
            self.backward(loss)
            loss_sup[name] = loss.detach()
            del output, loss
        return labels, loss_sup

    def train_step(self, batch: dict) -> dict:
        data, target = self.batch_to_device(batch)
        ignore = self.label_manager.ignore_label
        boxes = random_boxes(data.shape[0], tuple(data.shape[2:]), self.cutmix_fraction)
        mask = box_mask(boxes, tuple(data.shape[2:]), self.device)
        mixed_data = cutmix(data, mask)
        mixed_target = [cutmix(t, mask) for t in target] if isinstance(target, list) else cutmix(target, mask)
        # L_cps counts the mixed target's ignore voxels: a pasted box carries its own sample's labels and ignore.
        mixed_unlabeled = unlabeled_mask(first_output(mixed_target), ignore)
        lambda_cps = self.cps_lambda()

        for _, optimizer in self.branches().values():  # once per step: the clean recipe accumulates two passes
            optimizer.zero_grad(set_to_none=True)
        labels, loss_sup = self.unmixed_passes(data, target)
        unlabeled = unlabeled_mask(first_output(target), ignore)
        # nan without unlabeled voxels (e.g. a 2d patch on an annotated slice): the epoch mean leaves the step out.
        agreement = ((labels["a"] == labels["b"]) & unlabeled).sum() / unlabeled.sum()
        pseudo = {name: cutmix(label_map, mask) for name, label_map in labels.items()}
        del labels

        results = {}
        for (name, (network, optimizer)), other in zip(self.branches().items(), reversed(BRANCHES)):
            with self.autocast():
                output = network(mixed_data)
                loss_cps = cross_pseudo_supervision_loss(first_output(output), pseudo[other], mixed_unlabeled,
                                                         self.cps_loss)
                if self.supervised_input == "mixed":
                    branch_sup = self.supervised_loss(output, mixed_target)
                    loss = branch_sup + lambda_cps * loss_cps
                else:
                    branch_sup = loss_sup[name]
                    loss = lambda_cps * loss_cps
                    if isinstance(output, (list, tuple)):  # DDP needs a gradient for every parameter: 0 x the rest
                        loss = loss + sum(0.0 * o.sum() for o in output[1:])
            self.backward(loss)
            self.clip_and_step(network, optimizer)
            results[name] = (branch_sup.detach() + lambda_cps * loss_cps.detach(), branch_sup.detach(),
                             loss_cps.detach())
            del output, loss  # free this branch's graph before the other branch's forward
        (loss_a, sup_a, cps_a), (loss_b, sup_b, cps_b) = results["a"], results["b"]
        return {"loss": ((loss_a + loss_b) / 2).cpu().numpy(), "loss_sup_a": sup_a.item(),
                "loss_sup_b": sup_b.item(), "loss_cps": ((cps_a + cps_b) / 2).item(), "lambda_cps": lambda_cps,
                "agreement": agreement.item()}

    # ---- validation: both branches, the inference network chosen by EMA pseudo Dice
    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self.network_b.eval()

    def validation_networks(self) -> dict[str, torch.nn.Module]:
        """Name -> network scored by validation_step (each branch; the ensemble variant adds the pair)."""
        return {"a": self.network, "b": self.network_b}

    def inference_name(self) -> str:
        """The validation network that ``network_weights`` holds: the branch with the higher EMA pseudo Dice."""
        ema_a, ema_b = (self.logger.get_value(f"ema_dice_{name}", step=None) for name in BRANCHES)
        return "b" if ema_a and ema_b and ema_b[-1] > ema_a[-1] else "a"

    def inference_network(self) -> torch.nn.Module:
        return unwrap(self.validation_networks()[self.inference_name()])

    def validation_step(self, batch: dict) -> dict:
        outputs = {}
        for name, network in self.validation_networks().items():
            # nnU-Net's validation_step overwrites the target's ignore voxels in place (on CPU in the batch itself).
            target = batch["target"]
            target = [t.clone() for t in target] if isinstance(target, list) else target.clone()
            with self.network_in_place(network):
                result = nnUNetTrainer.validation_step(self, {**batch, "target": target})
            outputs.update({f"{key}_{name}": value for key, value in result.items()})
        return outputs

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        collated = collate_outputs(val_outputs)
        for name in BRANCHES:
            dice = self._pseudo_dice(collated, name)
            ema = self.logger.get_value(f"ema_dice_{name}", step=None)
            ema = dice if not ema else self.branch_dice_ema * ema[-1] + (1 - self.branch_dice_ema) * dice
            self.logger.log(f"val_dice_{name}", dice, self.current_epoch)
            self.logger.log(f"ema_dice_{name}", ema, self.current_epoch)
        chosen = self.inference_name()
        self.print_to_log_file(
            "pseudo Dice per branch: " + ", ".join(
                f"{name} {self.logger.get_value(f'val_dice_{name}', step=-1):.4g} "
                f"(EMA {self.logger.get_value(f'ema_dice_{name}', step=-1):.4g})" for name in BRANCHES)
            + f"; network_weights: {chosen}")
        suffix = f"_{chosen}"
        super().on_validation_epoch_end([{key[:-len(suffix)]: value for key, value in output.items()
                                          if key.endswith(suffix)} for output in val_outputs])

    def _pseudo_dice(self, collated: dict, name: str) -> float:
        """Mean foreground pseudo Dice of one validation network over the epoch (summed over DDP ranks)."""
        counts = [np.sum(collated[f"{kind}_hard_{name}"], 0) for kind in ("tp", "fp", "fn")]
        if self.is_ddp:
            for i, count in enumerate(counts):
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, count)
                counts[i] = np.sum(gathered, 0)
        tp, fp, fn = counts
        with np.errstate(invalid="ignore", divide="ignore"):
            return float(np.nanmean(2 * tp / (2 * tp + fp + fn)))

    # ---- checkpoints: network_weights = inference network; both branches and optimizers to resume exactly
    def extra_checkpoint_state(self) -> dict:
        return {"cps_branch_weights": {name: unwrap(network).state_dict()
                                       for name, (network, _) in self.branches().items()},
                "cps_optimizer_b_state": self.optimizer_b.state_dict(),
                "cps_inference_network": self.inference_name()}

    def load_network_states(self, checkpoint: dict) -> None:
        if "cps_branch_weights" not in checkpoint:
            raise RuntimeError(
                f"{type(self).__name__} cannot resume from this checkpoint: it lacks 'cps_branch_weights' (both CPS "
                f"networks), so it was not written by a CPS trainer. Start without --c, or pass the weights with "
                f"-pretrained_weights (they initialise network A only)")
        for name, (network, _) in self.branches().items():
            unwrap(network).load_state_dict(checkpoint["cps_branch_weights"][name])

    def load_extra_checkpoint_state(self, checkpoint: dict) -> None:
        self.optimizer_b.load_state_dict(checkpoint["cps_optimizer_b_state"])


class CPSCutMixTrainer_ensemble(CPSCutMixTrainer):
    """CPS + CutMix exporting both networks as one module that averages their softmax.

    ``build_network_architecture`` builds that pair (``SoftmaxEnsemble``), so ``nnUNetv2_predict`` runs the
    ensemble unchanged; validation scores it and ``network_weights`` holds it (``members.0.`` = A, ``members.1.`` =
    B). Training is CPSCutMixTrainer's.
    """

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        return SoftmaxEnsemble(*(CPSCutMixTrainer.build_branch_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision)
            for _ in BRANCHES))

    def initialize(self):
        super().initialize()
        self.ensemble = SoftmaxEnsemble(unwrap(self.network), unwrap(self.network_b))  # shares the branches' weights

    def validation_networks(self) -> dict[str, torch.nn.Module]:
        return {**super().validation_networks(), "ensemble": self.ensemble}

    def inference_name(self) -> str:
        return "ensemble"


class CPSCutMixTrainer_cleansup(CPSCutMixTrainer):
    """CPS + CutMix with the supervised loss on the unmixed batch: the default, under the name its benchmarks used."""

    supervised_input = "clean"


class CPSCutMixTrainer_mixedsup(CPSCutMixTrainer):
    """CPS + CutMix with the supervised loss on the CutMix-ed batch: Pagano et al.'s recipe, the default until 2026-12."""

    supervised_input = "mixed"
