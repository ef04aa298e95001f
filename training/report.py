"""The evaluation report shipped with each model: ``report.md``, ``metrics.json`` and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.evaluate import EvaluationResult, summarise
from training.open_set import REPORTED_FLOOR

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

    from training.open_set import OpenSetCalibration

ROC_PNG = "roc.png"
CMC_PNG = "cmc.png"
HISTOGRAM_PNG = "similarity_histogram.png"
GRADCAM_PNG = "gradcam.png"
OPEN_SET_PNG = "open_set_fpir_fnir.png"
HARDEST_ROWS = 10  # individuals listed in the report's "lowest top-1" table

_LABELS = {
    "top1": "Top-1 accuracy",
    "top5": "Top-5 accuracy",
    "map": "mAP (image retrieval)",
    "auc": "ROC AUC",
    "eer": "Equal error rate",
    "auroc": "AUROC known vs unknown (top-1 similarity)",
    "precision": "Precision of match answers",
    "recall": "Recall over known queries",
    "f1": "F1",
    "unknown_accuracy": 'Unknown queries answered "unknown"',
}


def _label(name: str) -> str:
    if name.startswith("tar_at_far_"):
        return f"TAR at FAR {name.removeprefix('tar_at_far_')}"
    return _LABELS.get(name, name)


def _number(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.4f}"


def _mean_sd_table(metrics: dict[str, list[float]]) -> list[str]:
    lines = ["| metric | mean ± sd | per repeat |", "|---|---|---|"]
    for name, values in metrics.items():
        s = summarise(values)
        per_repeat = ", ".join(_number(v) for v in s["values"])
        lines.append(f"| {_label(name)} | {_number(s['mean'])} ± {_number(s['std'])} | {per_repeat} |")
    return lines


def _card_table(card_info: dict[str, Any]) -> list[str]:
    lines = ["| field | value |", "|---|---|"]
    for key, value in card_info.items():
        if not isinstance(value, dict | list):
            lines.append(f"| {key} | {value} |")
    lines += [
        "",
        "<details><summary>Full model card</summary>",
        "",
        "```json",
        json.dumps(card_info, indent=2, default=str),
        "```",
        "",
        "</details>",
    ]
    return lines


def _hardest_table(per_individual: list[dict[str, Any]], rows: int = HARDEST_ROWS) -> list[str]:
    """The individuals most often misidentified in the closed set, and whom they were taken for."""
    missed = [r for r in per_individual if r["top1"] < 1.0]
    if not missed:
        return []
    lines = [
        f"Individuals with the lowest top-1 over all repeats ({len(missed)} of {len(per_individual)} "
        "not always right; metrics.json lists every individual):",
        "",
        "| individual | queries | top-1 | most often taken for (queries) |",
        "|---|---|---|---|",
    ]
    for r in missed[:rows]:
        lines.append(
            f"| {r['individual']} | {r['queries']} | {r['top1']:.3f} "
            f"| {r['confused_with']} ({r['confused_count']}) |"
        )
    return [*lines, ""]


def _figure() -> Figure:
    """A figure drawn by the Agg canvas directly: no pyplot, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plot_roc(result: EvaluationResult, path: Path) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    floor = 1.0 / max(len(result.impostor), 1)  # the smallest non-zero FAR these pairs can show
    ax.plot(np.maximum(result.roc_far, floor), result.roc_tar, label=f"AUC {result.verification['auc']:.4f}")
    ax.plot(
        max(result.at_threshold["far"], floor),
        result.at_threshold["tar"],
        "o",
        label=f"threshold {result.threshold:.3f}",
    )
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate (impostor pairs)")
    ax.set_ylabel("true accept rate (genuine pairs)")
    ax.set_title("Verification ROC, test individuals")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=120)


def _plot_cmc(result: EvaluationResult, path: Path) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    ranks = np.arange(1, result.cmc.shape[1] + 1)
    mean = result.cmc_mean
    ax.plot(ranks, mean, marker="o", markersize=3, label="mean over repeats")
    if len(result.cmc) > 1:
        sd = result.cmc.std(axis=0, ddof=1)
        ax.fill_between(ranks, mean - sd, np.minimum(mean + sd, 1.0), alpha=0.25, label="± 1 sd")
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate")
    ax.set_xticks(ranks[::2] if len(ranks) > 10 else ranks)
    ax.set_ylim(min(0.0, float(np.nanmin(mean))) if mean.size else 0.0, 1.01)
    ax.set_title("CMC, closed-set identification")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=120)


def _plot_histogram(result: EvaluationResult, path: Path) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    both = np.concatenate([result.genuine, result.impostor])
    bins = np.linspace(float(both.min()), float(both.max()), 81).tolist()
    ax.hist(
        result.impostor, bins=bins, density=True, alpha=0.55, label=f"impostor pairs ({len(result.impostor)})"
    )
    ax.hist(
        result.genuine, bins=bins, density=True, alpha=0.55, label=f"genuine pairs ({len(result.genuine)})"
    )
    ax.axvline(result.threshold, color="black", linestyle="--", label=f"threshold {result.threshold:.3f}")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.set_title("Similarity of test pairs")
    ax.legend(loc="upper left")
    fig.savefig(path, dpi=120)


def _plot_open_set(table: OpenSetCalibration, path: Path) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    for size, (thresholds, fpir, fnir) in sorted(table.curves.items()):
        (line,) = ax.plot(thresholds, fpir, label=f"{size:,} images")
        ax.plot(thresholds, fnir, linestyle="--", color=line.get_color())
    ax.set_yscale("log")
    ax.set_ylim(1e-4, 1.0)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("threshold (cosine similarity of the best candidate)")
    ax.set_ylabel("FPIR (solid), FNIR (dashed)")
    ax.set_title("Open-set identification by gallery size, validation")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left", fontsize="x-small", ncols=2)
    fig.savefig(path, dpi=120)


def open_set_lines(table: OpenSetCalibration, out: Path) -> list[str]:
    """The report's section on the open-set table (and its plot when the curves are at hand)."""
    counts = table.counts
    lines = [
        "## Open-set calibration (1:N search)",
        "",
        f"Simulated galleries on validation individuals ({counts.get('individuals', 0)} individuals, "
        f"{counts.get('images', 0)} images, {counts.get('repeats', 0)} repeats; a quarter of the "
        "individuals never enrolled, half of each other individual's images enrolled; "
        f"{table.images_per_individual:.2f} enrolled images per individual). Threshold for each target "
        "FPIR (share of never-enrolled animals answered `match`) and the TPIR it leaves (enrolled "
        "animals answered `match` with the right individual):",
        "",
        "| gallery images | " + " | ".join(f"FPIR {f:g}" for f in table.target_fpirs) + " |",
        "|---|" + "---|" * len(table.target_fpirs),
    ]
    for size, thresholds, tpir in zip(table.gallery_sizes, table.thresholds, table.tpir, strict=True):
        cells = (f"{t:.3f} (TPIR {p:.3f})" for t, p in zip(thresholds, tpir, strict=True))
        lines.append(f"| {size:,} | " + " | ".join(cells) + " |")
    if table.simulated_up_to:
        beyond = (
            f"a tail fitted to the top {table.tail['start_share']:.2%} of the distractor scores "
            f"(`1 - similarity` to the power {table.tail['power']:.1f}), so they are only as good "
            "as that tail"
            if table.tail
            else "they can only use the highest scores seen, so their true FPIR is likely "
            "higher than the target"
        )
        lines += [
            "",
            f"The validation data hold distinct individuals for galleries up to about "
            f"{table.simulated_up_to:,} images; rows beyond are extrapolations: {beyond}.",
        ]
    if REPORTED_FLOOR in table.floor_thresholds:
        lines += [
            "",
            f"With a minimum match confidence of {REPORTED_FLOOR:g} (the service's default), which "
            "holds back some never-enrolled animals too, the same FPIRs are kept at these lower "
            "thresholds (the service lowers its threshold to them, never below its review threshold):",
            "",
            "| gallery images | " + " | ".join(f"FPIR {f:g}" for f in table.target_fpirs) + " |",
            "|---|" + "---|" * len(table.target_fpirs),
            *(
                f"| {size:,} | " + " | ".join(f"{t:.3f}" for t in row) + " |"
                for size, row in zip(table.gallery_sizes, table.floor_thresholds[REPORTED_FLOOR], strict=True)
            ),
        ]
    m, a = table.images_per_individual, table.image_exponent
    one, ten = (table.equivalent_size({n: 100}) / 100 for n in (1, 10))
    lines += [
        "",
        f"Image exponent {a:.2f}: a gallery is read as images of individuals with {m:.2f} photos "
        f"each, an individual of `n` photos counting as `(n / {m:.2f}) ** {a:.2f}` of them (1: photos "
        "of one animal are as unlike as photos of different animals; 0: they are copies). An animal "
        f"enrolled with one photo is read as {one:.2f} images, one with ten as {ten:.2f}.",
    ]
    sep = table.separation
    if sep:
        lines += [
            "",
            f"Telling enrolled (rightly ranked) from never-enrolled queries, AUROC: top-1 similarity "
            f"{sep.get('similarity_auroc', float('nan')):.4f}, rank-1 minus rank-2 margin "
            f"{sep.get('margin_auroc', float('nan')):.4f}. The decision uses the similarity.",
        ]
    if table.curves:
        _plot_open_set(table, out / OPEN_SET_PNG)
        lines += ["", f"![FPIR and FNIR by gallery size]({OPEN_SET_PNG})"]
    return [*lines, ""]


def write_report(
    result: EvaluationResult,
    out_dir: str | Path,
    *,
    title: str,
    card_info: dict[str, Any],
    gradcam_grid: Image.Image | None = None,
    open_set: OpenSetCalibration | None = None,
    warnings: Sequence[str] = (),
) -> Path:
    """Write ``report.md`` (tables, mean ± sd over repeats), ``metrics.json`` and the plots into
    ``out_dir``; returns the path of ``report.md``. ``warnings`` open the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _plot_roc(result, out / ROC_PNG)
    _plot_cmc(result, out / CMC_PNG)
    _plot_histogram(result, out / HISTOGRAM_PNG)
    (out / "metrics.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    counts = result.counts
    at = result.at_threshold

    lines = [f"# {title}", ""]
    lines += [line for warning in warnings for line in (f"> **Warning:** {warning}", "")]
    lines += [
        f"Test set: {counts['individuals']} individuals never seen in training, {counts['images']} images. "
        f"{counts['single_group_individuals']} individuals have a single group (clip), so their enrol and "
        f"query images may be near-duplicates. {counts['repeats']} seeded repeats; mean ± sample sd.",
        "",
        "## Closed-set identification",
        "",
        "Half of each individual's images enrolled (whole groups on one side), the rest queried; an "
        "individual's score is its best-matching enrolled image. "
        f"Queries per repeat: {', '.join(str(q) for q in counts['closed_set_queries'])}.",
        "",
        *_mean_sd_table(result.identification),
        "",
        *_hardest_table(result.per_individual),
        f"![CMC]({CMC_PNG})",
        "",
        "## Verification",
        "",
        f"All pairs of test images: {counts['genuine_pairs']} genuine, {counts['impostor_pairs']} impostor "
        f"({counts['same_group_pairs_left_out']} pairs inside one group left out).",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {_label(k)} | {_number(v)} |" for k, v in result.verification.items()),
        "",
        f"![ROC]({ROC_PNG})",
        "",
        "## Decision threshold",
        "",
        f"Threshold {result.threshold:.4f} (cosine similarity), calibrated on validation individuals. "
        "On the test pairs it gives:",
        "",
        "| FAR | TAR |",
        "|---|---|",
        f"| {_number(at['far'])} | {_number(at['tar'])} |",
        "",
        f"![similarity histogram]({HISTOGRAM_PNG})",
        "",
    ]
    if result.open_set:
        strangers = (
            f", plus {counts['strangers_images']} images of {counts['strangers_individuals']} strangers"
            if counts["strangers_images"]
            else ""
        )
        lines += [
            "## Open set",
            "",
            f"Per repeat, {counts['open_set_unknown_individuals']} test individuals are not enrolled and "
            f"all their images are queries{strangers}. A query is answered with its top-1 individual when "
            'the similarity reaches the threshold, else "unknown"; a match answer is right only for an '
            "enrolled individual and the right one. Unknown queries per repeat: "
            f"{', '.join(str(q) for q in counts['open_set_unknown_queries'])}; known queries: "
            f"{', '.join(str(q) for q in counts['open_set_known_queries'])}.",
            "",
            *_mean_sd_table(result.open_set),
            "",
        ]
    if open_set is not None:
        lines += open_set_lines(open_set, out)
    if gradcam_grid is not None:
        gradcam_grid.save(out / GRADCAM_PNG)
        lines += [
            "## Grad-CAM",
            "",
            "For a few test individuals, a query and an enrolled photo side by side, each with its "
            "LayerCAM heat map: what in that photo raises its cosine similarity to the other (red: most).",
            "",
            f"![Grad-CAM]({GRADCAM_PNG})",
            "",
        ]
    lines += ["## Model", "", *_card_table(card_info), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
