"""Build the bundled demo from the study's dog model: fp16 weights and a small DogFaceNet sample.

    python configs/study/make_demo.py [runs/study/dogs-arcface-112-aug/artifacts/dog]

The sample dogs are never seen in training: test individuals of the model's own split, or, for a
release model trained on its test individuals too, validation ones. For each, all photos but one
become the enrolled gallery and the last one a query; the next such dog gives the README tour's
three photos. Files are copied byte for byte (DogFaceNet, CC BY 4.0, attribution in
service/demo/ATTRIBUTION.md).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from training.artifact import export_artifact, load_artifact
from training.pipeline import split_part

DEMO = Path("service/demo")
DOGS = 8
TOUR_PHOTOS = 3


def main(artifact: Path) -> None:
    loaded = load_artifact(artifact)
    by_dog: dict[str, list[Path]] = {}
    unseen = split_part(loaded.card, "test").samples or split_part(loaded.card, "val").samples
    for sample in unseen:
        if sample.path.read_bytes()[:3] == b"\xff\xd8\xff":  # JPEG only
            by_dog.setdefault(sample.individual, []).append(sample.path)
    *chosen, tour = sorted((d for d, paths in by_dog.items() if len(paths) >= 4), key=int)[: DOGS + 1]
    for sub in ("gallery", "queries", "models", "tour"):
        shutil.rmtree(DEMO / sub, ignore_errors=True)
    (DEMO / "tour").mkdir(parents=True)
    for path in sorted(by_dog[tour])[:TOUR_PHOTOS]:
        shutil.copyfile(path, DEMO / "tour" / path.name)
    for dog in chosen:
        paths = sorted(by_dog[dog])
        (DEMO / "gallery" / dog).mkdir(parents=True)
        for path in paths[:-1]:
            shutil.copyfile(path, DEMO / "gallery" / dog / path.name)
        (DEMO / "queries").mkdir(exist_ok=True)
        shutil.copyfile(paths[-1], DEMO / "queries" / f"{dog}.jpg")
    card = loaded.card
    card.training_config = {k: v for k, v in card.training_config.items() if k != "run_dir"}
    export_artifact(loaded.model, card, DEMO / "models" / card.species, fp16=True)
    size = (DEMO / "models" / card.species / "model.safetensors").stat().st_size
    print(f"demo: {len(chosen)} dogs {chosen}, tour dog {tour}, weights {size / 2**20:.1f} MiB (fp16)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/study/dogs-arcface-112-aug/artifacts/dog"))
