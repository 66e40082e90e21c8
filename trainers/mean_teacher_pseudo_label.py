"""Mean-Teacher + continuity on top of 2D -> 3D pseudo-labels:

    L = L_sup + alpha * L_p + lambda_cons(t) * L_cons + lambda_cont(t) * L_cont

The 2D model's pseudo-labels (PseudoLabelWeightedTrainer's L_p) give the unannotated voxels a target from the
first step; the EMA teacher's consistency and the axial continuity regularise the student where the 2D model,
which sees one slice at a time, is inconsistent across slices. The Mean-Teacher settings are the ones that kept
MeanTeacherContinuityTrainer level with stock nnU-Net in the ablation (weights 1 for nnU-Net's SGD, the confidence
filter on the raw teacher probability, the strong perturbation on the teacher's input so the supervised losses see
stock's batch).
"""

from nnunet_ext.trainers.mean_teacher import MeanTeacherContinuityTrainer
from nnunet_ext.trainers.pseudo_label import PseudoLabelWeightedTrainer


class MeanTeacherContinuityPseudoLabelTrainer(PseudoLabelWeightedTrainer, MeanTeacherContinuityTrainer):
    """PseudoLabelWeightedTrainer's L_sup + alpha L_p, plus Mean-Teacher consistency and axial continuity."""

    # The ablation's `_fixed` settings it was measured with (MeanTeacherContinuityTrainer's defaults came later).
    consistency_weight = 1.0
    continuity_weight = 1.0
    confidence_temperature = 1.0
    perturbed_network = "teacher"
    continuity_across_edges = True
    ssl_log_keys = MeanTeacherContinuityTrainer.ssl_log_keys + ("loss_pseudo", "pseudo_fraction",
                                                                  "mean_pseudo_weight")

    def train_step(self, batch: dict) -> dict:
        data, target = self.batch_to_device(batch)
        labels, pseudo_labels, weights = self.split_targets(target)
        return self.mean_teacher_step(data, labels,
                                      lambda output: self.pseudo_label_term(output, pseudo_labels, weights))


class MeanTeacherContinuityPseudoLabelTrainer_ema99(MeanTeacherContinuityPseudoLabelTrainer):
    """For short budgets (CPU runs, the benchmark): EMA decay 0.99 (see MeanTeacherTrainer_ema99)."""

    ema_alpha = 0.99
