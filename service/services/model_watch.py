"""Switch to a model version that appeared in the models folder, without a call to reload.

A promoted fine-tune (written by a worker process) or an artifact copied in by hand changes
``<models_dir>/<species>/model_card.json``. Every ``ANIMALID_MODEL_WATCH_S`` seconds the API reads
each card (a small JSON file) and, when it is neither the serving card nor the one being
re-embedded, reloads the species: a new model version is re-embedded, the current model serving
meanwhile; the serving version's card recalibrated in place (`animalid calibrate`) is served at once.
A card that failed to load is not retried until it changes again.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from service.security import Principal, Scope
from service.services.galleries import discover_artifacts
from service.services.species import Lifecycle, reload_species
from training.artifact import ArtifactError, read_card

# Who a reload for a new model version found in the models folder is audited as.
WATCHER_ACTOR = Principal(scope=Scope.ADMIN, fingerprint="model-watch")

log = logging.getLogger(__name__)


class ModelWatcher:
    def __init__(self, life: Lifecycle, interval_s: float) -> None:
        self._life = life
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tried: dict[str, dict[str, Any]] = {}  # species -> the card last reloaded for

    def start(self) -> None:
        if self._interval <= 0:
            return
        self._thread = threading.Thread(target=self._loop, name="model-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.check()
            except Exception:  # a bad moment (a folder being swapped); the next round looks again
                log.exception("model watch failed")

    def check(self) -> list[str]:
        """Reload every species whose card is new (a new version, or the serving version's card
        recalibrated in place); returns their names."""
        reloaded = []
        for name, path in discover_artifacts(self._life.models_dir).items():
            try:
                card = read_card(path).to_dict()
            except ArtifactError:
                continue
            slot = self._life.registry.slots.get(name)
            known = []
            if slot is not None:
                if slot.serving is not None:
                    known.append(slot.serving.embedder.card.to_dict())
                if slot.pending is not None:
                    known.append(slot.pending.embedder.card.to_dict())
            if card in known or self._tried.get(name) == card:
                continue
            self._tried[name] = card
            result = reload_species(self._life, name, WATCHER_ACTOR)
            log.info("models folder: %s has %s: %s", name, card["model_version"], result.message)
            reloaded.append(name)
        return reloaded
