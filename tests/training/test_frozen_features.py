"""A metric learnt on frozen features (``cache_features``): the backbone embeds each photo once, the
neck and head learn on those features, and the result is still one ordinary artifact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import tiny_config

from training.artifact import load_artifact
from training.config import build_config
from training.frozen_features import backbone_features, neck_embeddings
from training.pipeline import export_run
from training.preprocess import normalize
from training.train import build_model, build_train_module, fit, prepare_data, preprocess_spec

CPU = torch.device("cpu")


def _config(tmp_path, animals, **overrides):
    """Lite0's ImageNet backbone at 48 px with cached features."""
    lite = {"backbone": "efficientnet_lite0", "pretrained": "imagenet", "input_size": 48, "eval_repeats": 2}
    return tiny_config(tmp_path, {"goat": animals}, **(lite | {"cache_features": True} | overrides))


def _state(run: Path, prefix: str) -> dict[str, torch.Tensor]:
    model = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    return {k[len(prefix) :]: v for k, v in model.items() if k.startswith(prefix)}


def test_the_neck_learns_while_the_backbone_stays_the_pretrained_one(tmp_path, animals):
    config = _config(tmp_path, animals, epochs=4)
    start = build_model(config)
    run = fit(config)
    backbone = _state(run, "backbone.")
    assert backbone.keys() == start.backbone.state_dict().keys()
    assert all(
        torch.equal(backbone[k], v) for k, v in start.backbone.state_dict().items()
    )  # BN statistics too
    assert not torch.equal(_state(run, "neck.")["1.weight"], start.neck.state_dict()["1.weight"])
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(records) == 4 and records[-1]["loss"] < records[0]["loss"]
    assert all(0 <= r["val_top1_goat"] <= 1 for r in records)

    # The export is the whole network, and embeds photos as backbone-then-neck did in training.
    (artifact,) = export_run(run, tmp_path / "out")
    card = json.loads((artifact / "model_card.json").read_text())
    assert card["architecture"] == "efficientnet_lite0-gap-linear-bn"
    assert card["training_config"]["cache_features"] is True
    model = load_artifact(artifact).model.eval()
    spec = preprocess_spec(config)
    pixels = prepare_data(config, spec)[0].test.pixels[:5]
    features = backbone_features(model, pixels, spec, CPU, mirror=False)[:, 0]
    assert np.allclose(
        neck_embeddings(model, features, CPU), model.embed(normalize(pixels, spec)).numpy(), atol=1e-5
    )


def test_cached_features_give_the_loss_the_whole_network_gives(tmp_path, animals):
    config = _config(tmp_path, animals)
    spec = preprocess_spec(config)
    data = prepare_data(config, spec)
    module, frozen = build_train_module(config, data)
    assert len(frozen) == len(module.model.spec.stages(module.model.backbone))
    assert not any(p.requires_grad for p in module.model.backbone.parameters())
    module.eval()
    pixels, labels = data[0].train.pixels[:8], data[0].labels[:8]
    species = torch.zeros(8, dtype=torch.int64)
    features = backbone_features(module.model, pixels, spec, CPU, mirror=True)
    assert features.shape == (8, 2, 1280)
    mirrored = module.model.backbone(normalize(pixels, spec).flip(-1))
    assert torch.allclose(features[:, 1], mirrored, atol=1e-5)
    with torch.no_grad():
        on_features = module(features[:, 0], labels, species)
        module.on_features = False
        on_pixels = module(normalize(pixels, spec), labels, species)
    assert on_features.item() == pytest.approx(on_pixels.item(), rel=1e-5)


def test_cache_features_needs_a_pretrained_start_and_a_trained_neck():
    with pytest.raises(ValueError, match="cache_features"):
        build_config({"cache_features": True})
    with pytest.raises(ValueError, match="cache_features"):
        build_config({"cache_features": True, "backbone": "efficientnet_lite0", "pretrained": "imagenet",
                      "neck": "identity"})  # fmt: skip
    assert build_config({"cache_features": True, "backbone": "efficientnet_lite0", "pretrained": "imagenet"})
