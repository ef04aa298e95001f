"""The models-folder watcher: a card recalibrated in place (same weights) is served without a
restart or a re-embedding, and an unchanged folder reloads nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from apps import AppRunner
from imagegen import jpeg
from test_index_follower import enroll

from service.runtime import Runtime
from service.services.model_watch import ModelWatcher
from service.settings import Settings


def test_a_card_recalibrated_in_place_is_served_at_once_without_re_embedding(
    settings: Settings, runner: AppRunner, tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    models = tmp_path / "own-models"
    shutil.copytree(artifacts["dog"], models / "dog")  # its own copy: the card is rewritten below
    client = runner.start(settings.model_copy(update={"models_dir": models}))
    runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    enroll(client, 900)
    before = runtime.registry.serving("dog")
    watcher = ModelWatcher(runtime.lifecycle, 1.0)
    assert watcher.check() == []  # the serving card: nothing to do

    card_file = models / "dog" / "model_card.json"
    card = json.loads(card_file.read_text())
    card["threshold"] = 0.123  # as `animalid calibrate --out` the same folder would rewrite it
    card_file.write_text(json.dumps(card))
    assert watcher.check() == ["dog"]
    after = runtime.registry.serving("dog")
    assert after.embedder.card.threshold == 0.123
    assert after.model_version == before.model_version and after.gallery is before.gallery
    assert "dog" not in runtime.reembedder._threads  # the same weights: nothing re-embedded
    assert watcher.check() == []
    answer = client.post("/identify", data={"species": "dog"}, files={"image": jpeg(900, 1)}).json()
    assert answer["threshold"] == 0.123 and answer["threshold_source"] == "model_card"
    species = client.get("/species/dog").json()
    assert species["model_version"] == before.model_version and species["threshold"] == 0.123
