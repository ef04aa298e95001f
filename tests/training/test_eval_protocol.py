"""training.evaluate: the protocol on synthetic embeddings whose right answers are known."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from training.data import enrol_query_split
from training.evaluate import (
    accuracy_threshold,
    balanced_pairs,
    calibrate_threshold,
    embed_pixels,
    evaluate_embeddings,
    one_shot_identification,
    pair_verification_accuracy,
)
from training.metrics import pair_scores
from training.preprocess import PreprocessSpec, normalize


@pytest.mark.parametrize("seed", range(5))
def test_enrol_query_split_keeps_groups_together(clusters, seed):
    _, individuals, groups = clusters(12, 7, frames_per_group=3)  # clips of 3, 3 and 1 frames
    enrol, query = enrol_query_split(individuals, groups, random.Random(seed))
    assert set(groups[enrol]).isdisjoint(groups[query])
    assert sorted(np.concatenate([enrol, query]).tolist()) == list(range(len(individuals)))
    assert set(individuals[enrol]) == set(individuals) == set(individuals[query])


def test_separated_clusters_are_identified_perfectly(clusters):
    # Genuine cosines are about .95; impostors (random centres in 64-D) stay far below .75.
    emb, individuals, groups = clusters(20, 6, dim=64, noise=0.05, frames_per_group=2)
    result = evaluate_embeddings(emb, individuals, groups, threshold=0.75, n_repeats=3)
    for name in ("top1", "top5", "map"):
        assert result.identification[name] == [1.0, 1.0, 1.0]
    assert result.verification["auc"] == 1.0 and result.verification["eer"] == 0.0
    assert result.verification["tar_at_far_0.001"] == 1.0
    np.testing.assert_allclose(result.cmc_mean, np.ones(20))
    assert result.at_threshold == {"far": 0.0, "tar": 1.0}
    assert result.open_set["auroc"] == [1.0, 1.0, 1.0]
    assert result.open_set["f1"] == [1.0, 1.0, 1.0] and result.open_set["unknown_accuracy"] == [1.0, 1.0, 1.0]
    c = result.counts
    assert (c["individuals"], c["images"], c["single_group_individuals"]) == (20, 120, 0)
    # Target 3 of 6 enrolled; whole clips of 2 are enrolled until 3 is reached: 4 enrolled, 2 queried.
    assert c["closed_set_queries"] == [40, 40, 40]
    assert c["same_group_pairs_left_out"] == 60  # one pair inside each of the 60 clips
    assert c["genuine_pairs"] == 20 * (15 - 3) and c["impostor_pairs"] == 120 * 119 // 2 - 20 * 15
    assert c["open_set_unknown_individuals"] == 5  # 25 % of 20
    assert c["open_set_unknown_queries"] == [30, 30, 30]  # all 6 images of each of the 5


def test_per_individual_top1_adds_up_to_the_top1_over_repeats(clusters):
    emb, individuals, groups = clusters(15, 6, dim=16, noise=0.6, frames_per_group=2)
    result = evaluate_embeddings(emb, individuals, groups, threshold=0.5, n_repeats=4)
    rows = result.per_individual
    assert {r["individual"] for r in rows} == set(individuals.tolist())
    assert [r["top1"] for r in rows] == sorted(r["top1"] for r in rows)  # hardest first
    queries = sum(r["queries"] for r in rows)
    assert queries == sum(result.counts["closed_set_queries"])
    # Every repeat has the same number of queries here, so the pooled top-1 is the mean of repeats.
    pooled = sum(r["top1"] * r["queries"] for r in rows) / queries
    assert pooled == pytest.approx(np.mean(result.identification["top1"]))
    assert 0 < pooled < 1  # the noise leaves some queries wrong, so the table has something to show
    for r in rows:
        assert (r["confused_with"] is None) == (r["top1"] == 1.0)
        assert r["confused_with"] != r["individual"]


def test_random_embeddings_score_chance(clusters):
    emb, individuals, groups = clusters(40, 6, noise=100.0)  # no structure at all
    result = evaluate_embeddings(emb, individuals, groups, threshold=0.5, n_repeats=5)
    top1, top5 = np.mean(result.identification["top1"]), np.mean(result.identification["top5"])
    assert top1 < 0.1 and top5 < 0.3  # chance: 1/40 = .025 and 5/40 = .125
    assert 0.44 < result.verification["auc"] < 0.56
    assert 0.4 < np.mean(result.open_set["auroc"]) < 0.6


def test_groups_stop_near_duplicate_frames_leaking(clusters):
    # Each clip is one random point, its 2 frames near-identical; clips of one animal are unrelated.
    emb, individuals, groups = clusters(30 * 3, 2, noise=1e-3, frames_per_group=2)
    individuals = np.repeat([f"cow{i:02d}" for i in range(30)], 6)
    groups = np.array([f"{ind}/{g}" for ind, g in zip(individuals, groups, strict=True)])
    kept = evaluate_embeddings(emb, individuals, groups, threshold=0.5, n_repeats=3, unknown_fraction=0)
    leaked = evaluate_embeddings(
        emb, individuals, np.arange(len(emb)).astype(str), threshold=0.5, n_repeats=3, unknown_fraction=0
    )
    assert np.mean(kept.identification["top1"]) < 0.25  # chance is 1/30
    assert np.mean(leaked.identification["top1"]) > 0.6  # a clip-mate enrolled gives the answer away
    # Leaked, the 90 same-clip pairs (cosine ~1) join the 360 cross-clip genuine pairs: AUC rises
    # from ~.5 to about 90/450 * 1 + 360/450 * .5 = .6.
    assert kept.verification["auc"] < 0.6 and leaked.verification["auc"] > kept.verification["auc"] + 0.05
    assert kept.open_set == {} and kept.counts["open_set_unknown_queries"] == []


def test_single_group_individuals_are_counted(clusters):
    emb, individuals, groups = clusters(6, 4, frames_per_group=2)
    groups[individuals == "id000"] = "id000/only-clip"
    result = evaluate_embeddings(emb, individuals, groups, threshold=0.5, n_repeats=1)
    assert result.counts["single_group_individuals"] == 1


def test_strangers_far_from_everyone_are_told_apart(clusters):
    emb, individuals, groups = clusters(16, 5, noise=0.05)
    strangers, stranger_ids, _ = clusters(10, 4, noise=0.05, seed=7, prefix="openset-")
    result = evaluate_embeddings(
        emb,
        individuals,
        groups,
        threshold=0.6,
        n_repeats=2,
        unknown_fraction=0.0,
        strangers_emb=strangers,
        strangers_individuals=stranger_ids,
    )
    assert min(result.open_set["auroc"]) > 0.99
    assert result.open_set["unknown_accuracy"] == [1.0, 1.0]
    assert (
        result.counts["open_set_unknown_queries"] == [40, 40] and result.counts["strangers_individuals"] == 10
    )
    with pytest.raises(ValueError, match="overlap"):
        evaluate_embeddings(
            emb,
            individuals,
            groups,
            threshold=0.6,
            strangers_emb=emb[:2],
            strangers_individuals=individuals[:2],
        )


def test_result_is_reproducible_and_json_friendly(clusters):
    emb, individuals, groups = clusters(12, 4, noise=0.6)
    a = evaluate_embeddings(emb, individuals, groups, threshold=0.3, n_repeats=3, seed=4).to_dict()
    b = evaluate_embeddings(emb, individuals, groups, threshold=0.3, n_repeats=3, seed=4).to_dict()
    c = evaluate_embeddings(emb, individuals, groups, threshold=0.3, n_repeats=3, seed=5).to_dict()
    assert a == b and a != c
    json.dumps(a, allow_nan=False)
    top1 = a["identification"]["top1"]
    assert top1["mean"] == pytest.approx(np.mean(top1["values"]))
    assert top1["std"] == pytest.approx(np.std(top1["values"], ddof=1))
    assert len(a["cmc"]) == 20 and a["counts"]["repeats"] == 3
    with pytest.raises(ValueError, match="n_repeats"):
        evaluate_embeddings(emb, individuals, groups, threshold=0.3, n_repeats=0)


def test_calibrated_threshold_holds_its_far_on_validation(clusters):
    emb, individuals, _ = clusters(15, 4, noise=0.8)
    scores, same = pair_scores(emb, individuals)
    impostor = scores[~same]  # float32, as the service compares them
    t = calibrate_threshold(emb, individuals, 0.01)
    assert np.mean(impostor >= t) <= 0.01
    assert np.mean(impostor.astype(np.float64) >= t) <= 0.01
    assert np.mean(impostor >= t - 1e-6) > 0.009  # the loosest such threshold: 16 of 1,680 accepted


def test_test_far_and_tar_at_the_threshold_are_measured(clusters):
    emb, individuals, groups = clusters(12, 5, noise=0.6, frames_per_group=2)
    val_emb, val_individuals, _ = clusters(12, 5, noise=0.6, seed=1, prefix="val")
    t = calibrate_threshold(val_emb, val_individuals, 0.05)
    result = evaluate_embeddings(emb, individuals, groups, threshold=t, n_repeats=1)
    scores, same = pair_scores(emb, individuals, groups)
    assert result.at_threshold["far"] == pytest.approx(np.mean(scores[~same] >= t))
    assert result.at_threshold["tar"] == pytest.approx(np.mean(scores[same] >= t))
    assert 0.0 < result.at_threshold["far"] < 0.15 and 0.0 < result.at_threshold["tar"] < 1.0
    np.testing.assert_array_equal(np.sort(result.genuine), np.sort(scores[same]))


def test_embed_pixels_matches_the_model_in_batches(tiny_model):
    spec = PreprocessSpec(input_size=(32, 32))
    pixels = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    emb = embed_pixels(tiny_model, pixels, spec, "cpu", batch_size=2)
    assert emb.shape == (5, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, tiny_model.embed(normalize(pixels, spec)).numpy(), atol=1e-5)
    assert not tiny_model.training
    with pytest.raises(ValueError, match="uint8"):
        embed_pixels(tiny_model, pixels.float(), spec, "cpu")


def test_one_shot_identification(clusters):
    emb, individuals, _ = clusters(8, 3, noise=0.05)
    lone, lone_id, _ = clusters(1, 1, seed=3, prefix="lone")  # one image: gallery only
    out = one_shot_identification(
        np.vstack([emb, lone]), np.concatenate([individuals, lone_id]), seed=1, n_repeats=3
    )
    assert out["rank1"]["values"] == [1.0, 1.0, 1.0] and out["rank5"]["mean"] == 1.0
    assert out["gallery"] == 9 and out["queries"] == 16  # 25 images, 9 in the gallery
    noise, noise_ids, _ = clusters(30, 4, noise=100.0)
    assert one_shot_identification(noise, noise_ids, seed=1)["rank1"]["mean"] < 0.15  # chance 1/30


def test_balanced_pair_verification(clusters):
    emb, individuals, _ = clusters(10, 4, noise=0.05)
    scores, same = balanced_pairs(emb, individuals, seed=2)
    assert same.sum() == 10 * 6 == (~same).sum()  # C(4, 2) genuine pairs per individual
    again, _ = balanced_pairs(emb, individuals, seed=2)
    other, _ = balanced_pairs(emb, individuals, seed=3)
    np.testing.assert_array_equal(scores, again)
    assert not np.array_equal(scores, other)
    val_emb, val_individuals, _ = clusters(10, 4, noise=0.05, seed=9, prefix="val")
    t = accuracy_threshold(val_emb, val_individuals)
    assert pair_verification_accuracy(emb, individuals, t) == 1.0
    noise, noise_ids, _ = clusters(10, 4, noise=100.0)
    assert 0.3 < pair_verification_accuracy(noise, noise_ids, t) < 0.7


def test_paper_protocols_leave_out_pairs_and_queries_within_a_clip(clusters):
    # 8 animals, each in 2 unrelated clips of 2 near-identical frames: only a clip's twin frame
    # finds its animal, which is the leak the main protocol keeps out.
    emb, clips, _ = clusters(16, 2, noise=0.01)
    individuals = np.array([f"cow{int(clip[2:]) // 2}" for clip in clips])
    leaky = one_shot_identification(emb, individuals, seed=1)
    fair = one_shot_identification(emb, individuals, seed=1, groups=clips)
    assert leaky["queries"] == 8 * 3 and fair["queries"] == 8 * 2
    assert fair["rank1"]["mean"] < 0.3 < leaky["rank1"]["mean"]
    _, same = balanced_pairs(emb, individuals, seed=2, groups=clips)
    assert same.sum() == 8 * (6 - 2)  # C(4, 2) genuine pairs per animal, less its 2 within-clip pairs
    t = accuracy_threshold(emb, individuals)
    assert pair_verification_accuracy(emb, individuals, t, groups=clips) < pair_verification_accuracy(
        emb, individuals, t
    )
