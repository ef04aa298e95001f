"""Learning the enrolled animals: gallery export, fine-tune jobs through the API, the worker process."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from apps import ADMIN, READ, build_fused_artifact, make_models_dir
from fastapi.testclient import TestClient
from imagegen import jpeg

from service.app import create_app
from service.db.job_repository import JobRepository
from service.db.models import AuditEntry
from service.db.session import make_engine, make_sessionmaker
from service.services.finetune import FinetunePolicy, kept_reasons, strangers_share
from service.services.gallery_export import export_gallery
from service.services.identification import Limits
from service.services.model_watch import ModelWatcher
from service.settings import Settings
from service.worker import Worker
from training.artifact import load_artifact, read_card
from training.config import build_config
from training.data import load_dataset
from training.fusion import FusedEmbeddingNet

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "service" / "demo" / "models" / "dog"
INDIVIDUALS = 4


def enroll_batches(
    client: TestClient, individuals: int = INDIVIDUALS, batches: int = 2, per_batch: int = 2
) -> None:
    """Each individual enrolled in ``batches`` requests (sessions) of ``per_batch`` photos."""
    for ind in range(individuals):
        for batch in range(batches):
            files = [
                ("images", (f"p{k}.jpg", jpeg(ind, batch * per_batch + k), "image/jpeg"))
                for k in range(per_batch)
            ]
            response = client.post(
                "/enroll", data={"species": "dog", "external_id": f"dog-{ind}"}, files=files
            )
            assert response.status_code in (200, 201), response.text


def job_settings(settings: Settings, tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "jobs_dir": tmp_path / "jobs",
        "finetune_epochs": 2,
        "job_heartbeat_s": 0.5,
        "job_stale_after_s": 3.0,
        "worker_poll_s": 0.2,
        "device": "cpu",
    }
    values.update(overrides)
    return settings.model_copy(update=values)


def run_queued(settings: Settings) -> int:
    """Run every queued job in a worker of this process; the number run."""
    worker = Worker(settings, name="test-worker")
    try:
        return worker.run(once=True)
    finally:
        worker.close()


def audit_actions(settings: Settings) -> list[str]:
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            return [e.action for e in session.query(AuditEntry).order_by(AuditEntry.id)]
    finally:
        engine.dispose()


def test_gallery_export_is_a_dataset_grouped_by_enrolment_batch(settings: Settings, tmp_path: Path) -> None:
    with TestClient(create_app(settings), headers=ADMIN) as client:
        enroll_batches(client, individuals=3, batches=2, per_batch=2)
        runtime = client.app.state.runtime
        with runtime.sessions() as session:
            result = export_gallery(session, runtime.store, "dog", tmp_path / "export")
    assert (result.individuals, result.images, result.groups) == (3, 12, 6)
    rows = list(csv.DictReader(result.manifest.open()))
    assert list(rows[0]) == ["path", "individual", "species", "group", "external_id", "image_id"]
    by_dog: dict[str, set[str]] = {}
    for row in rows:
        by_dog.setdefault(row["external_id"], set()).add(row["group"])
        assert row["species"] == "dog" and row["path"].startswith(row["individual"] + "/")
    assert all(len(groups) == 2 for groups in by_dog.values())  # two enrolment requests each
    # The exported files are the enrolled bytes.
    enrolled = {hashlib.sha256(jpeg(i, k)).hexdigest() for i in range(3) for k in range(4)}
    assert {
        hashlib.sha256((result.manifest.parent / r["path"]).read_bytes()).hexdigest() for r in rows
    } == enrolled
    # The training package reads it like any dataset, the enrolment batch as the group.
    dataset = load_dataset(result.manifest, species="dog")
    assert len(dataset.samples) == 12 and len({s.group for s in dataset.samples}) == 6


def test_gallery_export_refuses_a_non_empty_folder_and_an_unknown_species(
    settings: Settings, tmp_path: Path
) -> None:
    from service.errors import InvalidRequest, SpeciesNotFound

    with TestClient(create_app(settings), headers=ADMIN) as client:
        enroll_batches(client, individuals=1, batches=1, per_batch=1)
        runtime = client.app.state.runtime
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "keep.txt").write_text("mine")
        with runtime.sessions() as session:
            with pytest.raises(InvalidRequest):
                export_gallery(session, runtime.store, "dog", tmp_path / "full")
            with pytest.raises(SpeciesNotFound):
                export_gallery(session, runtime.store, "yak", tmp_path / "new")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_gallery_export_command(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with TestClient(create_app(settings), headers=ADMIN) as client:
        enroll_batches(client, individuals=2, batches=2, per_batch=1)
    monkeypatch.setenv("ANIMALID_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("ANIMALID_IMAGE_STORE_DIR", str(settings.image_store_dir))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "gallery",
            "export",
            "--species",
            "dog",
            "--out",
            str(tmp_path / "g"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["images"] == 4 and summary["groups"] == 4
    assert (tmp_path / "g" / "manifest.csv").is_file()


def test_finetune_queued_through_the_api_is_judged_promoted_and_served(
    settings: Settings, tmp_path: Path
) -> None:
    # Margins that any challenger meets: this test is about the mechanics of a promotion.
    settings = job_settings(settings, tmp_path, promote_min_top1_gain=-1.0, promote_min_far_drop=-1.0)
    models = settings.models_dir
    old_version = read_card(models / "dog").model_version
    with TestClient(create_app(settings), headers=ADMIN) as client:
        enroll_batches(client)
        queued = client.post("/species/dog/finetune", json={"epochs": 2})
        assert queued.status_code == 202, queued.text
        job_id = queued.json()["id"]
        assert queued.json()["status"] == "queued"
        again = client.post("/species/dog/finetune", json={})
        assert again.status_code == 409 and again.json()["code"] == "job_conflict"

        assert run_queued(settings) == 1

        job = client.get(f"/jobs/{job_id}", headers=READ).json()
        assert job["status"] == "succeeded", job
        assert job["progress"]["epoch"] == 2 and job["progress"]["epochs"] == 2
        assert job["progress"]["stage"] == "succeeded"  # not the last stage it ran
        result = job["result"]
        assert result["decision"] == "promoted"
        for side in ("champion", "challenger"):
            closed = result[side]["closed_set"]
            assert {"top1", "test_far", "wrong_match_rate"} <= set(closed)
        # Champion and challenger judged on the same held-back photos.
        assert (
            result["champion"]["closed_set"]["test_images"]
            == result["challenger"]["closed_set"]["test_images"]
        )
        assert result["champion"]["model_version"] == old_version

        card = read_card(models / "dog")
        assert card.model_version == result["challenger"]["model_version"] != old_version
        assert card.training_config["lineage"]["parent_model_version"] == old_version
        assert card.metrics["closed_set"] == result["challenger"]["closed_set"]
        # Four animals are too few to keep some out as strangers: the champion's pair threshold stays.
        assert result["challenger"]["calibration"]["individuals"] == 0
        assert card.threshold == result["challenger"]["threshold"] == result["champion"]["threshold"]
        assert card.open_set is None
        assert read_card(Path(result["retired_to"])).model_version == old_version

        # The service switches to it with its re-embedding.
        watcher = ModelWatcher(client.app.state.runtime.lifecycle, 1.0)
        assert watcher.check() == ["dog"]
        assert client.app.state.runtime.reembedder.wait("dog", timeout=120)
        species = client.get("/species/dog").json()
        assert species["model_version"] == card.model_version
        assert species["index_size"] == INDIVIDUALS * 4
        assert watcher.check() == []  # nothing new

        listed = client.get("/jobs", params={"species": "dog"}, headers=READ).json()
        assert listed["count"] == 1 and listed["data"][0]["id"] == job_id
    actions = audit_actions(settings)
    assert "finetune_queued" in actions and "finetune_promoted" in actions


def test_a_challenger_that_does_not_win_by_the_margin_is_kept_out(settings: Settings, tmp_path: Path) -> None:
    settings = job_settings(settings, tmp_path, promote_min_top1_gain=2.0)  # top-1 cannot gain 2
    before = (settings.models_dir / "dog").resolve()
    with TestClient(create_app(settings), headers=ADMIN) as client:
        enroll_batches(client)
        job_id = client.post("/species/dog/finetune", json={"epochs": 1}).json()["id"]
        run_queued(settings)
        job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["result"]["decision"] == "kept"
    assert job["result"]["challenger"]["model_version"] is None
    assert (settings.models_dir / "dog").resolve() == before
    assert "finetune_kept" in audit_actions(settings)


def calibrated_champion(settings: Settings) -> Settings:
    """``settings`` whose serving dog model has an open-set table (the demo model's, copied into its card).
    The models folder links to the session's artifacts: the dog is copied first, so that the card
    written here is this test's alone."""
    live = settings.models_dir / "dog"
    shared = live.resolve()
    live.unlink()
    shutil.copytree(shared, live)
    card_file = live / "model_card.json"
    card = json.loads(card_file.read_text())
    card["open_set"] = json.loads((DEMO_MODEL / "model_card.json").read_text())["open_set"]
    card_file.write_text(json.dumps(card))
    return settings


def test_a_serving_model_with_an_open_set_calibration_is_not_replaced_by_one_without(
    settings: Settings, tmp_path: Path
) -> None:
    # Margins any challenger meets, but the serving model decides with thresholds by gallery size
    # that the new model would not have (four animals are too few to keep some out for its own).
    settings = calibrated_champion(
        job_settings(settings, tmp_path, promote_min_top1_gain=-1.0, promote_min_far_drop=-1.0)
    )
    before = (settings.models_dir / "dog").resolve()
    with TestClient(create_app(settings), headers=ADMIN) as client:
        assert client.get("/species/dog").status_code == 200  # the card with its table loads
        enroll_batches(client)
        job_id = client.post("/species/dog/finetune", json={"epochs": 1}).json()["id"]
        run_queued(settings)
        job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["result"]["decision"] == "kept"
    (reason,) = job["result"]["kept_because"]
    assert "open-set calibration" in reason
    assert (settings.models_dir / "dog").resolve() == before
    assert read_card(before).open_set is not None


def test_a_calibrated_serving_model_is_replaced_by_one_calibrated_on_animals_kept_out_of_training(
    settings: Settings, tmp_path: Path
) -> None:
    settings = calibrated_champion(
        job_settings(settings, tmp_path, promote_min_top1_gain=-1.0, promote_min_far_drop=-1.0)
    )
    champion = read_card(settings.models_dir / "dog")
    assert champion.open_set is not None
    with TestClient(create_app(settings), headers=ADMIN) as client:
        enroll_batches(client, individuals=8)
        job_id = client.post("/species/dog/finetune", json={"epochs": 1, "strangers": 0.4}).json()["id"]
        run_queued(settings)
        job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["result"]["decision"] == "promoted", job
    result = job["result"]
    # 3 of the 8 dogs (0.4, rounded) never trained: the new model's thresholds come from them.
    assert result["lineage"]["gallery_individuals"] == 8
    assert result["lineage"]["calibration_individuals"] == 3
    assert result["challenger"]["calibration"]["individuals"] == 3
    kept_out = result["challenger"]["calibration"]["kept_out"]
    assert len(kept_out) == 3 and set(kept_out) <= {f"dog-{i}" for i in range(8)}
    assert result["champion"]["closed_set"]["test_individuals"] == 5  # judged on the trained dogs only
    promoted = read_card(settings.models_dir / "dog")
    assert promoted.model_version == result["challenger"]["model_version"]
    assert promoted.open_set is not None and promoted.open_set.counts["individuals"] == 3
    assert promoted.open_set.thresholds != champion.open_set.thresholds
    assert promoted.threshold == result["challenger"]["calibration"]["pair_threshold"] != champion.threshold
    assert promoted.metrics["calibration_individuals"] == 3
    assert any("kept out of the fine-tune" in w for w in promoted.warnings)
    # Each model was judged at the threshold it serves with for this gallery (8 dogs of 4 photos, 32
    # images; FPIR 1%), each reading the gallery with its own image exponent.
    assert result["gallery_images"] == 32 and result["target_fpir"] == 0.01
    for card, judged in ((champion, result["champion"]), (promoted, result["challenger"])):
        assert card.open_set is not None
        assert judged["threshold"] == card.open_set.threshold(card.open_set.equivalent_size({4: 8}), 0.01)
        # ... and with the minimum match confidence it serves with: its doubtful matches are uncertain
        assert judged["min_confidence"] == 0.5
        assert "held_back_rate" in judged["closed_set"]
        # ... and on the 3 kept-out dogs' 12 photos, each dog left out of the gallery
        assert judged["herd_mates_matched"] * 12 == pytest.approx(round(judged["herd_mates_matched"] * 12))
    assert champion.open_set.equivalent_size({4: 8}) != 32  # the shipped card reads 4 photos as fewer dogs


def test_a_challenger_that_lets_more_newcomers_through_than_allowed_is_kept_out() -> None:
    # Margins met; the kept-out animals' photos answered `match` (serving model, new model) against a
    # 1% target: the new model may reach the serving model's share or 1.5%, whichever is higher.
    policy = FinetunePolicy(1, 0.01, 0.5, 0.2, 0.01, 0.0, 1, "cpu", Limits(None, 0.5, 5, 50))  # type: ignore[arg-type]

    def reasons(herd: tuple[float | None, float | None], target: float | None = 0.01) -> list[str]:
        return kept_reasons(policy, 0.05, 0.001, False, herd, target)

    assert reasons((0.0, 0.015)) == [] and reasons((0.04, 0.04)) == []
    (reason,) = reasons((0.0, 0.016))
    assert "1.6% of the photos of the animals kept out" in reason and "at most 1.5%" in reason
    assert len(reasons((0.03, 0.031))) == 1
    # nothing kept out, or no open-set table to read a target from: no such check
    assert reasons((None, None)) == [] and reasons((0.0, 0.5), target=None) == []
    # the margins and a lost table as before, each with its reason
    assert len(kept_reasons(policy, 0.0, -0.01, True, (0.0, 0.5), 0.01)) == 4


def test_the_strangers_share_keeps_out_enough_animals_for_a_table_or_none() -> None:
    assert strangers_share(4, 0.2) == 0.0  # one animal: no table
    assert strangers_share(15, 0.2) == 0.2  # three
    assert strangers_share(4, 0.9) == 0.0  # nothing left to train on


def test_a_gallery_with_one_enrolment_batch_per_animal_cannot_be_judged(
    settings: Settings, tmp_path: Path
) -> None:
    settings = job_settings(settings, tmp_path)
    with TestClient(create_app(settings), headers=ADMIN) as client:
        enroll_batches(client, batches=1, per_batch=3)
        job_id = client.post("/species/dog/finetune").json()["id"]
        run_queued(settings)
        job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "failed" and "two enrolment batches" in job["error"]


def recipe(epochs: int) -> dict[str, object]:
    """A network's training configuration as its card records it (0 epochs: ImageNet features)."""
    values = {"epochs": epochs, "datasets": [{"source": "x", "species": "dog"}]}
    return build_config(values | ({"pretrained": "imagenet"} if epochs == 0 else {})).to_dict()


def serve_fused(
    settings: Settings, artifacts: dict[str, Path], configs: list[dict | None], name: str = "fused"
) -> Path:
    """Serve as dog a model fusing dog_v2 (weight 0.7) and dog (0.3), their recipes ``configs``."""
    parts = [(artifacts["dog_v2"], 0.7, configs[0]), (artifacts["dog"], 0.3, configs[1])]
    root = settings.models_dir.parent
    fused = build_fused_artifact(root / name, parts)
    make_models_dir(root, {name: fused}, dog=name)
    return fused


def test_a_fused_model_fine_tunes_its_trained_network_and_keeps_its_frozen_one(
    settings: Settings, tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    settings = job_settings(settings, tmp_path, promote_min_top1_gain=-1.0, promote_min_far_drop=-1.0)
    start = load_artifact(serve_fused(settings, artifacts, [recipe(0), recipe(3)]))
    with TestClient(create_app(settings), headers=ADMIN) as client:
        enroll_batches(client, individuals=3, per_batch=1)
        job_id = client.post("/species/dog/finetune", json={"epochs": 1}).json()["id"]
        assert run_queued(settings) == 1
        job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    assert job["result"]["decision"] == "promoted"

    promoted = load_artifact(settings.models_dir / "dog")
    assert isinstance(promoted.model, FusedEmbeddingNet) and isinstance(start.model, FusedEmbeddingNet)
    card, old = promoted.card, start.card
    assert card.model_version == job["result"]["challenger"]["model_version"] != old.model_version
    assert card.architecture == "fusion-concat" and card.preprocess == old.preprocess
    assert card.fusion is not None and old.fusion is not None
    assert [b.weight for b in card.fusion] == [0.7, 0.3]
    # The frozen network is the start's, bit for bit, and its entry unchanged.
    assert card.fusion[0] == old.fusion[0]
    for name, tensor in promoted.model.net(0).state_dict().items():
        assert torch.equal(tensor, start.model.net(0).state_dict()[name]), name
    # The trained one was fine-tuned: new weights, its new recipe and the artifact it was written as.
    assert any(
        not torch.equal(tensor, start.model.net(1).state_dict()[name])
        for name, tensor in promoted.model.net(1).state_dict().items()
    )
    tuned = read_card(settings.jobs_dir / job_id / "tuned" / "network-1")
    assert card.fusion[1].source == tuned.model_version != old.fusion[1].source
    assert card.fusion[1].training_config is not None and card.fusion[1].training_config["epochs"] == 1
    assert card.fusion[1].trains and not card.fusion[0].trains
    assert card.training_config["lineage"]["parent_model_version"] == old.model_version
    assert card.training_config["fused_from"] == [b.source for b in card.fusion]


def test_a_fused_model_without_its_networks_recipes_or_with_none_trained_is_refused(
    settings: Settings, tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    settings = job_settings(settings, tmp_path)
    errors = []
    with TestClient(create_app(settings), headers=ADMIN) as client:
        enroll_batches(client, individuals=2, per_batch=1)
        # Fused before cards recorded the networks' recipes; then both frozen. Refused when queued.
        for configs in ([None, None], [recipe(0), recipe(0)]):
            before = serve_fused(settings, artifacts, configs, name=f"fused-{len(errors)}")
            refused = client.post("/species/dog/finetune", json={"epochs": 1})
            assert refused.status_code == 422 and refused.json()["code"] == "invalid_request", refused.text
            assert refused.json()["message"].startswith("dog cannot be fine-tuned"), refused.text
            assert client.get("/jobs").json()["count"] == 0  # nothing queued
            assert (settings.models_dir / "dog").resolve() == before.resolve()
            errors.append(refused.json()["message"])
    assert "does not record each network's training configuration" in errors[0]
    assert "nothing to fine-tune" in errors[1]


def test_job_requests_and_cancels(settings: Settings, tmp_path: Path) -> None:
    with TestClient(create_app(job_settings(settings, tmp_path)), headers=ADMIN) as client:
        assert client.post("/species/yak/finetune").json()["code"] == "species_not_found"
        bad = client.post("/species/dog/finetune", json={"epochs": 0})
        assert bad.status_code == 422
        assert client.post("/species/dog/finetune", json={"start": "../etc"}).status_code == 422
        assert client.post("/species/dog/finetune", headers=READ).status_code == 403
        job_id = client.post("/species/dog/finetune").json()["id"]
        cancelled = client.post(f"/jobs/{job_id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert client.get(f"/jobs/{job_id}").json()["progress"]["stage"] == "cancelled"
        assert client.post(f"/jobs/{job_id}/cancel").json()["code"] == "job_conflict"
        assert client.get("/jobs/00000000-0000-0000-0000-000000000000").json()["code"] == "job_not_found"
        assert client.get("/jobs", params={"status": "nope"}).status_code == 422
        # A cancelled job is not run, and another fine-tune may be queued.
        assert client.post("/species/dog/finetune").status_code == 202
    assert "job_cancel" in audit_actions(settings)


def test_a_requeued_or_finished_job_shows_that_stage_and_keeps_its_last_epoch(
    settings: Settings, tmp_path: Path
) -> None:
    with TestClient(create_app(job_settings(settings, tmp_path)), headers=ADMIN) as client:
        job_id = uuid.UUID(client.post("/species/dog/finetune").json()["id"])
        engine = make_engine(settings.database_url)
        try:
            with make_sessionmaker(engine)() as session:
                jobs, postgres = JobRepository(session), engine.dialect.name == "postgresql"
                assert jobs.claim("w1", timedelta(hours=1), postgres, only=job_id) is not None
                jobs.heartbeat(job_id, "w1", {"stage": "train", "epoch": 1, "epochs": 3})
                jobs.release(job_id, "w1")  # the worker stopped: back to the queue
                session.commit()
                assert client.get(f"/jobs/{job_id}").json()["progress"] == {
                    "stage": "queued", "epoch": 1, "epochs": 3,
                }  # fmt: skip
                assert jobs.claim("w2", timedelta(hours=1), postgres, only=job_id) is not None
                jobs.heartbeat(job_id, "w2", {"stage": "evaluate", "epoch": 3, "epochs": 3})
                assert jobs.finish(job_id, "w2", "failed", {}, "boom")
                session.commit()
        finally:
            engine.dispose()
        job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["progress"] == {"stage": "failed", "epoch": 3, "epochs": 3}


def _worker_process(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "ANIMALID_DATABASE_URL": settings.database_url,
        "ANIMALID_MODELS_DIR": str(settings.models_dir),
        "ANIMALID_IMAGE_STORE_DIR": str(settings.image_store_dir),
        "ANIMALID_JOBS_DIR": str(settings.jobs_dir),
        "ANIMALID_JOB_HEARTBEAT_S": str(settings.job_heartbeat_s),
        "ANIMALID_JOB_STALE_AFTER_S": str(settings.job_stale_after_s),
        "ANIMALID_WORKER_POLL_S": "0.2",
        "ANIMALID_DEVICE": "cpu",
        "ANIMALID_PROMOTE_MIN_TOP1_GAIN": "-1",
        "ANIMALID_PROMOTE_MIN_FAR_DROP": "-1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker"],
        cwd=REPO,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def _wait_for(client: TestClient, job_id: str, done: object, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if done(job):  # type: ignore[operator]
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not get there in {timeout} s: {job}")


def test_a_killed_worker_s_job_resumes_from_its_checkpoint_in_a_new_worker(
    settings: Settings, tmp_path: Path
) -> None:
    settings = job_settings(settings, tmp_path)
    log = tmp_path / "worker.log"
    with TestClient(create_app(settings), headers=ADMIN) as client:
        enroll_batches(client, per_batch=3)
        job_id = client.post("/species/dog/finetune", json={"epochs": 30}).json()["id"]
        first = _worker_process(settings, log)
        try:
            job = _wait_for(client, job_id, lambda j: j["progress"].get("epoch", 0) >= 1, 180)
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait(30)
        killed_at = client.get(f"/jobs/{job_id}").json()["progress"]["epoch"]
        assert job["status"] == "running" and killed_at < 30
        second = _worker_process(settings, log)
        try:
            job = _wait_for(client, job_id, lambda j: j["status"] not in ("queued", "running"), 600)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(60)
    assert job["status"] == "succeeded", (job, log.read_text()[-3000:])
    assert job["attempts"] == 2
    # The second worker went on from the first one's last checkpoint, not from epoch 1.
    assert job["progress"]["resumed_at_epoch"] >= killed_at + 1 >= 2
    log_lines = (settings.jobs_dir / job_id / "finetune" / "log.jsonl").read_text().splitlines()
    epochs = [json.loads(line)["epoch"] for line in log_lines]
    assert set(epochs) == set(range(1, 31))
    # At most the epoch the kill interrupted (logged, not yet checkpointed) was trained twice.
    assert len(epochs) <= 31


def test_serve_can_run_a_worker_in_a_child_process(settings: Settings, tmp_path: Path) -> None:
    from service.cli import _embedded_worker

    embedded = job_settings(settings, tmp_path, embedded_worker=True)
    with TestClient(create_app(embedded), headers=ADMIN) as client:
        enroll_batches(client, individuals=2)
        job_id = client.post("/species/dog/finetune", json={"epochs": 1}).json()["id"]
        with _embedded_worker(embedded):
            job = _wait_for(client, job_id, lambda j: j["status"] not in ("queued", "running"), 300)
        assert job["status"] == "succeeded" and job["worker"] != "test-worker"
    with _embedded_worker(job_settings(settings, tmp_path)):  # off by default: nothing to start
        pass


def test_a_running_job_stops_at_its_next_epoch_when_cancelled(settings: Settings, tmp_path: Path) -> None:
    import threading

    settings = job_settings(settings, tmp_path)
    before = (settings.models_dir / "dog").resolve()
    with TestClient(create_app(settings), headers=ADMIN) as client:
        enroll_batches(client, per_batch=3)
        job_id = client.post("/species/dog/finetune", json={"epochs": 50}).json()["id"]
        runner = threading.Thread(target=run_queued, args=(settings,))
        runner.start()
        try:
            _wait_for(client, job_id, lambda j: j["progress"].get("epoch", 0) >= 1, 180)
            assert client.post(f"/jobs/{job_id}/cancel").json()["cancel_requested"] is True
        finally:
            runner.join(300)
        job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["progress"]["epoch"] < 50
    assert job["progress"]["stage"] == "cancelled"
    assert (settings.models_dir / "dog").resolve() == before  # nothing promoted
    assert "finetune_cancelled" in audit_actions(settings)
