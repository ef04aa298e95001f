"""``animalid train | evaluate | export | calibrate | fuse | gradcam``: the training package's commands."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from training.artifact import ArtifactError
from training.config import DatasetConfig, add_config_arguments, config_from_args

log = logging.getLogger(__name__)

# A user's mistakes (a missing dataset, a bad option value, a broken YAML file or artifact) end a
# command with one line, not a traceback: the configuration and the data readers raise these.
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, ArtifactError, OSError, yaml.YAMLError)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train a model (one species, or several jointly) and export its artifacts",
        description="Train an embedding network (--backbone) with a margin head. Every option can also be "
        "set in the YAML file given with --config; command-line options override it. The run writes "
        "OUT_DIR/NAME/{config.yaml,log.jsonl,checkpoint.pt} and, unless --no-export, one evaluated artifact "
        "per species in OUT_DIR/NAME/artifacts/.",
    )
    add_config_arguments(train)
    train.add_argument("--resume", action="store_true", help="continue from OUT_DIR/NAME/checkpoint.pt")
    train.add_argument(
        "--no-export", action="store_true", help="skip exporting and evaluating after training"
    )
    train.set_defaults(func=_train, user_errors=USER_ERRORS)

    export = subparsers.add_parser(
        "export",
        help="export a run's checkpoint as per-species artifacts (calibrated, evaluated, with report)",
    )
    export.add_argument("run_dir", type=Path, help="run folder holding checkpoint.pt")
    export.add_argument(
        "--out", type=Path, help="output folder (default RUN_DIR/artifacts); one sub-folder per species"
    )
    export.add_argument("--species", action="append", help="export only this species (repeatable)")
    export.add_argument("--fp16", action="store_true", default=None, help="store weights in float16")
    export.set_defaults(func=_export, user_errors=USER_ERRORS)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="evaluate an artifact on individuals never seen in training and write a report",
        description="By default the test individuals of the split the model was trained with are used "
        "(the split is recomputed from the model card's training configuration).",
    )
    evaluate.add_argument("artifact", type=Path, help="artifact folder (model.safetensors + model_card.json)")
    evaluate.add_argument("--out", type=Path, required=True, help="report folder")
    evaluate.add_argument(
        "--dataset", action="append", metavar="SOURCE[:SPECIES]", help="evaluate on this data instead"
    )
    evaluate.add_argument(
        "--strangers", metavar="SOURCE[:SPECIES]", help="never-seen animals as open-set queries"
    )
    evaluate.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="inference device"
    )
    evaluate.add_argument(
        "--all-individuals",
        action="store_true",
        help="use every individual of the --dataset as a test individual, decided with the model card's "
        "own calibration (no split, no recalibration on that data)",
    )
    evaluate.add_argument(
        "--as-species",
        metavar="SPECIES",
        help="evaluate the model as a model for SPECIES (data labelled with another species than the card's)",
    )
    grouping = evaluate.add_mutually_exclusive_group()
    grouping.add_argument(
        "--ignore-groups",
        action="store_true",
        help="enrol and query images at random within each individual, ignoring the group key: "
        "near-duplicate frames leak across, so figures are optimistic (only to compare with studies "
        "that split that way)",
    )
    grouping.add_argument(
        "--group-pattern",
        metavar="REGEX",
        help="group key to use instead of the one the model was trained with (regex over file names)",
    )
    evaluate.set_defaults(func=_evaluate, user_errors=USER_ERRORS)

    calibrate = subparsers.add_parser(
        "calibrate",
        help="write a copy of an artifact whose card holds the open-set table (thresholds per gallery size)",
        description="Simulates galleries of several sizes on validation individuals (by default the "
        "artifact's own, its split recomputed from the card) and stores, per gallery size, the threshold "
        "for each target FPIR and the confidence curve. With --dataset every individual of that data is "
        "used instead and the pair threshold is recalibrated on it; with --as-species the card is "
        "relabelled for that species (and records the species it was trained for), so the service serves "
        "it from that species' folder.",
    )
    calibrate.add_argument(
        "artifact", type=Path, help="artifact folder (model.safetensors + model_card.json)"
    )
    calibrate.add_argument(
        "--out", type=Path, required=True, help="artifact folder to write (may be ARTIFACT: card replaced)"
    )
    calibrate.add_argument(
        "--dataset", action="append", metavar="SOURCE[:SPECIES]", help="calibrate on this data"
    )
    calibrate.add_argument(
        "--source", metavar="PATH", help="where the card's own training data lives now (manifest or folder)"
    )
    calibrate.add_argument("--as-species", metavar="SPECIES", help="relabel the card for SPECIES")
    calibrate.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="inference device"
    )
    calibrate.set_defaults(func=_calibrate)

    fuse = subparsers.add_parser(
        "fuse",
        help="fuse models of one species trained on different data into one artifact (calibrated, evaluated)",
        description="Each network sees the photo at its own input size and normalisation; their normalised "
        "embeddings are concatenated, each scaled by the square root of its weight, so a similarity is the "
        "weighted mean of the networks' similarities. The models must share their split (the same test "
        "animals); the fused model is evaluated on it and its report written to OUT/report.",
    )
    fuse.add_argument("artifacts", type=Path, nargs="+", help="artifact folders (two or more)")
    fuse.add_argument("--out", type=Path, required=True, help="artifact folder to write")
    fuse.add_argument(
        "--weights", type=float, nargs="+", metavar="W", help="one weight per artifact (default: equal)"
    )
    fuse.add_argument("--fp16", action="store_true", help="store weights in float16")
    fuse.add_argument(
        "--study-figures",
        type=Path,
        metavar="ARTIFACT",
        help="for a release model (a network trained on its test individuals too): record the test figures "
        "of ARTIFACT, the same recipe trained without them, in the card as metrics.study_split",
    )
    fuse.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="inference device")
    fuse.set_defaults(func=_fuse, user_errors=USER_ERRORS)

    gradcam = subparsers.add_parser(
        "gradcam", help="Heat maps of an image's and a reference image's similarity, side by side, as PNG"
    )
    gradcam.add_argument("artifact", type=Path, help="artifact folder")
    gradcam.add_argument("image", type=Path, help="image to explain")
    gradcam.add_argument("reference", type=Path, help="reference image (e.g. the enrolled photo)")
    gradcam.add_argument("--out", type=Path, required=True, help="PNG to write")
    gradcam.set_defaults(func=_gradcam, user_errors=USER_ERRORS)


def _train(args: argparse.Namespace) -> int:
    from training.pipeline import export_run
    from training.train import fit

    config = config_from_args(args)
    run_dir = fit(config, resume=args.resume)
    # Under torchrun every process returns from fit(); one of them exports.
    if not args.no_export and int(os.environ.get("RANK", "0")) == 0:
        for path in export_run(run_dir):
            print(json.dumps({"artifact": str(path)}))
    return 0


def _export(args: argparse.Namespace) -> int:
    from training.pipeline import export_run

    for path in export_run(args.run_dir, args.out, args.species, args.fp16):
        print(json.dumps({"artifact": str(path)}))
    return 0


def _fuse(args: argparse.Namespace) -> int:
    from training.artifact import read_card, write_card
    from training.pipeline import fuse_artifacts, with_study_figures

    study = read_card(args.study_figures) if args.study_figures is not None else None
    out = fuse_artifacts(args.artifacts, args.out, args.weights, args.fp16, args.device)
    card = read_card(out)
    if study is not None:
        card = with_study_figures(card, study)
        write_card(card, out)
    print(json.dumps({"artifact": str(out), "threshold": card.threshold, **card.metrics}))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from training.calibration import evaluate_all_individuals
    from training.pipeline import evaluate_artifact

    datasets = [DatasetConfig.parse(d) for d in args.dataset] if args.dataset else None
    strangers = DatasetConfig.parse(args.strangers) if args.strangers else None
    if args.all_individuals:
        if not datasets:
            raise SystemExit("--all-individuals needs --dataset (the data to test on)")
        if args.ignore_groups or args.group_pattern:
            raise SystemExit("--all-individuals takes the group key from --dataset's data as read")
        result = evaluate_all_individuals(
            args.artifact, args.out, datasets, strangers, args.as_species, args.device
        )
    else:
        result = evaluate_artifact(
            args.artifact,
            args.out,
            datasets,
            strangers,
            args.device,
            ignore_groups=args.ignore_groups,
            group_pattern=args.group_pattern,
            as_species=args.as_species,
        )
    print(json.dumps({"report": str(result.report), "threshold": result.threshold, **result.metrics()}))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from training.calibration import calibrate_artifact
    from training.open_set import REPORTED_FLOOR

    datasets = [DatasetConfig.parse(d) for d in args.dataset] if args.dataset else None
    out, table = calibrate_artifact(
        args.artifact, args.out, datasets, args.source, args.as_species, args.device
    )
    summary = {
        f"threshold_fpir_{f:g}_at_{n}{suffix}": round(table.threshold(n, f, floor), 4)
        for floor, suffix in ((None, ""), (REPORTED_FLOOR, f"_min_confidence_{REPORTED_FLOOR:g}"))
        for n in (100, 1000)
        for f in (0.01, 0.05)
    }
    print(json.dumps({"artifact": str(out), **summary, **table.separation}))
    return 0


def _gradcam(args: argparse.Namespace) -> int:
    import torch

    from training.artifact import load_artifact
    from training.gradcam import explanation_panel, input_attribution_map
    from training.preprocess import open_image, preprocess

    loaded = load_artifact(args.artifact)
    spec = loaded.card.preprocess
    image, reference = open_image(args.image), open_image(args.reference)
    batch = torch.stack([preprocess(image, spec), preprocess(reference, spec)])
    emb = loaded.model.embed(batch)
    cams = [
        input_attribution_map(loaded.model, batch[0], emb[1]),
        input_attribution_map(loaded.model, batch[1], emb[0]),
    ]
    similarity = float(emb[0] @ emb[1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    panel = explanation_panel((image, cams[0]), (reference, cams[1]), similarity, args.reference.name)
    panel.save(args.out)
    print(json.dumps({"png": str(args.out), "similarity": round(similarity, 4)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m training.cli``); the console script is ``animalid``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="animalid-train")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except USER_ERRORS as exc:
        log.debug("%s failed", args.command, exc_info=True)
        print(f"animalid-train {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
