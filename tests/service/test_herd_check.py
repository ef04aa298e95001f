"""`animalid gallery check`: the served card's open-set thresholds against the enrolled animals
themselves as strangers, from the database and the models folder; and `animalid gallery export`
beside it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from apps import AppRunner
from sqlalchemy.orm import Session
from test_index_follower import enroll

from service.cli import main
from service.db.repository import Repository, vector_from_bytes
from service.db.session import make_engine
from service.services.herd_check import check_herd
from service.settings import Settings
from training.artifact import read_card
from training.open_set import herd_mates

DEMO_CARD = Path(__file__).resolve().parents[2] / "service" / "demo" / "models" / "dog" / "model_card.json"


def test_the_check_reports_each_target_for_the_gallery_and_refuses_what_it_cannot_check(
    settings: Settings,
    runner: AppRunner,
    tmp_path: Path,
    artifacts: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    models = tmp_path / "own-models"
    shutil.copytree(artifacts["dog"], models / "dog")  # its own copy: an open-set table is added
    card_file = models / "dog" / "model_card.json"
    card = json.loads(card_file.read_text())
    card["open_set"] = json.loads(DEMO_CARD.read_text())["open_set"]
    card_file.write_text(json.dumps(card))
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
