"""Open-set identification through a running server: measured FPIR, right matches, wrong matches,
and the calibration of the confidence, at gallery sizes of about 100 and 1,000 images.

The server is `animalid serve` in a subprocess on a free loopback port (SQLite, no GPU), serving the
given artifact (default: the shipped dog model, whose card must hold the open-set table: see
`animalid calibrate`). The data are the artifact's *test* individuals, by the split recomputed from
its card (never seen in training, nor in calibration):

* a quarter of them (seeded) are strangers: never enrolled, every photo a query (all of them at
  each gallery size); with ``--card-strangers``, the animals the card's training configuration kept
  aside as strangers instead (cattle: the 10 openset-* cows);
* the others have about half their photos enrolled (`enrol_query_split`), the rest are queries;
* the ~100-image gallery enrols a seeded subset of those dogs; the ~1,000-image gallery all of them
  plus, as further distractors, every photo of the artifact's validation individuals (not seen in
  training; only enrolled, never queried), whole dogs at a time until the size is reached.

The server runs with target FPIR 1% and review FPIR 5%: `match` answers are the decisions at 1%,
`match` or `uncertain` those at 5% (with ``--min-match-confidence``, a best candidate past the 1%
threshold whose confidence is below it is `uncertain` too). Its confidence is computed for a share
of stranger queries (``--stranger-share``, default the card's calibration mix;
`ANIMALID_STRANGER_SHARE`), and in its calibration error the stranger queries weigh that share of
all queries, whatever their number here. Also shown: the calibration error of enrolled dogs' queries
alone with the confidence for a share of 0 (computed from the same answers with the card's table,
the service's own function), and the error a perfectly calibrated confidence would show on as many
queries (labels drawn from the confidence). From the same answers too: each of
``--confidence-floors`` as the minimum match confidence (the server's rule applied to the confidence
each answer returned), with the threshold the server uses with that floor (lowered toward the card's
thresholds for it, never below the review edge) and with the 1% threshold alone's, the card's pair
threshold (the decision before open-set calibration) and,
with ``--compare-card``, what another card's open-set table (say the card before a recalibration)
would have decided and how calibrated its confidence would have been.

With ``--herd-check``, each gallery size is asked twice: with the card's table, then again once
`animalid gallery check --apply` has kept a herd check in the served card (a copy of the artifact),
which raises the threshold where the enrolled animals, each left out in turn, pass it more often
than the target; the second round's figures are under "<size> herd-checked", with the check's own.
The artifact's card is then served again, so each size's first round is the table's alone. Galleries
of fewer than ``--herd-min-individuals`` animals are not checked, as the worker would not check them.

With several ``--seeds``, each seed draws its strangers and enrolment anew on a fresh server, and the
figures of all their answers together follow (``pooled``): a single seed's ~100 queries leave an
ECE of about 0.04 to sampling alone, against a 0.05 target.

Each measured FPIR comes with a 95% interval over the stranger *individuals* drawn again with
replacement (an animal's photos pass or fail together, so a look-alike of an enrolled animal moves
the FPIR by its photos' share at once), and the strangers answered `match` at least once, with how
many of their answers were.

    python bench/open_set_identify.py --data ../shared/data/dogfacenet/manifest.csv
    python bench/open_set_identify.py --data ../shared/data/dogfacenet/manifest.csv --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

from service.services.identification import lowered_for_floor
from training.artifact import ModelCard, read_card
from training.data import Sample, enrol_query_split, load_dataset
from training.open_set import INTERVAL_DRAWS, OpenSetCalibration, bootstrap_weights, resampled_interval
from training.pipeline import card_config, held_out, split_part

REPO = Path(__file__).resolve().parents[1]
SPECIES_KEY = "bench-admin-key"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--artifact", type=Path, default=REPO / "service" / "demo" / "models" / "dog")
    parser.add_argument(
        "--data", type=Path, required=True, help="where the card's training data lives (manifest or folder)"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000], help="gallery sizes (images)")
    parser.add_argument("--target-fpir", type=float, default=0.01)
    parser.add_argument("--review-fpir", type=float, default=0.05)
    parser.add_argument(
        "--stranger-fraction", type=float, default=0.25, help="share of test dogs never enrolled"
    )
    parser.add_argument(
        "--stranger-share",
        type=float,
        help="the share of queries of animals not enrolled that the server's confidence is computed for and "
        "the calibration error weighs strangers at (default: the card's calibration mix)",
    )
    parser.add_argument(
        "--min-match-confidence",
        type=float,
        default=0.0,
        help="the confidence the server requires of a match (ANIMALID_MIN_MATCH_CONFIDENCE; the service's "
        "default is 0.5, this benchmark's 0: the threshold alone, with --confidence-floors read beside it)",
    )
    parser.add_argument(
        "--confidence-floors",
        type=float,
        nargs="*",
        default=[0.5, 0.7, 0.8, 0.9],
        help="also computed from the same answers: each of these minimum match confidences with the "
        "threshold the server would use with it (lowered toward the card's thresholds for that floor) and "
        "with the threshold alone's (the server's rule, from the confidence each answer returned; "
        "meaningful when the server ran without a floor)",
    )
    parser.add_argument(
        "--card-strangers",
        action="store_true",
        help="the strangers are the animals the card's training configuration keeps aside as such (cattle: "
        "the openset-* cows), every photo a query; every test individual is then enrolled",
    )
    parser.add_argument(
        "--seeds",
        "--seed",
        dest="seeds",
        type=int,
        nargs="+",
        default=[0],
        help="one run per seed (strangers and enrolment drawn anew, a fresh server); with several, also the "
        "figures of all their answers pooled",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=120.0,
        help="seconds a request may take (a busy machine: more)",
    )
    parser.add_argument(
        "--out", type=Path, help="also write the figures as JSON here, with every answer in brief"
    )
    parser.add_argument(
        "--herd-check",
        action="store_true",
        help="at each gallery size, after the queries, keep a herd check in the served card (`animalid "
        "gallery check --apply`: the enrolled animals, each left out in turn, as strangers) and ask every "
        "query again: figures under '<size> herd-checked' (the server's own decisions; the confidence "
        "floors are not recomputed there)",
    )
    parser.add_argument(
        "--herd-min-individuals",
        type=int,
        default=10,
        help="--herd-check only for galleries of at least this many animals (the worker's default, "
        "ANIMALID_HERD_CHECK_MIN_INDIVIDUALS)",
    )
    parser.add_argument(
        "--compare-card",
        type=Path,
        help="a model_card.json whose open-set table's decisions and confidence are also computed from the "
        "same answers (same embeddings: a card of the same weights)",
    )
    return parser.parse_args()


@dataclass
class Plan:
    """Who is enrolled with which photos, and which photos are asked about."""

    enrol: dict[str, list[Path]]  # individual -> photos, in enrolment order (test dogs first)
    genuine: dict[str, list[Path]]  # enrolled test individual -> query photos
    strangers: list[tuple[str, Path]]


def plan(
    test: list[Sample],
    padding: list[Sample],
    stranger_fraction: float,
    seed: int,
    outside_strangers: list[Sample] | None = None,
) -> Plan:
    """With ``outside_strangers``, those are the strangers and every test individual is enrolled."""
    rng = random.Random(seed)
    names = sorted({s.individual for s in test})
    rng.shuffle(names)
    n_strangers = 0 if outside_strangers is not None else round(len(names) * stranger_fraction)
    strangers = set(names[:n_strangers]) | {s.individual for s in outside_strangers or []}
    known = [s for s in test if s.individual not in strangers]
    enrol_idx, query_idx = enrol_query_split([s.individual for s in known], [s.group for s in known], rng)
    enrol: dict[str, list[Path]] = defaultdict(list)
    genuine: dict[str, list[Path]] = defaultdict(list)
    order = {name: i for i, name in enumerate(names)}
    for i in sorted(enrol_idx, key=lambda i: order[known[i].individual]):
        enrol[known[i].individual].append(known[i].path)
    for i in query_idx:
        genuine[known[i].individual].append(known[i].path)
    pad: dict[str, list[Path]] = defaultdict(list)
    for s in padding:
        pad[f"pad-{s.individual}"].append(s.path)
    pad_names = sorted(pad)
    rng.shuffle(pad_names)
    for name in pad_names:
        enrol[name] = pad[name]
    asked = outside_strangers if outside_strangers is not None else test
    return Plan(
        dict(enrol), dict(genuine), [(s.individual, s.path) for s in asked if s.individual in strangers]
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(root: Path, args: argparse.Namespace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANIMALID_")}
    env.update(
        ANIMALID_DATABASE_URL=f"sqlite:///{root / 'animalid.db'}", ANIMALID_MODELS_DIR=str(root / "models"),
        ANIMALID_IMAGE_STORE_DIR=str(root / "images"), ANIMALID_API_KEYS=f"{SPECIES_KEY}:admin",
        ANIMALID_CPU_THREADS=str(args.threads), ANIMALID_TARGET_FPIR=str(args.target_fpir),
        ANIMALID_REVIEW_FPIR=str(args.review_fpir), ANIMALID_MAX_TOP_K="5", PYTHONPATH=str(REPO),
        ANIMALID_STRANGER_SHARE=str(args.stranger_share),
        ANIMALID_MIN_MATCH_CONFIDENCE=str(args.min_match_confidence),
    )  # fmt: skip
    return env


def start_server(root: Path, artifact: Path, args: argparse.Namespace, port: int) -> subprocess.Popen[bytes]:
    (root / "models").mkdir()
    served = root / "models" / read_card(artifact).species
    if args.herd_check:  # the check is written into the served card: never into the artifact itself
        shutil.copytree(artifact, served)
    else:
        served.symlink_to(artifact.resolve(), target_is_directory=True)
    env = server_env(root, args)
    subprocess.run([sys.executable, "-m", "service.cli", "migrate"], cwd=root, env=env, check=True)
    log = (root / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "--log-level", "WARNING", "serve", "--host", "127.0.0.1",
         "--port", str(port)],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit((root / "server.log").read_text()[-3000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.terminate()
    raise SystemExit("the server did not become ready in 300 s")


def enroll(client: httpx.Client, species: str, individual: str, photos: list[Path]) -> int:
    for start in range(0, len(photos), 32):
        files = [
            ("images", (p.name, p.read_bytes(), "application/octet-stream"))
            for p in photos[start : start + 32]
        ]
        response = client.post("/enroll", data={"species": species, "external_id": individual}, files=files)
        response.raise_for_status()
    return len(photos)


def keep_herd_check(client: httpx.Client, root: Path, args: argparse.Namespace, species: str) -> dict:
    """`animalid gallery check --apply` on the server's database and models folder, then a reload so
    that the server answers with it at once; the check's figures."""
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "gallery", "check", "--species", species, "--apply"],
        cwd=root, env=server_env(root, args), check=True, capture_output=True, text=True,
    )  # fmt: skip
    client.post(f"/species/{species}/reload").raise_for_status()
    check = json.loads(done.stdout)
    served = client.get(f"/species/{species}").json()["herd_check"]
    if served is None or served["checked_at"] != check["checked_at"]:
        raise SystemExit(f"the server does not serve the herd check just kept: {served}")
    return check


def drop_herd_check(client: httpx.Client, root: Path, artifact: Path, species: str) -> None:
    """The artifact's own card served again (no herd check)."""
    shutil.copyfile(artifact / "model_card.json", root / "models" / species / "model_card.json")
    client.post(f"/species/{species}/reload").raise_for_status()
    if client.get(f"/species/{species}").json()["herd_check"] is not None:
        raise SystemExit("the server still serves a herd check after the card was restored")


def identify(client: httpx.Client, species: str, photo: Path) -> dict:
    response = client.post(
        "/identify", data={"species": species, "top_k": "2"}, files={"image": photo.read_bytes()}
    )
    response.raise_for_status()
    return response.json()


def ask_all(
    client: httpx.Client,
    species: str,
    queries: Sequence[tuple[str | None, str | None, Path]],
    gallery_shape: list[tuple[int, int]],
) -> list[dict]:
    """Every query's answer, with its truth (None: a stranger), its stranger's name and the gallery."""
    return [
        identify(client, species, photo)
        | {"truth": truth, "stranger": stranger, "gallery_shape": gallery_shape}
        for truth, stranger, photo in queries
    ]


def ece(confidence: np.ndarray, correct: np.ndarray, weight: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: the weighted mean over equal-width confidence bins of
    |mean confidence - accuracy|, each bin weighing its share of the (weighted) queries."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            w = weight[mask]
            gap = abs(np.average(confidence[mask], weights=w) - np.average(correct[mask], weights=w))
            total += w.sum() / weight.sum() * gap
    return float(total)


def compared_rules(
    table: OpenSetCalibration, sim: np.ndarray, sizes: np.ndarray, args: argparse.Namespace
) -> dict[str, np.ndarray]:
    """What another card's open-set table would have answered ``match`` (and, at the review FPIR,
    ``match`` or ``uncertain``), from the best similarities and gallery sizes of the answers."""
    return {
        f"compared card, target FPIR {fpir:g}": sim
        >= np.array([table.threshold(int(n), fpir) for n in sizes])
        for fpir in (args.target_fpir, args.review_fpir)
    }


def read_sizes(table: OpenSetCalibration, answers: list[dict]) -> np.ndarray:
    """Each answer's gallery as ``table`` reads it, from the gallery's shape when the answer has it
    (pairs of images per individual and individuals with that many), else its images."""
    return np.array(
        [
            table.equivalent_size(dict(a["gallery_shape"])) if "gallery_shape" in a else a["gallery_size"]
            for a in answers
        ]
    )


def ece_if_calibrated(confidence: np.ndarray, weight: np.ndarray, draws: int = 200) -> float:
    """The mean ECE of a perfectly calibrated confidence on these queries: each one right with the
    probability its confidence says (what sampling alone adds to a measured ECE)."""
    rng = np.random.default_rng(0)
    return float(
        np.mean(
            [
                ece(confidence, (rng.random(len(confidence)) < confidence).astype(np.float64), weight)
                for _ in range(draws)
            ]
        )
    )


def calibration_figures(
    confidence: np.ndarray, right: np.ndarray, stranger: np.ndarray, weight: np.ndarray
) -> dict[str, float]:
    """ECE (strangers weighted, enrolled only, every query alike), mean confidence, share right."""
    return {
        "ece": ece(confidence, right.astype(np.float64), weight),
        "ece_if_calibrated": ece_if_calibrated(confidence, weight),
        "ece_enrolled_only": ece(
            confidence[~stranger], right[~stranger].astype(np.float64), weight[~stranger]
        ),
        "ece_unweighted": ece(confidence, right.astype(np.float64), np.ones(len(confidence))),
        "mean_confidence": float(confidence.mean()),
        "top1_right": float(right.mean()),
    }


def figures(
    answers: list[dict],
    pair_threshold: float,
    weight: np.ndarray,
    args: argparse.Namespace,
    table: OpenSetCalibration,
    compare: OpenSetCalibration | None = None,
) -> dict[str, dict[str, float]]:
    """Per decision rule: FPIR, right matches of enrolled dogs, wrong matches among match answers."""
    stranger = np.array([a["truth"] is None for a in answers])
    top = np.array(
        [a["candidates"][0]["external_id"] if a["candidates"] else None for a in answers], dtype=object
    )
    sim = np.array([a["candidates"][0]["similarity"] if a["candidates"] else -1.0 for a in answers])
    second = [a["candidates"][1]["similarity"] if len(a["candidates"]) > 1 else None for a in answers]
    right = np.array([a["truth"] is not None and t == a["truth"] for a, t in zip(answers, top, strict=True)])
    decisions = np.array([a["decision"] for a in answers])
    confidence = np.array([a["confidence"] for a in answers], dtype=np.float64)
    threshold = np.array([a["threshold"] for a in answers])
    sizes = read_sizes(table, answers)
    share = args.stranger_share

    def served_with(floor: float) -> np.ndarray:
        """The service's threshold for a minimum match confidence (lowered toward the card's
        thresholds for that floor, down to the review edge), from the threshold alone it served."""
        return np.array(
            [
                lowered_for_floor(table, int(n), args.target_fpir, t, a["review_threshold"], floor, share)[0]
                for n, t, a in zip(sizes, threshold, answers, strict=True)
            ]
        )

    rules = (
        {
            f"target FPIR {args.target_fpir:.0%} (match)": decisions == "match",
            f"target FPIR {args.review_fpir:.0%} (match or uncertain)": np.isin(
                decisions, ["match", "uncertain"]
            ),
            f"pair threshold {pair_threshold:.3f} (before)": sim >= pair_threshold,
        }
        | {
            f"target FPIR {args.target_fpir:.0%}, confidence >= {floor:g}": (sim >= served_with(floor))
            & (confidence >= floor)
            for floor in args.confidence_floors
        }
        | {
            f"target FPIR {args.target_fpir:.0%}, confidence >= {floor:g}, threshold alone's": (
                sim >= threshold
            )
            & (confidence >= floor)
            for floor in args.confidence_floors
        }
    )
    if compare is not None:
        rules |= compared_rules(compare, sim, read_sizes(compare, answers), args)
    who = np.array([a["stranger"] for a in answers], dtype=object)[stranger]
    draws = bootstrap_weights(who, INTERVAL_DRAWS, np.random.default_rng(0))
    out = {}
    for name, matched in rules.items():
        out[name] = {
            "fpir": float(matched[stranger].mean()),
            "fpir_interval_95": list(resampled_interval(matched[stranger], draws)),
            "strangers_matched": matched_by_individual(matched[stranger], who),
            "enrolled_match_right": float((matched & right)[~stranger].mean()),
            "wrong_among_matches": float((matched & ~right).sum() / max(matched.sum(), 1)),
            "wrong_among_enrolled_matches": float(
                (matched & ~right)[~stranger].sum() / max(matched[~stranger].sum(), 1)
            ),
            "matches": int(matched.sum()),
        }
    out["confidence"] = calibration_figures(confidence, right, stranger, weight)
    enrolled = ~stranger
    no_strangers = np.array(
        [table.probability(float(x), int(n), y, 0.0) for x, n, y in zip(sim, sizes, second, strict=True)]
    )
    out["confidence for no strangers, enrolled queries"] = calibration_figures(
        no_strangers[enrolled], right[enrolled], stranger[enrolled], weight[enrolled]
    )
    if compare is not None:
        compared = np.array(
            [
                compare.probability(float(x), int(n), y, args.stranger_share)
                for x, n, y in zip(sim, read_sizes(compare, answers), second, strict=True)
            ]
        )
        out["compared card confidence"] = calibration_figures(compared, right, stranger, weight)
    out["threshold"] = {
        "match": float(answers[-1]["threshold"]),
        "review": float(answers[-1]["review_threshold"]),
    }
    return out


def matched_by_individual(matched: np.ndarray, who: np.ndarray) -> dict[str, list[int]]:
    """Stranger individual -> [answers `match`, answers]: only those answered `match` at least once."""
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, hit in zip(who, matched, strict=True):
        tally[name][0] += int(hit)
        tally[name][1] += 1
    return {name: counts for name, counts in sorted(tally.items()) if counts[0]}


def card_strangers(card: ModelCard, data: Path) -> list[Sample]:
    """Every photo of the animals the card's training configuration keeps aside as strangers (read
    from ``data``, where the card's training data lives now)."""
    spec = card_config(card).strangers
    if spec is None:
        raise SystemExit("--card-strangers: the card's training configuration names no strangers")
    found = load_dataset(
        data,
        species=spec.species,
        group_pattern=spec.group_pattern,
        exclude_individuals=spec.exclude_individuals,
    )
    return list(found.samples)


def compared_table(path: Path | None) -> OpenSetCalibration | None:
    if path is None:
        return None
    table = json.loads(path.read_text()).get("open_set")
    if table is None:
        raise SystemExit(f"{path}: no open-set table to compare with")
    return OpenSetCalibration.from_dict(table)


@dataclass
class SizeRun:
    """One gallery size of one seed: the answers, each one's weight in the calibration error, the
    counts, and the figures printed for them (counts included)."""

    answers: list[dict]
    weight: np.ndarray
    counts: dict[str, int]
    figures: dict[str, object]


def brief(answer: dict) -> dict[str, object]:
    """What the JSON keeps of one answer: enough to recompute decisions and confidences offline."""
    candidates = answer["candidates"]
    return {
        "truth": answer["truth"],
        "stranger": answer["stranger"],
        "top": candidates[0]["external_id"] if candidates else None,
        "similarity": candidates[0]["similarity"] if candidates else None,
        "second": candidates[1]["similarity"] if len(candidates) > 1 else None,
        "gallery_size": answer["gallery_size"],
        "gallery_shape": answer["gallery_shape"],
        "decision": answer["decision"],
        "confidence": answer["confidence"],
    }


def run_seed(
    args: argparse.Namespace,
    card: ModelCard,
    test: list[Sample],
    padding: list[Sample],
    outside: list[Sample] | None,
    seed: int,
    compare: OpenSetCalibration | None,
) -> dict[str, SizeRun]:
    """One server, enrolled up to each gallery size in turn: per size, its answers and figures (and,
    with ``--herd-check``, those asked again once a herd check is kept: :func:`herd_key`)."""
    assert card.open_set is not None
    chosen = plan(test, padding, args.stranger_fraction, seed, outside)
    species = card.species
    runs: dict[str, SizeRun] = {}
    with tempfile.TemporaryDirectory(prefix="animalid-open-set-") as tmp:
        port = free_port()
        root = Path(tmp)
        server = start_server(root, args.artifact, args, port)
        try:
            client = httpx.Client(
                base_url=f"http://127.0.0.1:{port}",
                headers={"x-api-key": SPECIES_KEY},
                timeout=args.request_timeout,
            )
            enrolled: list[str] = []
            size = 0
            shape: Counter[int] = Counter()  # images per individual -> individuals
            for target in sorted(args.sizes):
                for name, photos in chosen.enrol.items():
                    if size >= target:
                        break
                    if name in enrolled:
                        continue
                    added = enroll(client, species, name, photos)
                    size += added
                    shape[added] += 1
                    enrolled.append(name)
                asked = [
                    (name, p) for name in enrolled if name in chosen.genuine for p in chosen.genuine[name]
                ]
                strangers = chosen.strangers
                gallery_shape = sorted(shape.items())
                queries = [(name, None, p) for name, p in asked] + [(None, name, p) for name, p in strangers]
                rounds: list[tuple[str, dict, list[dict]]] = [
                    (str(target), {}, ask_all(client, species, queries, gallery_shape))
                ]
                if args.herd_check and len(enrolled) >= args.herd_min_individuals:
                    check = keep_herd_check(client, root, args, species)
                    rounds.append(
                        (
                            herd_key(target),
                            {"herd_check": check},
                            ask_all(client, species, queries, gallery_shape),
                        )
                    )
                    # The next size's first round is the table's alone again.
                    drop_herd_check(client, root, args.artifact, species)
                for key, extra, answers in rounds:
                    runs[key] = size_run(
                        answers, args_for(args, key), card, enrolled, asked, strangers, compare
                    )
                    runs[key].figures.update(extra)
                    print(json.dumps({"seed": seed, "gallery": key, **runs[key].figures}), flush=True)
        finally:
            server.terminate()
            server.wait(30)
    return runs


def herd_key(target: int) -> str:
    return f"{target} herd-checked"


def args_for(args: argparse.Namespace, key: str) -> argparse.Namespace:
    """The options a round's figures are read with: once a herd check raised the threshold, the
    confidence floors' thresholds, lowered from the table's, are not the server's."""
    return (
        argparse.Namespace(**vars(args) | {"confidence_floors": []}) if key.endswith("herd-checked") else args
    )


def size_run(
    answers: list[dict],
    args: argparse.Namespace,
    card: ModelCard,
    enrolled: list[str],
    asked: list[tuple[str, Path]],
    strangers: list[tuple[str, Path]],
    compare: OpenSetCalibration | None,
) -> SizeRun:
    """A round's answers with their weights, counts and figures."""
    assert card.open_set is not None
    # In the confidence's calibration error, stranger queries weigh the share of all queries the
    # confidence was computed for, whatever their number here.
    stranger_weight = args.stranger_share / (1 - args.stranger_share) * len(asked) / len(strangers)
    weight = np.array([stranger_weight if a["truth"] is None else 1.0 for a in answers])
    counts = {
        "gallery_images": answers[-1]["gallery_size"],
        "enrolled_individuals": len(enrolled),
        "enrolled_test_individuals": sum(1 for n in enrolled if not n.startswith("pad-")),
        "enrolled_queries": len(asked),
        "stranger_queries": len(strangers),
        "stranger_individuals": len({n for n, _ in strangers}),
    }
    figs = figures(answers, card.threshold or 0.0, weight, args, card.open_set, compare)
    return SizeRun(answers, weight, counts, {**figs, "counts": counts})


def pooled(
    runs: list[dict[str, SizeRun]],
    card: ModelCard,
    args: argparse.Namespace,
    compare: OpenSetCalibration | None,
) -> dict[str, object]:
    """Per gallery size, the figures of every seed's answers together (each seed's weights kept),
    and the counts summed: a smaller sampling floor under the calibration error."""
    assert card.open_set is not None
    out: dict[str, object] = {}
    for key in [key for key in runs[0] if all(key in run for run in runs)]:
        answers = [a for run in runs for a in run[key].answers]
        weight = np.concatenate([run[key].weight for run in runs])
        figs: dict[str, object] = dict(
            figures(answers, card.threshold or 0.0, weight, args_for(args, key), card.open_set, compare)
        )
        del figs["threshold"]  # one per seed's gallery
        counts = [run[key].counts for run in runs]
        figs["counts"] = {name: sum(c[name] for c in counts) for name in counts[0]} | {"seeds": len(runs)}
        out[key] = figs
        print(json.dumps({"seeds": args.seeds, "gallery": key, **figs}), flush=True)
    return out


def main() -> int:
    args = parse_args()
    card = read_card(args.artifact)
    if card.open_set is None:
        raise SystemExit(f"{args.artifact}: the model card has no open-set table (run `animalid calibrate`)")
    try:
        test = list(held_out(card, args.data).samples)
    except ValueError as error:
        raise SystemExit(f"{args.artifact}: {error} (--artifact)") from None
    padding = list(split_part(card, "val", args.data).samples)
    compare = compared_table(args.compare_card)
    outside = card_strangers(card, args.data) if args.card_strangers else None
    if args.stranger_share is None:
        args.stranger_share = card.open_set.stranger_share
    started = time.perf_counter()
    runs = [run_seed(args, card, test, padding, outside, seed, compare) for seed in args.seeds]

    def figs_of(run: dict[str, SizeRun]) -> dict[str, object]:
        return {
            key: size_run.figures | {"answers": [brief(a) for a in size_run.answers]}
            for key, size_run in run.items()
        }

    results = (
        figs_of(runs[0])
        if len(runs) == 1
        else {
            "by_seed": {str(seed): figs_of(run) for seed, run in zip(args.seeds, runs, strict=True)},
            "pooled": pooled(runs, card, args, compare),
        }
    )
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "artifact": str(args.artifact),
        "model_version": card.model_version,
        "compared_card": str(args.compare_card) if args.compare_card else None,
        "stranger_share": args.stranger_share,
        "min_match_confidence": args.min_match_confidence,
        "seeds": args.seeds,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(meta))
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
