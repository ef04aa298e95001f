"""Training throughput of the real pipeline next to the bare forward+backward of the same batch.

    python bench/train_throughput.py [--input-size 112] [--batch-size 128] [--steps 8] [--device auto]

The pipeline figure comes from ``train_one_epoch`` (batch gather from the uint8 shard, augmentation,
normalisation, host-to-device copy, forward, loss, backward, step); the bare figure from the same
model, head, optimizer and batch size stepping on one batch already on the device. The target is
pipeline / bare >= 0.80.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from training.config import build_config
from training.data import Shard
from training.preprocess import PreprocessSpec, normalize
from training.train import (
    DistInfo,
    SpeciesData,
    build_optimizer,
    build_train_module,
    resolve_device,
    train_one_epoch,
)


def synthetic_species(n_images: int, n_classes: int, size: int) -> SpeciesData:
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, (n_images, 3, size, size), dtype=np.uint8))
    individuals = [f"i{k % n_classes}" for k in range(n_images)]
    shard = Shard(pixels, individuals, individuals, [""] * n_images, "bench", "synthetic")
    labels = torch.tensor([k % n_classes for k in range(n_images)])
    return SpeciesData(
        "bench", shard, shard, shard, [f"i{k}" for k in range(n_classes)], labels, 1.0, "synthetic"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per measurement")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    config = build_config(
        {
            "datasets": [{"source": "synthetic", "species": "bench"}],
            "input_size": args.input_size,
            "batch_size": args.batch_size,
            "epochs": 1,
            "device": args.device,
        }
    )
    device = resolve_device(config.device)
    spec = PreprocessSpec(input_size=(args.input_size, args.input_size))
    data = [synthetic_species(args.batch_size * args.steps, 500, args.input_size)]
    module, _ = build_train_module(config, data)
    module.to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, module)
    use_amp = device.type == "cuda"

    # Bare: one fixed, normalised batch already on the device.
    images = normalize(data[0].train.pixels[: args.batch_size].to(device), spec).contiguous(
        memory_format=torch.channels_last
    )
    labels = data[0].labels[: args.batch_size].to(device)
    species = torch.zeros(args.batch_size, dtype=torch.int64, device=device)

    def bare_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = module(images, labels, species)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        bare_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        bare_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    bare = args.steps * args.batch_size / (time.perf_counter() - start)

    train_one_epoch(module, optimizer, data, config, spec, 0, device, DistInfo())  # warm-up
    stats = train_one_epoch(module, optimizer, data, config, spec, 1, device, DistInfo())
    pipeline = stats["images_per_s"]
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"device: {name}; ResNet18 + ArcFace, input {args.input_size}px, batch {args.batch_size}, "
        f"{args.steps} steps, torch {torch.__version__}"
    )
    print(f"| {'measure':<38} | {'images/s':>9} |")
    print(f"|{'-' * 40}|{'-' * 11}|")
    print(f"| {'bare forward+backward+step':<38} | {bare:>9.1f} |")
    print(f"| {'training pipeline (train_one_epoch)':<38} | {pipeline:>9.1f} |")
    print(f"| {'pipeline / bare (target >= 0.80)':<38} | {pipeline / bare:>9.2f} |")


if __name__ == "__main__":
    main()
