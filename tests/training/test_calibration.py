"""Calibrating an artifact (own validation individuals, other data, another species) and evaluating it
on every individual of new data with its own calibration."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from synthetic import make_folder_dataset
from tiny_runs import tiny_config

from training.artifact import load_artifact, read_card, sha256_file, write_card
from training.calibration import calibrate_artifact, data_shard, evaluate_all_individuals
from training.cli import main
from training.config import DatasetConfig
from training.evaluate import calibrate_threshold, embed_pixels
from training.open_set import HerdCalibration, HerdMates
from training.pipeline import card_config, evaluate_artifact, export_run, split_part
from training.train import fit


@pytest.fixture(scope="module")
def goat_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("goat")
    goats = make_folder_dataset(root / "goats", n_individuals=30, n_images=6, size=32)
    (artifact,) = export_run(fit(tiny_config(root, {"goat": goats}, epochs=1)))
    return artifact


@pytest.fixture(scope="module")
def lions(tmp_path_factory):
    """Another species' data: eight lions, five photos each."""
    return make_folder_dataset(tmp_path_factory.mktemp("lions"), n_individuals=8, n_images=5, size=32, seed=9)


def test_export_stores_the_open_set_table_and_reports_it(goat_artifact):
    card = read_card(goat_artifact)
    assert card.open_set is not None
    # 30 individuals, 15% validation: 4 (5 is 4.5 rounded to even)
    assert card.open_set.counts["individuals"] == len(set(split_part(card, "val").individuals)) == 4
    report = (goat_artifact / "report" / "report.md").read_text()
    assert "## Open-set calibration (1:N search)" in report
    assert (goat_artifact / "report" / "open_set_fpir_fnir.png").is_file()
    # the thresholds a minimum match confidence of .5 needs are stored and reported
    assert 0.5 in card.open_set.floor_thresholds
    assert "With a minimum match confidence of 0.5" in report


def test_recalibrating_on_its_own_validation_individuals_copies_the_weights(goat_artifact, tmp_path):
    # a deployment's herd check measured the old table: the new one drops it
    checked = tmp_path / "checked"
    herd = HerdCalibration(
        "2026-12-05T22:00:00+00:00", 40, 20, 40, (HerdMates(0.01, 0.7, 0.04, (0.0, 0.1), 0.8),)
    )
    write_card(replace(read_card(goat_artifact), herd=herd), checked, weights_from=goat_artifact)
    assert read_card(checked).herd == herd
    out, table = calibrate_artifact(checked, tmp_path / "copy", device="cpu")
    card, original = read_card(out), read_card(goat_artifact)
    assert card.herd is None
    assert sha256_file(out / "model.safetensors") == original.weights_sha256 == card.weights_sha256
    assert card.open_set is not None and card.open_set.to_dict() == original.open_set.to_dict()
    assert (card.species, card.threshold, card.relabelled_from) == ("goat", original.threshold, None)
    assert card.warnings == original.warnings and "calibrated on 4 validation individuals" in card.warnings[0]
    load_artifact(out)


def test_another_species_needs_an_explicit_relabel_that_the_card_records(goat_artifact, lions, tmp_path):
    data = [DatasetConfig(source=str(lions), species="lion")]
    with pytest.raises(ValueError, match="--as-species lion"):
        calibrate_artifact(goat_artifact, tmp_path / "lion", data, device="cpu")
    with pytest.raises(ValueError, match="--as-species"):
        evaluate_artifact(goat_artifact, tmp_path / "eval", data, device="cpu")
    out, table = calibrate_artifact(goat_artifact, tmp_path / "lion", data, as_species="lion", device="cpu")
    card = read_card(out)
    assert (card.species, card.relabelled_from) == ("lion", "goat")
    assert card.model_version.startswith("lion-")
    assert table.counts["individuals"] == 8 and table.counts["images"] == 40
    # the pair threshold is recalibrated on the lions, at the card's FAR
    loaded = load_artifact(goat_artifact)
    shard = data_shard(card_config(card), data, card)
    emb = embed_pixels(loaded.model, shard.pixels, card.preprocess, "cpu")
    expected = calibrate_threshold(emb, np.array(shard.individuals), 1e-3)
    assert (card.threshold, card.threshold_far) == (pytest.approx(expected), 1e-3)
    # ... and the card says what it now rests on: 8 lions, not the goat card's 4 validation goats
    assert card.metrics["calibration_individuals"] == 8
    assert (
        len(card.warnings) == 1
        and f"calibrated on 8 individuals of {lions}, fewer than 30" in card.warnings[0]
    )
    evaluated = evaluate_artifact(goat_artifact, tmp_path / "eval", data, device="cpu", as_species="lion")
    assert evaluated.species == "lion"


def test_evaluate_all_individuals_tests_on_every_individual_with_the_cards_calibration(
    goat_artifact, lions, tmp_path, capsys
):
    argv = ["evaluate", str(goat_artifact), "--out", str(tmp_path / "all"), "--dataset", f"{lions}:lion"]
    assert main([*argv, "--all-individuals"]) == 2  # a user error: one line, no traceback
    assert "--as-species lion" in capsys.readouterr().err
    assert main([*argv, "--all-individuals", "--as-species", "lion", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["test_individuals"] == 8 and printed["test_images"] == 40
    assert printed["threshold"] == read_card(goat_artifact).threshold
    evaluated = evaluate_all_individuals(
        goat_artifact,
        tmp_path / "all2",
        [DatasetConfig(source=str(lions), species="lion")],
        as_species="lion",
    )
    assert "## Open-set calibration" in evaluated.report.read_text()
