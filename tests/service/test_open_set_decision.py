"""/identify decides with the model card's open-set table: threshold for the gallery's size and the
species' target FPIR, an uncertain band, a calibrated confidence, and the reason."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from apps import ADMIN, READ, AppRunner, build_artifact, make_models_dir, make_settings
from imagegen import jpeg
from test_identify import enroll

from service.ml.images import ImagePolicy
from service.services.identification import Limits, operating_point
from training.artifact import ModelCard, read_card, write_card
from training.open_set import ConfidenceModel, HerdCalibration, HerdMates, OpenSetCalibration

TABLE = OpenSetCalibration(
    gallery_sizes=[10, 1000],
    target_fpirs=[0.01, 0.1],
    thresholds=[[0.6, 0.4], [0.8, 0.6]],
    tpir=[[0.5, 0.7], [0.3, 0.5]],
    confidence_similarity=[-1.0, 1.0],
    confidence=[[0.0, 1.0], [0.0, 1.0]],
    images_per_individual=2.0,
)
HUNDRED = {2: 50}  # 50 individuals of 2 images each: the table's own images per individual
LIMITS = Limits(
    images=ImagePolicy(max_pixels=10**6, max_request_pixels=10**7),
    default_threshold=0.5,
    default_top_k=5,
    max_top_k=10,
    target_fpir=0.01,
    target_fpir_by_species={"cattle": 0.1},
    review_fpir=0.1,
)


def test_operating_point_interpolates_the_table_for_the_gallery_size() -> None:
    card = replace(read_card_stub(), open_set=TABLE)
    # 100 images: halfway in log size -> .7 at FPIR .01, .5 at FPIR .1 (the review edge)
    point = operating_point(card, LIMITS, "dog", HUNDRED, None)
    assert (point.source, point.target_fpir) == ("open_set", 0.01)
    assert point.threshold == pytest.approx(0.7)
    assert point.review_threshold == pytest.approx(0.5)
    assert "100 images of 50 individuals" in point.reason and "open-set table" in point.reason
    assert "read as" not in point.reason
    assert [point.decide(s) for s in (0.75, 0.6, 0.45, None)] == ["match", "uncertain", "unknown", "unknown"]
    assert "larger than" not in point.reason
    beyond = operating_point(
        replace(card, open_set=replace(TABLE, simulated_up_to=50)), LIMITS, "dog", HUNDRED, None
    )
    assert "larger than the 50 images its validation data could simulate" in beyond.reason
    assert "likely higher" in beyond.reason
    fitted = replace(TABLE, simulated_up_to=50, tail={"power": 9.0, "start_share": 0.003})
    extrapolated = operating_point(replace(card, open_set=fitted), LIMITS, "dog", HUNDRED, None)
    assert "extrapolates a tail fitted" in extrapolated.reason and "likely higher" not in extrapolated.reason
    # cattle's own target FPIR is the review one: no band
    cattle = operating_point(card, LIMITS, "cattle", HUNDRED, None)
    assert cattle.threshold == pytest.approx(0.5) and cattle.review_threshold is None
    # a request's threshold wins, without a band
    asked = operating_point(card, LIMITS, "dog", HUNDRED, 0.3)
    assert (asked.source, asked.threshold, asked.review_threshold) == ("request", 0.3, None)


def test_a_match_below_the_minimum_confidence_is_uncertain() -> None:
    card = replace(read_card_stub(), open_set=TABLE)
    floor = replace(LIMITS, min_match_confidence=0.8, min_match_confidence_by_species={"cattle": 0.0})
    point = operating_point(card, floor, "dog", HUNDRED, None)
    assert point.min_confidence == 0.8
    # past the threshold (.7): the confidence decides; below it, the band as before
    assert [point.decide(0.75, c) for c in (0.9, 0.8, 0.79)] == ["match", "match", "uncertain"]
    assert point.held_back(0.75, 0.79) and not point.held_back(0.6, 0.1)
    assert [point.decide(0.6, 0.99), point.decide(0.45, 0.99), point.decide(0.75)] == [
        "uncertain",
        "unknown",
        "match",
    ]
    # no floor: by species, by default, and for a request's own threshold
    assert operating_point(card, floor, "cattle", HUNDRED, None).min_confidence is None
    none = replace(LIMITS, min_match_confidence=0.0)
    assert operating_point(card, none, "dog", HUNDRED, None).decide(0.75, 0.1) == "match"
    # by default a match must be more likely right than wrong
    assert operating_point(card, LIMITS, "dog", HUNDRED, None).decide(0.75, 0.49) == "uncertain"
    asked = operating_point(card, floor, "dog", HUNDRED, 0.3)
    assert asked.min_confidence is None and asked.decide(0.75, 0.1) == "match"


# The same table with a confidence model and thresholds for a minimum match confidence of .5: at 100
# images .625 at FPIR .01 (plain .7), and .55 / .45 for a floor of .7 (below the review edge .5 at FPIR .1).
FLOORED = replace(
    TABLE,
    confidence_model=ConfidenceModel([[0.0, 0.0, 0.0]] * 2, [[0.0, 0.0, 0.0]] * 2, 0.3, 0.2),
    floor_thresholds={0.5: [[0.55, 0.4], [0.7, 0.6]], 0.7: [[0.4, 0.3], [0.5, 0.4]]},
)


def test_a_minimum_confidence_lowers_the_threshold_to_the_cards_for_that_floor_down_to_the_review_edge() -> (
    None
):
    card = replace(read_card_stub(), open_set=FLOORED)
    point = operating_point(card, LIMITS, "dog", HUNDRED, None)  # the default floor, .5
    assert point.threshold == pytest.approx(0.625) and point.review_threshold == pytest.approx(0.5)
    assert "lowered from 0.700" in point.reason and "(0.5 in the card's table)" in point.reason
    # past the lowered threshold a confident answer is a match, an unsure one uncertain; below the
    # review edge still unknown
    assert [point.decide(0.65, 0.6), point.decide(0.65, 0.4), point.decide(0.45, 0.9)] == [
        "match",
        "uncertain",
        "unknown",
    ]
    # a floor between two stored ones reads the lower one's
    assert operating_point(
        card, replace(LIMITS, min_match_confidence=0.6), "dog", HUNDRED, None
    ).threshold == (pytest.approx(0.625))
    # never below the review edge: no answer that was unknown becomes uncertain
    deep = operating_point(card, replace(LIMITS, min_match_confidence=0.7), "dog", HUNDRED, None)
    assert deep.threshold == pytest.approx(0.5) and deep.review_threshold is None
    # unchanged: no floor, no band (cattle's target is the review FPIR), a share of strangers below
    # the calibration's, a card without thresholds for floors, a request's own threshold
    plain = [
        operating_point(card, replace(LIMITS, min_match_confidence=0.0), "dog", HUNDRED, None),
        operating_point(
            card, replace(LIMITS, min_match_confidence_by_species={"cattle": 0.5}), "cattle", HUNDRED, None
        ),
        operating_point(card, replace(LIMITS, stranger_share=0.0), "dog", HUNDRED, None),
        operating_point(
            replace(card, open_set=replace(FLOORED, floor_thresholds={})), LIMITS, "dog", HUNDRED, None
        ),
    ]
    assert [p.threshold for p in plain] == pytest.approx([0.7, 0.5, 0.7, 0.7])
    assert not any("lowered" in p.reason for p in plain)
    # a larger share of strangers than the calibration's holds back more: the floor's table still applies
    assert operating_point(card, replace(LIMITS, stranger_share=0.5), "dog", HUNDRED, None).threshold == (
        pytest.approx(0.625)
    )
    assert operating_point(card, LIMITS, "dog", HUNDRED, 0.3).threshold == 0.3


def test_an_animal_with_more_photos_than_the_calibration_counts_for_fewer_animals_than_its_photos() -> None:
    card = replace(read_card_stub(), open_set=replace(TABLE, image_exponent=0.5))
    # 25 individuals of 8 photos: each counts as (8 / 2) ** 0.5 = 2 individuals of 2 -> 100 images
    point = operating_point(card, LIMITS, "dog", {8: 25}, None)
    assert point.threshold == pytest.approx(0.7) and point.table_size == 100
    assert "200 images of 25 individuals, read as 100 images at the calibration's 2.0" in point.reason
    # read by images, as a card without the exponent is: 200 images
    by_images = operating_point(replace(card, open_set=TABLE), LIMITS, "dog", {8: 25}, None)
    assert by_images.table_size == 200 and by_images.threshold > point.threshold
    # one photo each: 100 individuals count as 100 * 2 * (1 / 2) ** 0.5 = 141 images
    assert operating_point(card, LIMITS, "dog", {1: 100}, None).table_size == 141


def test_a_herd_check_raises_the_threshold_by_what_the_herd_needs_at_every_size_and_never_lowers_it() -> None:
    herd = HerdCalibration(
        checked_at="2026-12-05T22:00:00+00:00",
        images=100,
        individuals=50,
        size=100,
        rows=(
            # at 1%: 4% of the herd-mates' photos passed the table's .7; .76 held 1%
            HerdMates(target=0.01, threshold=0.7, past=0.04, interval=(0.02, 0.06), holding=0.76),
            # at 10%: the table held (5% passed)
            HerdMates(target=0.1, threshold=0.5, past=0.05, interval=(0.01, 0.09), holding=0.45),
        ),
    )
    card = replace(read_card_stub(), open_set=TABLE, herd=herd)
    point = operating_point(card, LIMITS, "dog", HUNDRED, None)
    assert (point.source, point.target_fpir) == ("herd_check", 0.01)
    assert point.threshold == pytest.approx(0.76)
    assert point.review_threshold == pytest.approx(0.5)  # the band's lower edge stays the table's
    assert (
        "raised from 0.700 by the herd check of 2026-12-05T22:00:00+00:00 (50 enrolled animals"
        in point.reason
    )
    assert "4.0% of their photos reached the table's threshold for 0.01" in point.reason
    assert [point.decide(s) for s in (0.78, 0.74, 0.45)] == ["match", "uncertain", "unknown"]
    # a gallery ten times larger: the table's threshold there, raised by the same .06
    larger = operating_point(card, LIMITS, "dog", {2: 500}, None)
    assert (larger.source, larger.threshold) == ("herd_check", pytest.approx(0.86))
    # where the herd held the table (cattle's target of 10%), and at a target the check did not
    # report, the table's threshold alone
    cattle = operating_point(card, LIMITS, "cattle", HUNDRED, None)
    assert (cattle.source, cattle.threshold) == ("open_set", pytest.approx(0.5))
    other = operating_point(card, replace(LIMITS, target_fpir=0.02), "dog", HUNDRED, None)
    assert other.source == "open_set" and "herd check" not in other.reason
    # a request's threshold wins; a herd nothing could tell apart leaves no match at all
    assert operating_point(card, LIMITS, "dog", HUNDRED, 0.3).threshold == 0.3
    alike = replace(herd, rows=(replace(herd.rows[0], holding=1.0, threshold=0.6),))
    assert operating_point(replace(card, herd=alike), LIMITS, "dog", HUNDRED, None).threshold == 1.0
    # the card keeps it, and a card without it reads as before
    assert read_back(card).herd == herd
    assert read_back(replace(card, herd=None)).herd is None


def read_back(card: ModelCard) -> ModelCard:
    return ModelCard.from_dict(json.loads(json.dumps(card.to_dict())))


def test_a_card_without_the_table_falls_back_to_its_pair_threshold_and_says_so() -> None:
    card = replace(read_card_stub(), threshold=0.61, threshold_far=0.001, open_set=None)
    point = operating_point(card, LIMITS, "dog", HUNDRED, None)
    assert (point.source, point.threshold, point.table) == ("model_card", 0.61, None)
    assert "no open-set table" in point.reason and "0.001" in point.reason
    no_threshold = operating_point(replace(card, threshold=None), LIMITS, "dog", HUNDRED, None)
    assert (no_threshold.source, no_threshold.threshold) == ("default", 0.5)


_STUB: dict[str, Path] = {}


def read_card_stub():
    return read_card(_STUB["dog"])


@pytest.fixture(scope="module", autouse=True)
def dog_with_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random test dog model with an open-set table: match only at similarity >= .9999 (the very
    same photo), uncertain down to -1 (anything else), confidence (s + 1) / 2."""
    root = tmp_path_factory.mktemp("open-set-dog")
    path = build_artifact(root / "dog", "dog", seed=0)
    table = replace(TABLE, gallery_sizes=[1, 10**6], thresholds=[[0.9999, -1.0], [0.9999, -1.0]])
    write_card(replace(read_card(path), open_set=table), path)
    _STUB["dog"] = path
    return path


def test_identify_answers_with_the_table(
    runner: AppRunner, database_url: str, tmp_path: Path, dog_with_table: Path
) -> None:
    models = make_models_dir(tmp_path, {"dog": dog_with_table}, dog="dog")
    client = runner.start(make_settings(database_url, tmp_path, models, review_fpir=0.1))
    enroll(client, 300, shots=range(2))
    enroll(client, 301, shots=range(2))

    def ask(image: bytes, **fields: str) -> dict:
        data = {"species": "dog", **fields}
        response = client.post("/identify", data=data, files={"image": image}, headers=READ)
        assert response.status_code == 200, response.text
        return response.json()

    same = ask(jpeg(300, 0))
    assert (same["decision"], same["threshold_source"], same["target_fpir"]) == ("match", "open_set", 0.01)
    assert same["threshold"] == pytest.approx(0.9999) and same["review_threshold"] == pytest.approx(-1.0)
    assert same["confidence"] == pytest.approx((same["candidates"][0]["similarity"] + 1) / 2, abs=1e-6)
    assert "4 images" in same["reason"]
    # The species tells how /identify decides now, beside the card's pair threshold.
    described = client.get("/species/dog", headers=READ).json()
    point = described["identify"]
    assert {key: point[key] for key in ("threshold", "threshold_source", "target_fpir", "reason")} == {
        key: same[key] for key in ("threshold", "threshold_source", "target_fpir", "reason")
    }
    assert point["review_threshold"] == same["review_threshold"] and point["gallery_images"] == 4
    assert point["min_confidence"] == same["min_confidence"] == 0.5
    table = read_card(dog_with_table).open_set
    assert table is not None
    assert point["expected_tpir"] == pytest.approx(table.expected_tpir(table.equivalent_size({2: 2}), 0.01))
    assert described["threshold"] == read_card(dog_with_table).threshold != point["threshold"]
    other = ask(jpeg(300, 7))
    assert (other["decision"], other["best"]) == ("uncertain", None)
    assert other["confidence"] == pytest.approx((other["candidates"][0]["similarity"] + 1) / 2, abs=1e-6)
    asked = ask(jpeg(300, 7), threshold="-1")
    assert (asked["decision"], asked["threshold_source"]) == ("match", "request")


def margin_confidence_models(dog_with_table: Path, tmp_path: Path) -> Path:
    """A models folder whose dog card's confidence is P(enrolled) * P(right): the likelihood ratio
    enrolled : stranger 1 everywhere (P(enrolled) is the configured share's complement; the card's
    share is a half), and the log odds of right 4 * the margin over the second individual."""
    model = ConfidenceModel([[0.0, 0.0, 0.0]] * 2, [[0.0, 0.0, 4.0]] * 2, stranger_share=0.5, max_margin=2.0)
    card = read_card(dog_with_table)
    assert card.open_set is not None
    path = write_card(
        replace(card, open_set=replace(card.open_set, confidence_model=model)),
        tmp_path / "dog",
        weights_from=dog_with_table,
    )
    return make_models_dir(tmp_path, {"dog": path}, dog="dog")


def test_the_confidence_uses_the_second_individual_and_the_configured_share_of_strangers(
    runner: AppRunner, database_url: str, tmp_path: Path, dog_with_table: Path
) -> None:
    models = margin_confidence_models(dog_with_table, tmp_path)
    answers = {}
    for share in (None, 0.0):
        client = runner.start(make_settings(database_url, tmp_path, models, stranger_share=share))
        if share is None:
            enroll(client, 300, shots=range(2))
            enroll(client, 301, shots=range(2))
        for top_k in ("1", "2"):
            data = {"species": "dog", "top_k": top_k}
            response = client.post("/identify", data=data, files={"image": jpeg(300, 7)}, headers=READ)
            assert response.status_code == 200, response.text
            answers[share, top_k] = response.json()
        runner.stop(client)
    both = answers[0.0, "2"]["candidates"]
    right = 1 / (1 + math.exp(-4 * (both[0]["similarity"] - both[1]["similarity"])))
    # one candidate listed, the second individual still counted
    assert len(answers[0.0, "1"]["candidates"]) == 1
    assert answers[0.0, "1"]["confidence"] == pytest.approx(right, abs=1e-5)
    assert answers[0.0, "2"]["confidence"] == pytest.approx(right, abs=1e-5)
    # by default the card's share (half the queries of strangers): P(enrolled) = .5
    assert answers[None, "1"]["confidence"] == pytest.approx(0.5 * right, abs=1e-5)


def test_a_confident_enough_match_only_is_a_match_and_the_rest_go_to_review(
    runner: AppRunner, database_url: str, tmp_path: Path, dog_with_table: Path
) -> None:
    # the card's share of strangers is a half and the likelihood ratio 1: every confidence <= .5
    models = margin_confidence_models(dog_with_table, tmp_path)
    answers = {}
    for floors in ({}, {"dog": 0.0}):
        settings = make_settings(
            database_url,
            tmp_path,
            models,
            review_queue=True,
            min_match_confidence=0.6,
            min_match_confidence_by_species=floors,
        )
        client = runner.start(settings)
        if not floors:
            enroll(client, 300, shots=range(2))
            enroll(client, 301, shots=range(2))
        photo = {"image": jpeg(300, 0)}
        response = client.post("/identify", data={"species": "dog"}, files=photo, headers=READ)
        assert response.status_code == 200, response.text
        answers[bool(floors)] = response.json()
        runner.stop(client)
    held = answers[False]
    # the very same photo passes the threshold, but its confidence is below the floor
    assert held["candidates"][0]["similarity"] >= held["threshold"] and held["confidence"] < 0.6
    assert (held["decision"], held["best"], held["min_confidence"]) == ("uncertain", None, 0.6)
    assert "below the 0.6 a match needs" in held["reason"] and held["review_id"] is not None
    # the species' own floor of 0 wins over the default
    free = answers[True]
    assert (free["decision"], free["min_confidence"], free["review_id"]) == ("match", None, None)
    assert free["best"]["external_id"] == held["candidates"][0]["external_id"]


def test_a_relabelled_card_serves_another_species_and_says_what_it_was_trained_for(
    runner: AppRunner, database_url: str, tmp_path: Path, dog_with_table: Path
) -> None:
    lion = write_card(
        replace(read_card(dog_with_table), species="lion", relabelled_from="dog"),
        tmp_path / "lion",
        weights_from=dog_with_table,
    )
    models = make_models_dir(tmp_path, {"lion": lion, "dog": dog_with_table}, lion="lion", cat="dog")
    client = runner.start(make_settings(database_url, tmp_path, models))
    species = {s["name"]: s for s in client.get("/species", headers=READ).json()["data"]}
    assert (species["lion"]["status"], species["lion"]["trained_for"]) == ("ready", "dog")
    assert species["cat"]["status"] == "disabled"
    # What to do is in the admin status, beside the error (the open /species says only what failed).
    status = {s["name"]: s for s in client.get("/status", headers=ADMIN).json()["species"]}
    assert "animalid calibrate ARTIFACT --as-species cat" in status["cat"]["detail"]
