"""Fusion (``animalid fuse``): networks trained on different data become one artifact whose
similarity is the weighted mean of theirs, evaluated on the split they share."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from synthetic import make_folder_dataset
from tiny_runs import tiny_config

from training.artifact import ArtifactError, ModelCard, load_artifact, read_card
from training.cli import main
from training.config import build_config
from training.evaluate import embed_pixels
from training.fusion import Branch, FusedEmbeddingNet, trainable_branches
from training.model import FUSION_ARCHITECTURE
from training.pipeline import (
    RELEASE_NOTE,
    evaluate_artifact,
    export_run,
    fuse_artifacts,
    split_part,
    with_study_figures,
)
from training.preprocess import PreprocessSpec
from training.train import build_model, fit, prepare_data, preprocess_spec


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two dog-like models of one split: Lite0's ImageNet features at 48 px and a ResNet18 at 32 px
    trained for one epoch; and a ResNet18 of another split (another seed)."""
    root = tmp_path_factory.mktemp("fusion")
    animals = make_folder_dataset(root / "animals", n_individuals=14, n_images=6, size=48)

    def artifact(name, **overrides):
        small = {"name": name, "embedding_dim": 16, "epochs": 1, "eval_repeats": 2}
        held_out = {"val_fraction": 0.3, "test_fraction": 0.3}
        config = tiny_config(root, {"goat": animals}, **(small | held_out | overrides))
        (path,) = export_run(fit(config), root / "artifacts" / name)
        return path, config

    return {
        "lite": artifact(
            "lite",
            backbone="efficientnet_lite0",
            pretrained="imagenet",
            neck="identity",
            epochs=0,
            input_size=48,
        ),
        "resnet": artifact("resnet"),
        "other_split": artifact("other", seed=1),
        "release": artifact("release", train_on_test=True),
        "root": root,
    }


def test_the_fused_similarity_is_the_weighted_mean_of_the_models(models, tmp_path):
    (lite, lite_config), (resnet, resnet_config) = models["lite"], models["resnet"]
    out = fuse_artifacts([lite, resnet], tmp_path / "fused", weights=[3, 1], device="cpu")
    card = json.loads((out / "model_card.json").read_text())
    assert card["architecture"] == "fusion-concat" and card["backbone"] == "fusion"
    assert card["embedding_dim"] == 1280 + 16 and card["input_size"] == [48, 48]
    assert [(b["architecture"], b["weight"], b["input_size"]) for b in card["fusion"]] == [
        ("efficientnet_lite0-gap-identity", 0.75, [48, 48]),
        ("resnet18-gap-linear-bn", 0.25, [32, 32]),
    ]
    assert card["threshold"] is not None and 0 <= card["metrics"]["top1"] <= 1
    # Each network keeps its own recipe: the frozen Lite0 trained for 0 epochs, the ResNet for 1.
    assert [b["training_config"]["epochs"] for b in card["fusion"]] == [0, 1]
    assert (out / "report" / "report.md").is_file()

    fused = load_artifact(out)
    assert isinstance(fused.model, FusedEmbeddingNet)
    test = prepare_data(lite_config, fused.card.preprocess)[0].test
    emb = embed_pixels(fused.model, test.pixels, fused.card.preprocess, "cpu")
    # Each model on the photos as its own preprocessing makes them (the ResNet's 32 px directly from
    # the photo, the fused model's from its 48 px input: nearly the same pixels).
    per_model = []
    for path, config in ((lite, lite_config), (resnet, resnet_config)):
        loaded = load_artifact(path)
        pixels = prepare_data(config, loaded.card.preprocess)[0].test.pixels
        per_model.append(embed_pixels(loaded.model, pixels, loaded.card.preprocess, "cpu"))
    expected = 0.75 * per_model[0] @ per_model[0].T + 0.25 * per_model[1] @ per_model[1].T
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert np.abs(emb @ emb.T - expected).max() < 0.02


def test_models_of_different_splits_or_a_fused_model_are_refused_and_a_run_starts_from_its_trained_network(
    models, tmp_path
):
    lite, resnet, other = models["lite"][0], models["resnet"][0], models["other_split"][0]
    with pytest.raises(ValueError, match="different splits"):
        fuse_artifacts([lite, other], tmp_path / "x", device="cpu")
    # A network trained on the sessions another held back would see the closed-set queries.
    held_back = tmp_path / "held-back"
    shutil.copytree(resnet, held_back)
    card = json.loads((held_back / "model_card.json").read_text())
    card["training_config"]["holdout_sessions"] = 0.5
    (held_back / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="held back different sessions"):
        fuse_artifacts([held_back, lite], tmp_path / "x", device="cpu")
    with pytest.raises(ValueError, match="one positive weight per model"):
        fuse_artifacts([lite, resnet], tmp_path / "x", weights=[1.0], device="cpu")
    fused = fuse_artifacts([lite, resnet], tmp_path / "fused", device="cpu")
    with pytest.raises(ArtifactError, match="itself a fused model"):
        fuse_artifacts([fused, resnet], tmp_path / "y", device="cpu")
    # Training from a fused model starts from its trained network (the ResNet; the Lite0 is frozen
    # features), with that network's architecture and preprocessing.
    config = build_config({"init_from": str(fused), "datasets": [{"source": "x", "species": "goat"}]})
    assert (config.backbone, config.neck, config.embedding_dim) == ("resnet18", "linear_bn", 16)
    assert preprocess_spec(replace(config, input_size=32)) == load_artifact(resnet).card.preprocess
    started, trained = build_model(config).state_dict(), load_artifact(fused).model.net(1).state_dict()
    assert started.keys() == trained.keys()
    assert all(torch.equal(started[k], trained[k]) for k in started)


def test_the_fuse_command_writes_the_artifact_and_prints_its_figures(models, tmp_path, capsys):
    lite, resnet = models["lite"][0], models["resnet"][0]
    out = tmp_path / "cli"
    code = main(
        ["fuse", str(lite), str(resnet), "--weights", "0.9", "0.1", "--out", str(out), "--device", "cpu"]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["artifact"] == str(out) and "top1" in printed
    assert [
        b["weight"] for b in json.loads((out / "model_card.json").read_text())["fusion"]
    ] == pytest.approx([0.9, 0.1])
    assert main(["fuse", str(lite), "--out", str(tmp_path / "one")]) == 2
    assert "animalid-train fuse: error: fuse needs at least two artifacts" in capsys.readouterr().err


def test_a_fused_card_keeps_each_network_s_recipe_and_an_old_card_still_loads():
    spec = PreprocessSpec(input_size=(32, 32))
    branches = [
        Branch("resnet18-gap-linear-bn", 16, spec, 0.7, "goat-aaa", {"epochs": 0, "lr": 0.1}),
        Branch("resnet18-gap-linear-bn", 8, spec, 0.3, "goat-bbb", {"epochs": 2, "lr": 0.05}),
    ]
    card = ModelCard("goat", 24, spec, architecture=FUSION_ARCHITECTURE, fusion=branches)
    data = json.loads(json.dumps(card.to_dict()))
    assert ModelCard.from_dict(data).fusion == branches
    assert trainable_branches(card) == [1]  # the frozen-feature network stays as it is

    for entry in data["fusion"]:
        del entry["training_config"]
    old = ModelCard.from_dict(data)  # a card fused before branches recorded their recipe
    assert old.fusion is not None and [b.training_config for b in old.fusion] == [None, None]
    assert [b.to_dict() for b in old.fusion] == data["fusion"]  # written back as it was
    with pytest.raises(ValueError, match="does not record each network's training configuration"):
        trainable_branches(old)
    frozen = ModelCard.from_dict(card.to_dict() | {"fusion": [branches[0].to_dict()] * 2})
    with pytest.raises(ValueError, match="nothing to fine-tune"):
        trainable_branches(frozen)


def test_a_release_network_makes_a_release_model_calibrated_on_validation_that_records_the_study_figures(
    models, tmp_path, capsys
):
    """A network trained on its test individuals too (train_on_test) has no test figures: it and a
    fusion with it are calibrated on the validation individuals, and the fused card can record the
    test figures of the same recipe on the study split."""
    lite, resnet, release = models["lite"][0], models["resnet"][0], models["release"][0]
    card = load_artifact(release).card
    assert card.metrics == {"calibration_individuals": 4, "test_individuals": 0}
    assert card.threshold is not None and RELEASE_NOTE in card.warnings
    val = {s.individual for s in split_part(card, "val").samples}
    assert not split_part(card, "test").samples
    assert val == {s.individual for s in split_part(load_artifact(resnet).card, "val").samples}
    with pytest.raises(ValueError, match="trained on its test individuals too"):
        evaluate_artifact(release, tmp_path / "eval", device="cpu")

    study = read_card(fuse_artifacts([lite, resnet], tmp_path / "study", device="cpu"))
    out = tmp_path / "release"
    argv = ["fuse", str(lite), str(release), "--out", str(out), "--device", "cpu"]
    assert main([*argv, "--study-figures", str(tmp_path / "study")]) == 0
    fused = read_card(out)
    assert fused.training_config["train_on_test"] is True and not split_part(fused, "test").samples
    assert {s.individual for s in split_part(fused, "val").samples} == val
    assert fused.metrics["test_individuals"] == 0 and fused.threshold is not None
    assert fused.metrics["study_split"] == {"model_version": study.model_version} | study.metrics
    assert (
        json.loads(capsys.readouterr().out.strip().splitlines()[-1])["study_split"]["top1"]
        == study.metrics["top1"]
    )
    load_artifact(out)  # the card still pins the weights
    with pytest.raises(ValueError, match="has test figures of its own"):
        with_study_figures(study, study)
    # A release network and one of another validation split are still refused.
    with pytest.raises(ValueError, match="calibration animals must be new to all"):
        fuse_artifacts([release, models["other_split"][0]], tmp_path / "x", device="cpu")
