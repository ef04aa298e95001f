"""No skew between training and serving: the service's identifications over HTTP equal the training
package's offline evaluation, with dog models on real DogFaceNet photos.

Both sides use the study's protocol on the same split: half of each individual's photos enrolled
(over ``POST /enroll``), the rest identified (over ``POST /identify``), against the offline
``embed_pixels`` + ``identification_ranks`` of the training package. The bundled demo gallery (real
photos, shipped with the project) always runs, with the shipped demo model; the held-out test dogs
from the shared DogFaceNet (found by ``tests/shared_data.py``) run where it exists, with the
ResNet18 dog model of the study (``tests/data/dog-resnet18``, ``dogs-arcface-112-aug``): its 1,377
photos through the EfficientNet-Lite2 demo model would cost the suite minutes for the same check.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from apps import TestClient, make_models_dir, make_settings
from shared_data import shared_manifest

from service.app import create_app
from training.artifact import load_artifact
from training.data import Dataset, build_shard, enrol_query_split, load_dataset
from training.evaluate import embed_pixels
from training.metrics import identification_ranks, individual_scores, similarity, topk_accuracy
from training.pipeline import held_out

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "service" / "demo"
DOG_MODEL = DEMO / "models" / "dog"
STUDY_MODEL = ROOT / "tests" / "data" / "dog-resnet18"
SPLIT_SEED = 7
# Batched (enroll) and single-image (identify) forward passes differ in the last float bits, so two
# individuals scoring within this of each other may swap places; no other disagreement is allowed.
TIE = 1e-4


def demo_gallery() -> Dataset:
    return load_dataset(DEMO / "gallery", species="dog")


def held_out_dogs() -> Dataset:
    """The test individuals of the split the study's dog model was trained with."""
    return held_out(load_artifact(STUDY_MODEL).card, source=shared_manifest("dogfacenet"))


def offline_identification(
    model: Path, dataset: Dataset, enrol: np.ndarray, query: np.ndarray
) -> tuple[np.ndarray, ...]:
    """The training package's answer: per query, the top-1 individual, its score and the runner-up's."""
    loaded = load_artifact(model)
    shard = build_shard(dataset, loaded.card.preprocess)
    emb = embed_pixels(loaded.model, shard.pixels, loaded.card.preprocess, "cpu")
    labels = np.array(shard.individuals)
    sim = similarity(emb[query], emb[enrol])
    ranks = identification_ranks(sim, labels[query], labels[enrol])
    individuals, scores = individual_scores(sim, labels[enrol])
    order = np.argsort(-scores, axis=1, kind="stable")
    rows = np.arange(len(query))
    return ranks, individuals[order[:, 0]], scores[rows, order[:, 0]], scores[rows, order[:, 1]]


@pytest.mark.parametrize(
    ("source", "model"),
    [(demo_gallery, DOG_MODEL), (held_out_dogs, STUDY_MODEL)],
    ids=["demo-gallery", "dogfacenet-test-dogs"],
)
def test_service_top1_equals_the_offline_evaluation(
    source, model: Path, database_url: str, tmp_path: Path
) -> None:
    dataset = source()
    individuals = [s.individual for s in dataset.samples]
    enrol, query = enrol_query_split(
        individuals, [s.group for s in dataset.samples], random.Random(SPLIT_SEED)
    )
    ranks, offline_top1, offline_score, runner_up = offline_identification(model, dataset, enrol, query)

    models = make_models_dir(tmp_path, {"dog": model}, dog="dog")
    with TestClient(create_app(make_settings(database_url, tmp_path, models))) as client:
        client.headers["x-api-key"] = "admin-key-0001"
        by_individual: dict[str, list[int]] = {}
        for i in enrol:
            by_individual.setdefault(individuals[i], []).append(int(i))
        for individual, items in by_individual.items():
            files = [
                ("images", (dataset.samples[i].path.name, dataset.samples[i].path.read_bytes()))
                for i in items
            ]
            response = client.post("/enroll", data={"species": "dog", "external_id": individual}, files=files)
            assert response.status_code == 201, response.text

        served_top1, served_score = [], []
        for i in query:
            path = dataset.samples[i].path
            response = client.post(
                "/identify",
                data={"species": "dog", "top_k": "1"},
                files={"image": (path.name, path.read_bytes())},
            )
            assert response.status_code == 200, response.text
            best = response.json()["candidates"][0]
            served_top1.append(best["external_id"])
            served_score.append(best["similarity"])

    served_top1_arr, served_score_arr = np.array(served_top1), np.array(served_score)
    truth = np.array(individuals)[query]
    np.testing.assert_allclose(served_score_arr, offline_score, atol=1e-3)
    near_tie = offline_score - runner_up < TIE
    disagree = (served_top1_arr != offline_top1) & ~near_tie
    assert not disagree.any(), f"{int(disagree.sum())} of {len(query)} queries identified differently"
    served_accuracy = float(np.mean(served_top1_arr == truth))
    print(f"{len(query)} queries: served top-1 {served_accuracy:.4f}, offline {topk_accuracy(ranks, 1):.4f}")
    assert served_accuracy == pytest.approx(topk_accuracy(ranks, 1), abs=near_tie.mean() + 1e-12)
    assert served_accuracy > 0.2, "the trained dog model should identify real dogs far above chance"
