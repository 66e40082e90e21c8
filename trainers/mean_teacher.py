"""Mean-Teacher with the axial continuity loss (MIDL 2026 LSFM paper):

    L = L_sup + lambda_cons(t) * L_cons + lambda_cont(t) * L_cont

L_sup is nnU-Net's own loss on the student's output; L_cons pulls the student towards the sharpened, confident
EMA-teacher prediction on unlabeled voxels; L_cont makes the student's probabilities continuous between adjacent
unlabeled slices along the annotation axis. Both weights ramp up with exp(-5 (1 - t)^2).
"""

import torch

from nnunet_ext.annotation_axis import find_annotation_axis
from nnunet_ext.semi_supervised import (
    EMATeacher,
    StrongIntensityPerturbation,
    axial_continuity_loss,
    cosine_decay,
    sharpened_consistency_loss,
    sigmoid_rampup,
    unlabeled_mask,
    unwrap,
)
from nnunet_ext.trainers.semi_supervised_base import SemiSupervisedTrainer, first_output

# Label volumes read to infer the annotation axis when dataset.json does not record it.
AXIS_INFERENCE_CASES = 5
PERTURBED_NETWORKS = ("student", "teacher", "none", "student_consistency")


def split_views(output, n: int):
    """The first ``n`` samples of a (deep-supervision) output, and the full-resolution output of the rest."""
    if isinstance(output, (list, tuple)):
        return [o[:n] for o in output], output[0][n:]
    return output[:n], output[n:]


class MeanTeacherTrainer(SemiSupervisedTrainer):
    """The SSL baseline of the paper: Mean-Teacher consistency only (lambda_cont = 0).

    The loss settings are the ones the ablation in docs/results.md kept (level with or ahead of stock nnU-Net), not
    the paper's (``PaperLossSettings``, which lost to stock under nnU-Net's optimizer).
    """

    ema_alpha: float = 0.999
    temperature: float = 0.5
    confidence_threshold: float = 0.8
    # Temperature of the teacher probability the threshold is applied to (None: the sharpened target's, the paper's);
    # 1: the raw probability, since nearly every voxel passes 0.8 after sharpening.
    confidence_temperature: float | None = 1.0
    # 1, not the paper's 10: under nnU-Net's SGD (lr 1e-2, momentum 0.99) the weight also scales the step.
    consistency_weight: float = 1.0
    continuity_weight: float = 0.0
    # False: pairs across which the teacher's class changes (an object's real top or bottom) are not smoothed.
    continuity_across_edges: bool = False
    rampup_fraction: float = 0.2  # of all epochs
    strong_perturbation: StrongIntensityPerturbation = StrongIntensityPerturbation()
    # Which network's input gets strong_perturbation: "student" (the paper: the supervised loss sees it too),
    # "teacher" (the student and its supervised loss see nnU-Net's batch as stock does), "none" (both see nnU-Net's
    # own augmented batch: the perturbed views cost Dice in the ablation), or "student_consistency" (FixMatch's
    # weak/strong views: the student also predicts a perturbed copy of the batch, which only the consistency term
    # sees; the supervised and continuity terms and the teacher see nnU-Net's batch).
    perturbed_network: str = "none"
    ssl_log_keys = ("loss_sup", "loss_cons", "loss_cont", "lambda_cons", "lambda_cont", "passed_fraction")

    def initialize(self):
        super().initialize()
        # After DDP/compile wrapping: the teacher averages the plain network, identically on every rank.
        self.teacher = EMATeacher(unwrap(self.network), self.ema_alpha)
        self.teacher.module.eval()  # the teacher only ever predicts
        self.continuity_axis = self._continuity_axis() if self.continuity_weight > 0 else None
        if self.perturbed_network not in PERTURBED_NETWORKS:
            raise RuntimeError(f"{type(self).__name__}: perturbed_network must be one of {PERTURBED_NETWORKS}, got "
                               f"{self.perturbed_network!r}; fix the class attribute in your trainer variant")

    def hyperparameters(self) -> dict:
        return {**super().hyperparameters(), "ema_alpha": self.ema_alpha, "temperature": self.temperature,
                "confidence_threshold": self.confidence_threshold,
                "confidence_temperature": self.confidence_temperature, "consistency_weight": self.consistency_weight,
                "continuity_weight": self.continuity_weight,
                "continuity_across_edges": self.continuity_across_edges, "rampup_fraction": self.rampup_fraction,
                "strong_perturbation": repr(self.strong_perturbation), "perturbed_network": self.perturbed_network}

    def _continuity_axis(self) -> int:
        """The annotation axis as an axis of the training patch (preprocessed order), logged with its source."""
        dataset = self.dataset_class(self.preprocessed_dataset_folder,
                                     self.dataset_class.get_identifiers(self.preprocessed_dataset_folder)
                                     [:AXIS_INFERENCE_CASES])
        segmentations = (dataset.load_case(i)[1][:] for i in dataset.identifiers)
        axis, source = find_annotation_axis(self.dataset_json, self.plans_manager.transpose_forward,
                                            self.configuration_manager.spacing, segmentations,
                                            self.label_manager.ignore_label)
        # A 2d configuration's patches are the last two preprocessed axes.
        patch_axis = axis - (3 - len(self.configuration_manager.patch_size))
        if patch_axis < 0:
            raise RuntimeError(
                f"{type(self).__name__}: the annotation axis ({axis}, {source}) is the slicing axis of the "
                f"{self.configuration_name} configuration, so its patches never hold adjacent slices: train a 3d "
                f"configuration or use MeanTeacherTrainer")
        self.print_to_log_file(f"continuity loss along preprocessed axis {axis} ({source})")
        return patch_axis

    def ramp_weights(self) -> tuple[float, float]:
        ramp = sigmoid_rampup(self.current_epoch, self.rampup_fraction * self.num_epochs)
        return self.consistency_weight * ramp, self.continuity_weight * ramp

    def train_step(self, batch: dict) -> dict:
        return self.mean_teacher_step(*self.batch_to_device(batch))

    def mean_teacher_step(self, data: torch.Tensor, target, extra_loss=None) -> dict:
        """One optimizer step on L_sup + lambda_cons L_cons + lambda_cont L_cont (+ ``extra_loss(output)``, a
        function of the student's output that returns a loss and a dict of values to log) and the teacher's update."""
        # The consistency and continuity losses use the full-resolution output only: the downsampled deep-supervision
        # targets are nearest-neighbour samples (one child per coarse voxel), so they would count other voxels.
        unlabeled = unlabeled_mask(first_output(target), self.label_manager.ignore_label)
        lambda_cons, lambda_cont = self.ramp_weights()

        # Intensity-only: teacher and student stay voxel-aligned.
        student_input = self.strong_perturbation(data) if self.perturbed_network == "student" else data
        teacher_input = self.strong_perturbation(data) if self.perturbed_network == "teacher" else data
        two_views = self.perturbed_network == "student_consistency"
        if two_views:  # one forward pass over both views; nnU-Net's instance norm keeps the samples independent
            student_input = torch.cat([data, self.strong_perturbation(data)])

        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            with torch.no_grad():
                teacher_logits = first_output(self.teacher.module(teacher_input))
            output = self.network(student_input)
            if two_views:
                output, consistency_logits = split_views(output, len(data))
            loss_sup = self.supervised_loss(output, target)
            student_logits = first_output(output)
            if not two_views:
                consistency_logits = student_logits
            loss_cons, passed_fraction = sharpened_consistency_loss(
                consistency_logits, teacher_logits, unlabeled, self.temperature, self.confidence_threshold,
                self.confidence_temperature)
            loss = loss_sup + lambda_cons * loss_cons
            loss_cont = torch.zeros((), device=self.device)
            if self.continuity_axis is not None:
                teacher_labels = None if self.continuity_across_edges else teacher_logits.argmax(1, keepdim=True)
                loss_cont = axial_continuity_loss(torch.softmax(student_logits.float(), 1), unlabeled,
                                                  self.continuity_axis, teacher_labels)
                loss = loss + lambda_cont * loss_cont
            extra_logs = {}
            if extra_loss is not None:
                loss_extra, extra_logs = extra_loss(output)
                loss = loss + loss_extra
        self.optimizer_step(loss)
        self.teacher.update(unwrap(self.network))
        return {"loss": loss.detach().cpu().numpy(), "loss_sup": loss_sup.item(), "loss_cons": loss_cons.item(),
                "loss_cont": loss_cont.item(), "lambda_cons": lambda_cons, "lambda_cont": lambda_cont,
                # Undefined (nan) without unlabeled voxels, so that the epoch mean leaves such a step out.
                "passed_fraction": torch.where(unlabeled.any(), passed_fraction, torch.nan).item(), **extra_logs}

    # ---- the teacher is what validation scores and nnUNetv2_predict loads
    def inference_network(self) -> torch.nn.Module:
        return self.teacher.module

    def extra_checkpoint_state(self) -> dict:
        return {"student_weights": unwrap(self.network).state_dict(), "ema_step": self.teacher.step}

    def load_network_states(self, checkpoint: dict) -> None:
        # network_weights is the teacher. A checkpoint without our keys (e.g. stock nnU-Net's) seeds both networks.
        self.teacher.module.load_state_dict(checkpoint["network_weights"])
        unwrap(self.network).load_state_dict(checkpoint.get("student_weights", checkpoint["network_weights"]))
        self.teacher.step = checkpoint.get("ema_step", 0)


class MeanTeacherContinuityTrainer(MeanTeacherTrainer):
    """The paper's method: Mean-Teacher consistency plus the axial continuity loss (weight 1, not across the teacher's
    class edges; ``_paper`` for the paper's settings)."""

    continuity_weight: float = 1.0


class PaperLossSettings:
    """The MIDL paper's loss settings: lambda_cons 10 (lambda_cont 10 where continuity is on), tau 0.8 on the
    sharpened teacher probability, the strong perturbation on the student's input, continuity across all slices."""

    consistency_weight: float = 10.0
    confidence_temperature: float | None = None
    perturbed_network: str = "student"
    continuity_across_edges: bool = True


class MeanTeacherTrainer_ema99(MeanTeacherTrainer):
    """MeanTeacherTrainer for short budgets (CPU runs, the benchmark): EMA decay 0.99 instead of 0.999.

    The teacher's time constant 1 / (1 - alpha) must be short against the run: 0.999 averages over the last 1000
    steps, most of a few-thousand-step run (nnU-Net's default is 250 000 steps).
    """

    ema_alpha = 0.99


class MeanTeacherContinuityTrainer_ema99(MeanTeacherContinuityTrainer):
    """MeanTeacherContinuityTrainer for short budgets: EMA decay 0.99 (see MeanTeacherTrainer_ema99)."""

    ema_alpha = 0.99


class MeanTeacherTrainer_ema99_paperloss(PaperLossSettings, MeanTeacherTrainer_ema99):
    """MeanTeacherTrainer_ema99 with the paper's loss settings on nnU-Net's optimizer (the ablation's starting point)."""


class MeanTeacherContinuityTrainer_ema99_paperloss(PaperLossSettings, MeanTeacherContinuityTrainer_ema99):
    """MeanTeacherContinuityTrainer_ema99 with the paper's loss settings on nnU-Net's optimizer."""

    continuity_weight = 10.0


class CosineLRScheduler:
    """nnU-Net's scheduler interface (``step(epoch)`` at every epoch start) with a cosine decay to 0 over the run."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, max_steps: int):
        self.optimizer, self.initial_lr, self.max_steps = optimizer, initial_lr, max_steps
        self.step(0)

    def step(self, current_step: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.initial_lr * cosine_decay(current_step, self.max_steps)


class PaperOptimizer:
    """The MIDL paper's optimizer: AdamW at lr 1e-4 with a cosine decay, instead of nnU-Net's SGD (lr 1e-2, Nesterov
    momentum 0.99) with poly decay. The loss weights 10 were chosen for this optimizer."""

    paper_learning_rate: float = 1e-4

    def configure_optimizers(self):
        self.initial_lr = self.paper_learning_rate
        optimizer = torch.optim.AdamW(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, CosineLRScheduler(optimizer, self.initial_lr, self.num_epochs)


class MeanTeacherTrainer_paper(PaperOptimizer, PaperLossSettings, MeanTeacherTrainer):
    """The paper's SSL baseline with its own recipe: AdamW 1e-4 cosine, lambda_cons 10, tau 0.8 on the sharpened
    teacher, EMA 0.999, perturbed student. The paper trains it on attention plans (``nnunet-ext plans attention``)."""


class MeanTeacherContinuityTrainer_paper(PaperOptimizer, PaperLossSettings, MeanTeacherContinuityTrainer):
    """The paper's method exactly, to reproduce it: MeanTeacherTrainer_paper plus continuity at lambda 10 across all
    slices. Train it on attention plans (``nnunet-ext plans attention``), as the paper does."""

    continuity_weight = 10.0
