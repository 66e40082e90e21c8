"""What every semi-supervised trainer of ours shares: the unlabeled-voxel check, patch sampling that reaches
unlabeled regions, the AMP/grad-scaler/clip tail, checkpoints with extra state, and per-epoch SSL logging."""

from contextlib import contextmanager

import matplotlib.pyplot as plt  # nnU-Net's logger has already chosen the non-interactive backend
import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast
from torch import distributed as dist

from nnunet_ext.sampling import AddedRandomPatchesDataset, UniformPatchMixDataset, load_probability, with_added_patches
from nnunet_ext.semi_supervised import unwrap


def first_output(output):
    """Full-resolution output of a network that may return deep-supervision lists."""
    return output[0] if isinstance(output, (list, tuple)) else output


class SemiSupervisedTrainer(nnUNetTrainer):
    """Base class: subclasses implement ``train_step`` and may override the checkpoint hooks below."""

    # Share of training patches centred on a uniformly random voxel of a random case (the rest: nnU-Net's sampling).
    random_patch_fraction: float = 0.5
    # Patches centred on a uniformly random voxel added in front of each batch, as a fraction of nnU-Net's batch size
    # (0: none). The supervised loss (``supervised_loss``) sees only nnU-Net's part; the SSL terms see every patch.
    added_random_patches: float = 0.0
    # Per-epoch means of these train_step outputs are logged, printed and plotted to ssl_progress.png.
    ssl_log_keys: tuple[str, ...] = ()
    # Keys a subclass logs itself in on_validation_epoch_end; registered and plotted with the ones above.
    ssl_validation_log_keys: tuple[str, ...] = ()
    max_grad_norm: float = 12.0  # nnU-Net's value

    def initialize(self):
        if self.label_manager.ignore_label is None:
            raise RuntimeError(
                f"{type(self).__name__} needs unlabeled voxels, but dataset {self.plans_manager.dataset_name} has no "
                f"ignore label: mark unannotated voxels with an 'ignore' label (the highest label value) in labelsTr "
                f"and rerun nnUNetv2_plan_and_preprocess, or train with nnUNetTrainer")
        super().initialize()
        self._register_ssl_log_keys()
        self.print_to_log_file(f"{type(self).__name__} hyperparameters: {self.hyperparameters()}")
        if self.added_patches:
            self.print_to_log_file(f"training batches of {self.batch_size}: {self.added_patches} random-voxel patches "
                                   f"in front of nnU-Net's {self.supervised_batch_size}")
        self.logger.update_config({"ssl_hparams": self.hyperparameters()})

    def _register_ssl_log_keys(self) -> None:
        # nnU-Net's local logger only accepts keys it knows; registered keys are checkpointed with the rest.
        for key in self.ssl_log_keys + self.ssl_validation_log_keys:
            self.logger.local_logger.my_fantastic_logging.setdefault(key, [])

    def hyperparameters(self) -> dict:
        """The class attributes that define the method (logged at start)."""
        return {"random_patch_fraction": self.random_patch_fraction, "added_random_patches": self.added_random_patches}

    # ---- data
    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()  # this rank's share of the plans' batch under DDP
        self.supervised_batch_size = self.batch_size
        self.supervised_oversample_percent = self.oversample_foreground_percent
        self.added_patches = round(self.added_random_patches * self.batch_size)
        if self.added_patches and self.probabilistic_oversampling:
            raise RuntimeError(f"{type(self).__name__}: added_random_patches needs nnU-Net's oversampling of the last "
                               f"samples of a batch; set probabilistic_oversampling = False or added_random_patches = 0")
        self.batch_size, self.oversample_foreground_percent = with_added_patches(
            self.batch_size, self.oversample_foreground_percent, self.added_patches)

    def get_tr_and_val_datasets(self):
        train, val = super().get_tr_and_val_datasets()
        annotated_key = tuple([-1] + self.label_manager.all_labels)  # nnUNetDataLoader.annotated_classes_key
        probability = load_probability(self.random_patch_fraction, self.supervised_batch_size,
                                       self.supervised_oversample_percent)
        train = UniformPatchMixDataset(train, annotated_key, probability)
        if self.added_patches:
            train = AddedRandomPatchesDataset(train, annotated_key, self.batch_size, self.added_patches)
        return train, val

    def supervised_part(self, batch_part):
        """A batch's data, target or output (a deep-supervision list too) without the added random patches."""
        if isinstance(batch_part, (list, tuple)):
            return [self.supervised_part(b) for b in batch_part]
        return batch_part[self.added_patches:]

    def supervised_loss(self, output, target) -> torch.Tensor:
        """nnU-Net's loss on the part of a batch's output and target that stock nnU-Net would have sampled."""
        return self.loss(self.supervised_part(output), self.supervised_part(target))

    def batch_to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]:
        """A training batch's data and target on the trainer's device; a deep-supervision target stays a list."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = ([t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list)
                  else target.to(self.device, non_blocking=True))
        return data, target

    # ---- the shared training tail
    def autocast(self):
        """Mixed precision on CUDA only, like nnU-Net (CPU autocast is slow, MPS unsupported)."""
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def optimizer_step(self, loss: torch.Tensor, network: torch.nn.Module | None = None,
                       optimizer: torch.optim.Optimizer | None = None) -> None:
        """Backward, unscale, clip, step (grad scaler on CUDA); defaults to the trainer's network and optimizer."""
        self.backward(loss)
        self.clip_and_step(network, optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate ``loss``'s gradients (scaled on CUDA); a step may take several, each freeing its graph."""
        (loss if self.grad_scaler is None else self.grad_scaler.scale(loss)).backward()

    def clip_and_step(self, network: torch.nn.Module | None = None,
                      optimizer: torch.optim.Optimizer | None = None) -> None:
        """Unscale, clip and step on the gradients accumulated by ``backward``."""
        network = self.network if network is None else network
        optimizer = self.optimizer if optimizer is None else optimizer
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), self.max_grad_norm)
            self.grad_scaler.step(optimizer)
            self.grad_scaler.update()
        else:
            torch.nn.utils.clip_grad_norm_(network.parameters(), self.max_grad_norm)
            optimizer.step()

    # ---- which network validation, prediction and checkpoints see
    def training_networks(self) -> tuple[torch.nn.Module, ...]:
        """Every network the optimizer(s) train, as wrapped for training (DDP / compile); ``self.network`` first."""
        return (self.network,)

    def inference_network(self) -> torch.nn.Module:
        """The plain network that validation scores and ``checkpoint['network_weights']`` holds."""
        return unwrap(self.network)

    @contextmanager
    def network_in_place(self, network: torch.nn.Module):
        """Run nnU-Net code that reads ``self.network`` with ``network`` instead."""
        training_network, self.network = self.network, network
        try:
            yield
        finally:
            self.network = training_network

    def inference_network_in_place(self):
        """Run nnU-Net code that reads ``self.network`` with the inference network instead."""
        return self.network_in_place(self.inference_network())

    def validation_step(self, batch: dict) -> dict:
        with self.inference_network_in_place():
            return super().validation_step(batch)

    def perform_actual_validation(self, save_probabilities: bool = False):
        with self.inference_network_in_place():
            return super().perform_actual_validation(save_probabilities)

    def set_deep_supervision_enabled(self, enabled: bool):
        # Also reached while the inference network is in place, which is never DDP-wrapped.
        for network in {id(n): n for n in (*self.training_networks(), self.inference_network())}.values():
            unwrap(network).decoder.deep_supervision = enabled

    # ---- checkpoints: nnU-Net's keys, network_weights = inference network, plus extra state to resume exactly
    def extra_checkpoint_state(self) -> dict:
        """Keys added to every checkpoint beside nnU-Net's."""
        return {}

    def load_network_states(self, checkpoint: dict) -> None:
        unwrap(self.network).load_state_dict(checkpoint["network_weights"])

    def load_extra_checkpoint_state(self, checkpoint: dict) -> None:
        """Restore what ``extra_checkpoint_state`` added, beyond the networks (called last when loading)."""

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        # Keys of nnunetv2 2.8.1's nnUNetTrainer.save_checkpoint (tests/test_checkpoint_keys.py checks none is missing).
        checkpoint = {
            "network_weights": self.inference_network().state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
        }
        checkpoint.update(self.extra_checkpoint_state())
        torch.save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = torch.load(checkpoint, map_location=self.device, weights_only=False)
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._register_ssl_log_keys()  # checkpoints written by other trainers lack our keys
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        self.load_network_states(checkpoint)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint["grad_scaler_state"] is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
        self.load_extra_checkpoint_state(checkpoint)

    # ---- per-epoch logging of the loss components
    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        if not self.ssl_log_keys:
            return
        collated = collate_outputs(train_outputs)
        values = {}
        for key in self.ssl_log_keys:
            mean = mean_of_defined(collated[key])
            if self.is_ddp:
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, mean)
                mean = mean_of_defined(gathered)
            values[key] = mean
            self.logger.log(key, mean, self.current_epoch)
        self.print_to_log_file(", ".join(f"{k} {v:.4g}" for k, v in values.items()))

    def on_epoch_end(self):
        # After validation, so that the validation keys of this epoch are plotted too.
        if self.local_rank == 0 and self.ssl_log_keys + self.ssl_validation_log_keys:
            self.plot_ssl_progress()
        super().on_epoch_end()

    def plot_ssl_progress(self) -> None:
        """ssl_progress.png beside nnU-Net's progress.png: one panel per logged SSL quantity."""
        keys = self.ssl_log_keys + self.ssl_validation_log_keys
        fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.2 * len(keys)), sharex=True, squeeze=False)
        for ax, key in zip(axes[:, 0], keys):
            ax.plot(self.logger.get_value(key, step=None), color="b")
            ax.set_ylabel(key)
        axes[-1, 0].set_xlabel("epoch")
        fig.tight_layout()
        fig.savefig(join(self.output_folder, "ssl_progress.png"))
        plt.close(fig)


def mean_of_defined(values) -> float:
    """Mean of the values that are not nan (a step where a logged quantity is undefined reports nan); nan if none."""
    values = np.asarray(values, dtype=np.float64)
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


class AddedRandomPatches:
    """Random-voxel patches *added* to nnU-Net's batch (as many again) instead of replacing half of it: the supervised
    loss sees exactly stock's batch, the semi-supervised terms every patch."""

    random_patch_fraction = 0.0
    added_random_patches = 1.0
