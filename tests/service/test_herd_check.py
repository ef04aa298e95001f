"""`animalid gallery check`: the served card's open-set thresholds against the enrolled animals
themselves as strangers, from the database and the models folder; and `animalid gallery export`
beside it."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from apps import ADMIN, READ, AppRunner
from imagegen import jpeg
from sqlalchemy.orm import Session
from test_index_follower import enroll

from service.cli import main
from service.db.repository import Repository, vector_from_bytes
from service.db.session import make_engine
from service.errors import InvalidRequest
from service.services.herd_check import check_herd, keep_in_card
from service.settings import Settings
from service.worker import Worker
from training.artifact import read_card, write_card
from training.open_set import herd_mates

DEMO_CARD = Path(__file__).resolve().parents[2] / "service" / "demo" / "models" / "dog" / "model_card.json"


def models_with_table(tmp_path: Path, dog: Path, shift: float = 0.0) -> Path:
    """A models folder of its own holding ``dog`` with the demo dog model's open-set table, every
    threshold moved by ``shift``."""
    models = tmp_path / "own-models"
    shutil.copytree(dog, models / "dog")
    card_file = models / "dog" / "model_card.json"
    card = json.loads(card_file.read_text())
    table = json.loads(DEMO_CARD.read_text())["open_set"]
    table["thresholds"] = [[t + shift for t in row] for row in table["thresholds"]]
    card["open_set"] = table
    card_file.write_text(json.dumps(card))
    return models


def test_the_check_reports_each_target_for_the_gallery_and_refuses_what_it_cannot_check(
    settings: Settings,
    runner: AppRunner,
    tmp_path: Path,
    artifacts: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    models = models_with_table(tmp_path, artifacts["dog"])
    client = runner.start(settings.model_copy(update={"models_dir": models}))
    monkeypatch.setenv("ANIMALID_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("ANIMALID_MODELS_DIR", str(models))
    monkeypatch.setenv("ANIMALID_IMAGE_STORE_DIR", str(settings.image_store_dir))

    def check(*extra: str) -> tuple[int, str, str]:
        code = main(["gallery", "check", "--species", "dog", *extra])
        out, err = capsys.readouterr()
        return code, out, err

    enroll(client, 910)
    code, _, err = check()
    assert code == 2 and "fewer than two enrolled individuals" in err
    for individual in range(911, 916):
        enroll(client, individual)  # six animals of two photos each
    code, out, _ = check()
    assert code == 0
    report = json.loads(out)
    assert (report["images"], report["individuals"]) == (12, 6)
    assert [row["target_fpir"] for row in report["targets"]] == [0.01, 0.05]
    for row in report["targets"]:
        assert 0.0 <= row["interval_95"][0] <= row["herd_mates_past"] <= row["interval_95"][1] <= 1.0
        assert -1.0 <= row["threshold_holding_target"] <= 1.0
    assert report["targets"][0]["threshold"] >= report["targets"][1]["threshold"]

    # Read a block at a time, the stored vectors give the study's in-memory figures, photos drawn or not.
    table = read_card(models / "dog").open_set
    assert table is not None
    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        repo = Repository(session)
        species = repo.species_by_name("dog")
        version = repo.active_version(species.id) if species else None
        assert version is not None
        rows = [row for chunk in repo.iter_gallery(version.id) for row in chunk]
        emb = np.stack([vector_from_bytes(row.vector) for row in rows])
        who = [str(row.individual_id) for row in rows]
        for max_queries in (5, 5000):
            checked = check_herd(session, models, "dog", max_queries)
            assert (checked.size, checked.rows) == herd_mates(emb, who, table, max_queries=max_queries)
    engine.dispose()

    # The export it advises, on the same database (the same session helper).
    assert main(["gallery", "export", "--species", "dog", "--out", str(tmp_path / "export")]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert (exported["images"], exported["individuals"]) == (12, 6)
    assert (tmp_path / "export" / "manifest.csv").is_file()
    assert main(["gallery", "export", "--species", "dog", "--out", str(tmp_path / "export")]) == 2
    assert "not empty" in capsys.readouterr().err  # one line, no traceback

    with pytest.raises(SystemExit):
        check("--max-queries", "0")
    assert "at least 1" in capsys.readouterr().err
    assert main(["gallery", "check", "--species", "yak"]) == 2
    assert "unknown species" in capsys.readouterr().err


def test_a_kept_check_raises_identify_s_threshold_and_the_worker_checks_again_as_the_gallery_grows(
    settings: Settings,
    runner: AppRunner,
    tmp_path: Path,
    artifacts: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Thresholds half a unit laxer than the dog model's: the random model's dogs pass them as strangers.
    models = models_with_table(tmp_path, artifacts["dog"], shift=-0.5)
    served = settings.model_copy(
        update={
            "models_dir": models,
            "jobs_dir": tmp_path / "jobs",
            "herd_check_min_individuals": 6,
            "herd_check_growth": 0.5,
        }
    )
    client = runner.start(served)
    for individual in range(920, 925):
        enroll(client, individual)  # five animals: one short of a check by itself
    worker = Worker(served, name="test-worker")
    assert worker.queue_due_herd_checks() == []
    enroll(client, 925)

    def ask() -> dict:
        response = client.post(
            "/identify", data={"species": "dog"}, files={"image": jpeg(920, 5)}, headers=READ
        )
        assert response.status_code == 200, response.text
        return response.json()

    before = ask()
    assert before["threshold_source"] == "open_set"
    assert client.get("/species/dog", headers=READ).json()["herd_check"] is None

    # Asked for over the API (admin only, one at a time), run by a worker, kept in the card.
    assert client.post("/species/dog/herd-check", headers=READ).status_code == 403
    queued = client.post("/species/dog/herd-check", headers=ADMIN)
    assert queued.status_code == 202, queued.text
    assert (queued.json()["kind"], queued.json()["status"]) == ("herd_check", "queued")
    again = client.post("/species/dog/herd-check", headers=ADMIN)
    assert (again.status_code, again.json()["code"]) == (409, "job_conflict")
    assert client.post("/species/yak/herd-check", headers=ADMIN).status_code == 404
    assert worker.run(once=True) == 1
    job = client.get(f"/jobs/{queued.json()['id']}", headers=READ).json()
    assert job["status"] == "succeeded", job
    kept = read_card(models / "dog").herd
    assert kept is not None and (kept.images, kept.individuals) == (12, 6)
    assert job["result"]["checked_at"] == kept.checked_at
    assert [row.target for row in kept.rows] == [0.01, 0.05]
    row = kept.row_for(0.01)
    assert row is not None and row.past > 0.01 and row.excess > 0

    # The API serves the card's check once it reloads it (the models-folder watch does it in time).
    reloaded = client.post("/species/dog/reload", headers=ADMIN)
    assert reloaded.status_code == 202 and "model card changed" in reloaded.json()["message"]
    described = client.get("/species/dog", headers=READ).json()
    assert described["herd_check"]["checked_at"] == kept.checked_at
    after = ask()
    assert after["threshold_source"] == described["identify"]["threshold_source"] == "herd_check"
    assert after["threshold"] == pytest.approx(row.holding, abs=1e-6)
    assert after["threshold"] > before["threshold"]
    assert "raised from" in after["reason"] and "6 enrolled animals" in after["reason"]
    assert after["candidates"] == before["candidates"]

    # Not due again until the gallery has grown by half.
    assert worker.queue_due_herd_checks() == []
    for individual in range(926, 929):
        enroll(client, individual)
    assert worker.queue_due_herd_checks() == ["dog"]
    assert worker.queue_due_herd_checks() == []  # already queued
    assert worker.run(once=True) == 1
    checked = read_card(models / "dog").herd
    assert checked is not None and (checked.images, checked.individuals) == (18, 9)
    assert worker.queue_due_herd_checks() == []
    worker.close()
    # A target FPIR the check has no row for is due at once, and checked at that target too.
    retargeted = Worker(served.model_copy(update={"target_fpir": 0.02}), name="test-worker")
    assert retargeted.queue_due_herd_checks() == ["dog"]
    assert retargeted.run(once=True) == 1
    retargeted.close()
    assert [row.target for row in read_card(models / "dog").herd.rows] == [0.01, 0.02, 0.05]
    # A check is not kept in a card whose table changed meanwhile (a recalibration).
    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        checked_then = check_herd(session, models, "dog", 5000)
    engine.dispose()
    recalibrated = read_card(models / "dog")
    assert recalibrated.open_set is not None
    write_card(
        replace(recalibrated, open_set=replace(recalibrated.open_set, simulated_up_to=7)), models / "dog"
    )
    with pytest.raises(InvalidRequest, match="changed while its herd was checked"):
        keep_in_card(models, checked_then)

    # By hand: `animalid gallery check --apply`, audited like the worker's.
    monkeypatch.setenv("ANIMALID_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("ANIMALID_MODELS_DIR", str(models))
    monkeypatch.setenv("ANIMALID_IMAGE_STORE_DIR", str(settings.image_store_dir))
    monkeypatch.setenv("ANIMALID_TARGET_FPIR", "0.02")
    assert main(["gallery", "check", "--species", "dog", "--apply"]) == 0
    printed = json.loads(capsys.readouterr().out)
    by_hand = read_card(models / "dog").herd
    assert by_hand is not None and printed["checked_at"] == by_hand.checked_at
    assert [row["target_fpir"] for row in printed["targets"]] == [0.01, 0.02, 0.05]
    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        actors = [
            (entry.action, entry.actor)
            for entry in Repository(session).audit_entries()
            if entry.action.startswith("herd_check")
        ]
    engine.dispose()
    assert ("herd_check", "cli") in actors
    assert sum(1 for action, actor in actors if action == "herd_check" and actor.startswith("worker:")) == 3
    assert ("herd_check_queued", "worker:test-worker") in actors
