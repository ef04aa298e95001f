"""Distillation (``distill_from``): a student learns the teacher's similarities between photos, on
the teacher's own input size, next to its margin loss."""

from __future__ import annotations

import pytest
import torch
from tiny_runs import tiny_config

from training.artifact import load_artifact
from training.config import build_config
from training.distill import relational_loss, teacher_targets
from training.evaluate import embed_pixels
from training.pipeline import export_run
from training.train import fit, prepare_data, preprocess_spec

CPU = torch.device("cpu")


def test_the_relational_loss_is_zero_for_the_same_similarities_at_any_width():
    teacher = torch.nn.functional.normalize(torch.randn(12, 6), dim=1)
    rotation, _ = torch.linalg.qr(torch.randn(10, 10))
    student = torch.cat([teacher, torch.zeros(12, 4)], 1) @ rotation  # 10-D, same cosines
    assert relational_loss(student, teacher, 32.0).item() == pytest.approx(0.0, abs=1e-4)
    other = torch.randn(12, 10, requires_grad=True)
    loss = relational_loss(other, teacher, 32.0)
    assert loss.item() > 0.1
    loss.backward()
    assert other.grad is not None and other.grad.abs().sum() > 0


def _config(tmp_path, animals, **overrides):
    return tiny_config(tmp_path, {"goat": animals}, **({"embedding_dim": 16, "eval_repeats": 2} | overrides))


def _distance_to_teacher(run, teacher, config) -> float:
    """The relational loss of a trained student against the teacher on the training photos."""
    (artifact,) = export_run(run, run / "export")
    spec = preprocess_spec(config)
    student = torch.from_numpy(
        embed_pixels(load_artifact(artifact).model, prepare_data(config, spec)[0].train.pixels, spec, CPU)
    )
    pixels = prepare_data(teacher["config"], teacher["spec"])[0].train.pixels
    targets = teacher_targets(teacher["model"], pixels, teacher["spec"], CPU)
    return relational_loss(student, targets, 16.0).item()


def test_a_student_trained_with_a_teacher_comes_closer_to_it(tmp_path, animals):
    teacher_config = _config(
        tmp_path, animals, name="teacher", backbone="efficientnet_lite0", pretrained="imagenet",
        neck="identity", epochs=0, input_size=48,
    )  # fmt: skip
    (teacher_dir,) = export_run(fit(teacher_config), tmp_path / "teacher")
    teacher = {
        "config": teacher_config,
        "spec": preprocess_spec(teacher_config),
        "model": load_artifact(teacher_dir).model.eval(),
    }
    # Enough steps for the BatchNorm statistics the exported model uses to settle.
    plain = _config(tmp_path, animals, name="plain", epochs=12, lr=0.02)
    taught = _config(
        tmp_path,
        animals,
        name="taught",
        epochs=12,
        lr=0.02,
        distill_from=str(teacher_dir),
        distill_weight=5.0,
    )
    assert _distance_to_teacher(fit(taught), teacher, taught) < 0.5 * _distance_to_teacher(
        fit(plain), teacher, plain
    )


def test_distillation_options_are_validated():
    with pytest.raises(ValueError, match="distill_weight"):
        build_config({"distill_weight": -1.0})
    with pytest.raises(ValueError, match="distill_from"):
        build_config(
            {
                "distill_from": "x",
                "cache_features": True,
                "backbone": "efficientnet_lite0",
                "pretrained": "imagenet",
            }
        )
