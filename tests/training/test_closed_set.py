"""Closed-set evaluation: held-back sessions of training individuals, beside the unseen protocol."""

import csv
import json

import numpy as np
import pytest
import torch
from synthetic import make_folder_dataset
from tiny_runs import tiny_config

from training.closed_set import ConfidenceFloor, evaluate_closed_set, herd_mates_matched, hold_back_sessions
from training.data import read_manifest
from training.open_set import ConfidenceModel, OpenSetCalibration
from training.pipeline import export_run
from training.preprocess import PreprocessSpec
from training.train import fit, prepare_data


def test_whole_sessions_are_held_back_and_single_session_individuals_stay_in_training():
    individuals = ["a"] * 6 + ["b"] * 4 + ["c"] * 3
    groups = [
        "a/s1",
        "a/s1",
        "a/s2",
        "a/s2",
        "a/s3",
        "a/s3",
        "b/x",
        "b/x",
        "b/y",
        "b/y",
        "c/only",
        "c/only",
        "c/only",
    ]
    split = hold_back_sessions(individuals, groups, 0.5, seed=3)
    held_groups = {groups[i] for i in split.held}
    train_groups = {groups[i] for i in split.train}
    assert not held_groups & train_groups  # no session on both sides
    assert sorted(np.concatenate([split.train, split.held]).tolist()) == list(range(len(groups)))
    assert split.single_session == ("c",)
    assert not any(g.startswith("c/") for g in held_groups)
    # Every multi-session individual keeps at least one session in training and holds one back.
    for name in ("a", "b"):
        assert any(g.startswith(f"{name}/") for g in held_groups)
        assert any(g.startswith(f"{name}/") for g in train_groups)


def test_an_individual_s_held_sessions_do_not_move_when_another_animal_is_added():
    individuals = ["a"] * 4
    groups = ["a/1", "a/2", "a/3", "a/4"]
    before = hold_back_sessions(individuals, groups, 0.5, seed=0)
    after = hold_back_sessions(individuals + ["z"] * 2, groups + ["z/1", "z/2"], 0.5, seed=0)
    assert {groups[i] for i in before.held} == {groups[i] for i in after.held if i < 4}


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_the_held_fraction_must_leave_something_on_each_side(fraction):
    with pytest.raises(ValueError, match="held_fraction"):
        hold_back_sessions(["a", "a"], ["a/1", "a/2"], fraction, seed=0)


def test_closed_set_metrics_against_a_hand_worked_example():
    # Gallery: a at x-axis, b at y-axis. Queries: near a, near b, and one of a that looks like b.
    gallery = np.array([[1, 0], [0, 1]], dtype=np.float32)
    queries = np.array([[0.96, 0.28], [0.28, 0.96], [0.6, 0.8]], dtype=np.float32)
    result = evaluate_closed_set(gallery, ["a", "b"], queries, ["a", "b", "a"], threshold=0.7)
    summary = result.summary()
    assert summary["top1"] == pytest.approx(2 / 3, abs=1e-4)
    assert summary["top5"] == 1.0
    # Answered (top score >= 0.7) and right: queries 0 and 1; answered and wrong: query 2 (0.8 to b).
    assert summary["right_match_rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert summary["wrong_match_rate"] == pytest.approx(1 / 3, abs=1e-4)
    # Impostor pairs: (q0,b)=0.28, (q1,a)=0.28, (q2,b)=0.8: one of three at or above 0.7.
    assert summary["test_far"] == pytest.approx(1 / 3, abs=1e-4)
    # Genuine pairs: (q0,a)=0.96, (q1,b)=0.96, (q2,a)=0.6: two of three.
    assert summary["test_tar"] == pytest.approx(2 / 3, abs=1e-4)
    assert result.counts["gallery_images"] == 2 and result.counts["images"] == 3


def margin_table() -> OpenSetCalibration:
    """A table whose confidence is P(right) = sigmoid(10 * margin over the second individual)."""
    model = ConfidenceModel([[0.0, 0.0, 0.0]], [[0.0, 0.0, 10.0]], stranger_share=0.5, max_margin=1.0)
    return OpenSetCalibration(
        gallery_sizes=[2],
        target_fpirs=[0.01],
        thresholds=[[0.7]],
        tpir=[[1.0]],
        confidence_similarity=[0.0, 1.0],
        confidence=[[0.0, 1.0]],
        images_per_individual=1.0,
        confidence_model=model,
    )


def test_a_confidence_floor_holds_back_the_close_calls_as_uncertain():
    # The example above; the confidence is P(right) = sigmoid(10 * margin over the second individual).
    gallery = np.array([[1, 0], [0, 1]], dtype=np.float32)
    queries = np.array([[0.96, 0.28], [0.28, 0.96], [0.6, 0.8]], dtype=np.float32)
    table = margin_table()
    rates = {}
    for minimum in (0.5, 0.9):
        floor = ConfidenceFloor(table, 2, minimum, stranger_share=0.0)
        result = evaluate_closed_set(
            gallery, ["a", "b"], queries, ["a", "b", "a"], threshold=0.7, floor=floor
        )
        rates[minimum] = result.summary()
    # Margins .68, .68 and .2: confidences .999, .999 and .881.
    assert rates[0.5]["wrong_match_rate"] == pytest.approx(1 / 3, abs=1e-4)
    assert rates[0.5]["held_back_rate"] == 0.0 and rates[0.5]["held_back_wrong_rate"] == 0.0
    # At .9 the wrong answer (.8 to b, .6 to a) is held back; the right ones stay matches.
    assert rates[0.9]["right_match_rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert rates[0.9]["wrong_match_rate"] == 0.0
    assert rates[0.9]["held_back_rate"] == pytest.approx(1 / 3, abs=1e-4)
    assert rates[0.9]["held_back_wrong_rate"] == pytest.approx(1 / 3, abs=1e-4)
    # Pairs and ranks do not depend on the floor.
    assert rates[0.9]["test_far"] == rates[0.5]["test_far"] and rates[0.9]["top1"] == rates[0.5]["top1"]


def test_queries_of_an_animal_missing_from_the_gallery_are_refused():
    emb = np.eye(2, dtype=np.float32)
    with pytest.raises(ValueError, match="absent from the gallery"):
        evaluate_closed_set(emb[:1], ["a"], emb[1:], ["b"], threshold=0.5)


def test_a_manifest_group_column_names_the_session(tmp_path):
    root = make_folder_dataset(tmp_path / "d", n_individuals=2, n_images=2, size=32)
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "individual", "species", "group"])
        for k, image in enumerate(sorted((root / "ind000").iterdir())):
            writer.writerow([f"ind000/{image.name}", "ind000", "goat", f"batch{k}"])
        for image in sorted((root / "ind001").iterdir()):
            writer.writerow([f"ind001/{image.name}", "ind001", "goat", ""])
    dataset = read_manifest(manifest, group_pattern=r"^(clip\d)")
    groups = [s.group for s in dataset.samples]
    assert [g for g in groups if g.startswith("ind000")] == ["ind000/batch0", "ind000/batch1"]
    # Without a group the pattern applies as before.
    assert [g for g in groups if g.startswith("ind001")] == ["ind001/clip0", "ind001/clip1"]


def test_a_run_with_held_back_sessions_reports_the_closed_set_beside_unseen_individuals(tmp_path):
    data = make_folder_dataset(tmp_path / "animals", n_individuals=12, n_images=8, size=32)
    config = tiny_config(
        tmp_path,
        {"goat": data},
        epochs=3,
        holdout_sessions=0.5,
        datasets=[{"source": str(data), "species": "goat", "group_pattern": r"^(clip\d)"}],
    )
    (prepared,) = prepare_data(config, PreprocessSpec(input_size=config.input_shape))
    assert prepared.held is not None
    train_groups, held_groups = set(prepared.train.groups), set(prepared.held.groups)
    assert held_groups and not train_groups & held_groups
    assert set(prepared.held.individuals) <= set(prepared.classes)  # seen in training
    (artifact,) = export_run(fit(config))

    card = json.loads((artifact / "model_card.json").read_text())
    closed = card["metrics"]["closed_set"]
    assert closed["test_images"] == len(prepared.held.individuals)
    assert 0.0 <= closed["top1"] <= 1.0 and "wrong_match_rate" in closed
    report = (artifact / "report" / "report.md").read_text()
    assert "closed set (held-back sessions)" in report


def test_an_imprinted_head_starts_each_class_at_its_photos_mean_embedding(tmp_path):
    from training.evaluate import embed_pixels
    from training.train import build_train_module, imprint_heads

    data = make_folder_dataset(tmp_path / "animals", n_individuals=5, n_images=4, size=32)
    config = tiny_config(tmp_path, {"goat": data}, val_fraction=0.0, test_fraction=0.0)
    spec = PreprocessSpec(input_size=config.input_shape)
    prepared = prepare_data(config, spec)
    module, _ = build_train_module(config, prepared)
    imprint_heads(module, prepared, spec, torch.device("cpu"))
    (d,) = prepared
    emb = embed_pixels(module.model, d.train.pixels, spec, "cpu")
    labels = d.labels.numpy()
    for k in range(len(d.classes)):
        centre = emb[labels == k].mean(axis=0)
        expected = centre / np.linalg.norm(centre)
        np.testing.assert_allclose(
            module.criteria["goat"].head.weight[k].detach().numpy(), expected, atol=1e-5
        )


def test_herd_mates_left_out_of_the_gallery_are_answered_match_past_the_threshold_and_floor():
    # Unit vectors at 0 and 10 degrees (a), 20 (b), 25 (c) and 90 (d). Left out in turn: a's photos
    # meet b at cos 20 = .940 and cos 10 = .985; d meets c at cos 65 = .423.
    angles = {"a": [0, 10], "b": [20], "c": [25], "d": [90]}
    names = [n for n, degrees in angles.items() for _ in degrees]
    rad = np.radians([d for degrees in angles.values() for d in degrees])
    emb = np.stack([np.cos(rad), np.sin(rad)], axis=1)
    assert herd_mates_matched(emb, names, ["a", "d"], threshold=0.95) == pytest.approx(1 / 3)
    assert herd_mates_matched(emb, names, ["a"], threshold=0.9) == 1.0
    assert herd_mates_matched(emb, names, ["d"], threshold=0.4) == 1.0
    # A floor: the photo at 10 degrees has b at .985 and c at .966 (margin .019, confidence .55);
    # at 0 degrees, b .940 and c .906 (margin .034, confidence .58).
    floor = ConfidenceFloor(margin_table(), 2, 0.56, stranger_share=0.0)
    assert herd_mates_matched(emb, names, ["a"], threshold=0.9, floor=floor) == 0.5
    with pytest.raises(ValueError, match="no photo"):
        herd_mates_matched(emb, names, ["e"], threshold=0.9)
