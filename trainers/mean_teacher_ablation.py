"""One-change variants of the short-budget Mean-Teacher trainers with the paper's loss settings, for the ablation
that asked why they trail stock nnU-Net (docs/results.md): each class changes the attributes of one
hypothesis. What it found became the defaults of MeanTeacherTrainer / MeanTeacherContinuityTrainer."""

from nnunet_ext.trainers.mean_teacher import (
    MeanTeacherContinuityTrainer_ema99,
    MeanTeacherContinuityTrainer_ema99_paperloss,
    MeanTeacherTrainer_ema99,
    MeanTeacherTrainer_ema99_paperloss,
)
from nnunet_ext.trainers.semi_supervised_base import AddedRandomPatches


class MeanTeacherTrainer_ema99_nossl(MeanTeacherTrainer_ema99_paperloss):
    """Control: the machinery (random-voxel patches, perturbed student input, EMA teacher predicts), no SSL loss."""

    consistency_weight = 0.0


class MeanTeacherTrainer_ema99_lambda1(MeanTeacherTrainer_ema99_paperloss):
    """Consistency weight 1 instead of the paper's 10 (tuned for AdamW at lr 1e-4, not nnU-Net's SGD at 1e-2)."""

    consistency_weight = 1.0


class MeanTeacherTrainer_ema99_rawconf(MeanTeacherTrainer_ema99_paperloss):
    """Confidence filter on the teacher's raw probability (the sharpened one passes almost every voxel)."""

    confidence_temperature = 1.0


class MeanTeacherTrainer_ema99_cleansup(MeanTeacherTrainer_ema99_paperloss):
    """The teacher's input is perturbed instead of the student's, so the supervised loss sees stock's batch."""

    perturbed_network = "teacher"


class MeanTeacherTrainer_ema99_fixed(MeanTeacherTrainer_ema99_paperloss):
    """All three changes above together."""

    consistency_weight = 1.0
    confidence_temperature = 1.0
    perturbed_network = "teacher"


class MeanTeacherTrainer_ema99_fixed_noperturb(MeanTeacherTrainer_ema99_fixed):
    """_fixed without the strong perturbation: teacher and student see nnU-Net's batch, so the consistency target
    no longer comes from a perturbed (degraded) view of the student's input."""

    perturbed_network = "none"


class MeanTeacherTrainer_ema99_fixed_twoviews(MeanTeacherTrainer_ema99_fixed):
    """_fixed with FixMatch's views: the teacher predicts nnU-Net's batch, the student a perturbed copy of it for the
    consistency term only, so the term teaches invariance to the perturbation and the supervised loss stays stock's."""

    perturbed_network = "student_consistency"


class MeanTeacherContinuityTrainer_ema99_fixed(MeanTeacherContinuityTrainer_ema99_paperloss):
    """MeanTeacherTrainer_ema99_fixed plus continuity at weight 1 (10 penalises real object ends on plain U-Nets)."""

    consistency_weight = 1.0
    continuity_weight = 1.0
    confidence_temperature = 1.0
    perturbed_network = "teacher"


class MeanTeacherTrainer_ema99_fixed_nossl(MeanTeacherTrainer_ema99_fixed):
    """Control for _fixed: random-voxel patches and the EMA teacher predicting, the student on stock's batch, no SSL
    loss (stock's supervised step otherwise), so a gap to stock is the machinery's, not the loss terms'."""

    consistency_weight = 0.0


class MeanTeacherTrainer_ema99_fixed_nossl_stocksampling(MeanTeacherTrainer_ema99_fixed_nossl):
    """The control with nnU-Net's own patch sampling: stock's training but for the EMA teacher predicting, so set
    beside the control it tells the random-voxel patches' share of a gap to stock from the EMA weights'."""

    random_patch_fraction = 0.0


class MeanTeacherContinuityTrainer_ema99_fixed_edgeaware(MeanTeacherContinuityTrainer_ema99_fixed):
    """MeanTeacherContinuityTrainer_ema99_fixed whose continuity leaves out the adjacent-slice pairs across which the
    teacher's class changes: it smooths within objects, not their real tops and bottoms."""

    continuity_across_edges = False


class MeanTeacherContinuityTrainer_ema99_fixed_edgeaware_noperturb(MeanTeacherContinuityTrainer_ema99_fixed_edgeaware):
    """Both removals together: edge-aware continuity and neither input perturbed (each alone made its term harmless
    on gala_fibsem): the flagship with nothing measured to cost it."""

    perturbed_network = "none"


class MeanTeacherTrainer_ema99_addedpatches(AddedRandomPatches, MeanTeacherTrainer_ema99):
    """MeanTeacherTrainer_ema99 with the random patches added (on 2d, replacing half the batch by mostly unannotated
    slices halves the supervised patches)."""


class MeanTeacherContinuityTrainer_ema99_addedpatches(AddedRandomPatches, MeanTeacherContinuityTrainer_ema99):
    """MeanTeacherContinuityTrainer_ema99 with the random patches added."""


class MeanTeacherContinuityTrainer_ema99_stocksampling(MeanTeacherContinuityTrainer_ema99):
    """MeanTeacherContinuityTrainer_ema99 on nnU-Net's own patch sampling (no random-voxel patches): both loss terms
    on stock's batch, so set beside the defaults it tells what the random-voxel patches cost or bring."""

    random_patch_fraction = 0.0
