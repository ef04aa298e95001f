"""Print the study's result tables (Markdown) from the exported model cards and run times.

    python configs/study/tables.py [runs/study]

Every number comes from ``<run>/artifacts/<species>/model_card.json`` (written by ``animalid
train``/``export``) and ``times.jsonl`` (written by run_all.sh).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [
    ("top-1", "top1", True),
    ("top-5", "top5", True),
    ("mAP", "map", True),
    ("TAR@FAR1e-3", "tar_at_far_0.001", False),
    ("EER", "eer", False),
    ("unknown AUROC", "open_set_auroc", False),
    ("threshold", None, False),
    ("test FAR", "test_far", False),
    ("open-set F1", "open_set_f1", False),
]


def fmt(metrics: dict, key: str, with_std: bool) -> str:
    value = metrics.get(key)
    if value is None:
        return "n/a"
    text = f"{value:.3f}"
    if with_std and metrics.get(f"{key}_std") is not None:
        text += f" ± {metrics[f'{key}_std']:.3f}"
    return text


def main(root: Path) -> None:
    times = {}
    if (root / "times.jsonl").is_file():
        for line in (root / "times.jsonl").read_text().splitlines():
            record = json.loads(line)
            times[record["run"]] = record
    header = ["run", "species", "epochs", *[c[0] for c in COLUMNS]]
    header += ["individuals / images (test)", "wall time", "device"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for card_path in sorted(root.glob("*/artifacts/*/model_card.json")):
        card = json.loads(card_path.read_text())
        run = card_path.parents[2].name
        m = card["metrics"]
        cells = [run, card["species"], str(card["training_config"].get("epochs_trained", "?"))]
        for _, key, with_std in COLUMNS:
            cells.append(f"{card['threshold']:.3f}" if key is None else fmt(m, key, with_std))
        cells.append(f"{m.get('test_individuals')} / {m.get('test_images')}")
        t = times.get(run)
        cells.append(f"{t['wall_s'] / 60:.0f} min" if t else "?")
        cells.append(t["device"] if t else "?")
        print("| " + " | ".join(cells) + " |")
    print()
    print("| run | species | verification accuracy (balanced pairs) | one-shot rank-1 | one-shot rank-5 |")
    print("|---|---|---|---|---|")
    for card_path in sorted(root.glob("*/artifacts/*/model_card.json")):
        card = json.loads(card_path.read_text())
        m = card["metrics"]
        accuracy = fmt(m, "pair_verification_accuracy", False)
        print(
            f"| {card_path.parents[2].name} | {card['species']} | {accuracy} "
            f"| {fmt(m, 'one_shot_rank1', True)} | {fmt(m, 'one_shot_rank5', True)} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/study"))
