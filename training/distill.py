"""Distillation: a student network learns what a teacher's embeddings know, on the images we have
(``distill_from: ARTIFACT``), alongside its own margin loss.

The teacher (an artifact of any architecture and input size, e.g. the ImageNet-pretrained Lite
model) embeds every training photo once, at its own input size, the photo and its mirror image
averaged. The loss is relational, so teacher and student need not share an embedding width: for
each photo of a batch, the distribution of its similarities to the batch's other photos under the
student (a softmax at the margin head's scale) is pulled towards the teacher's, by their
Kullback-Leibler divergence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.evaluate import embed_pixels
from training.model import EmbeddingModel
from training.preprocess import PreprocessSpec


def teacher_targets(
    teacher: EmbeddingModel, pixels: torch.Tensor, spec: PreprocessSpec, device: torch.device
) -> torch.Tensor:
    """The teacher's L2-normalised embeddings (N, D) of photos at its own input size, each the mean
    of the photo's and its mirror image's."""
    both = embed_pixels(teacher, pixels, spec, device) + embed_pixels(teacher, pixels.flip(-1), spec, device)
    return F.normalize(torch.from_numpy(both), dim=1)


def relational_loss(student: torch.Tensor, teacher: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean over a batch's photos of KL(teacher || student) between their softmaxed similarities
    (``scale`` x cosine) to the batch's other photos."""
    if len(student) < 2:
        return student.new_zeros(())
    s, t = F.normalize(student.float(), dim=1), F.normalize(teacher.float(), dim=1)
    others = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
    log_p_student = F.log_softmax((s @ s.T * scale)[others].view(len(s), -1), dim=1)
    log_p_teacher = F.log_softmax((t @ t.T * scale)[others].view(len(t), -1), dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
