"""training.report: the report folder a model ships with."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from PIL import Image

from training.evaluate import evaluate_embeddings, summarise
from training.report import write_report


@pytest.fixture(scope="module")
def result(clusters):
    emb, individuals, groups = clusters(12, 5, noise=0.5, frames_per_group=2)
    strangers, stranger_ids, _ = clusters(3, 4, noise=0.5, seed=5, prefix="stranger")
    return evaluate_embeddings(
        emb,
        individuals,
        groups,
        threshold=0.4,
        n_repeats=3,
        strangers_emb=strangers,
        strangers_individuals=stranger_ids,
    )


def test_report_writes_tables_plots_and_metrics(result, tmp_path):
    grid = Image.new("RGB", (64, 32), (200, 10, 10))
    card = {"species": "cattle", "model_version": "cattle-0123456789ab", "training_config": {"epochs": 3}}
    path = write_report(result, tmp_path / "report", title="cattle test", card_info=card, gradcam_grid=grid)
    assert path == tmp_path / "report" / "report.md"
    text = path.read_text()
    top1 = summarise(result.identification["top1"])
    assert text.startswith("# cattle test")
    assert f"| Top-1 accuracy | {top1['mean']:.4f} ± {top1['std']:.4f} |" in text
    assert f"| ROC AUC | {result.verification['auc']:.4f} |" in text
    assert "TAR at FAR 0.001" in text and "## Open set" in text and "12 images of 3 strangers" in text
    assert "| model_version | cattle-0123456789ab |" in text and '"epochs": 3' in text
    for png in ("roc.png", "cmc.png", "similarity_histogram.png", "gradcam.png"):
        assert f"]({png})" in text
        with Image.open(tmp_path / "report" / png) as img:
            assert img.format == "PNG" and img.size == (grid.size if png == "gradcam.png" else (660, 480))
    assert json.loads((tmp_path / "report" / "metrics.json").read_text()) == result.to_dict()
    hardest = result.per_individual[0]
    assert hardest["top1"] < 1.0  # noise 0.5 leaves some queries wrong
    h = hardest
    row = f"| {h['individual']} | {h['queries']} | {h['top1']:.3f} | {h['confused_with']} ("
    assert row in text and "Individuals with the lowest top-1" in text


def test_report_without_gradcam_or_open_set(result, tmp_path):
    path = write_report(replace(result, open_set={}), tmp_path, title="t", card_info={})
    assert "## Open set" not in path.read_text() and "Grad-CAM" not in path.read_text()
    assert not (tmp_path / "gradcam.png").exists()


def test_importing_the_report_imports_no_matplotlib():
    code = "import sys, training.report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
