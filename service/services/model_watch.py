"""Switch to a model version that appeared in the models folder, without a call to reload.

A promoted fine-tune (written by a worker process) or an artifact copied in by hand changes
``<models_dir>/<species>/model_card.json``. Every ``ANIMALID_MODEL_WATCH_S`` seconds the API reads
each card (a small JSON file) and, when its model version is neither serving nor being re-embedded,
reloads the species: the existing re-embedding takes over, the current model serving meanwhile.
A version that failed to load is not retried until the card changes again.
"""

from __future__ import annotations

import logging
import threading

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
        self._tried: dict[str, str] = {}

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
        """Reload every species whose card names a new version; returns their names."""
        reloaded = []
        for name, path in discover_artifacts(self._life.models_dir).items():
            try:
                version = read_card(path).model_version
            except ArtifactError:
                continue
            slot = self._life.registry.slots.get(name)
            known = set()
            if slot is not None:
                if slot.serving is not None:
                    known.add(slot.serving.model_version)
                if slot.pending is not None:
                    known.add(slot.pending.embedder.model_version)
            if version in known or self._tried.get(name) == version:
                continue
            self._tried[name] = version
            result = reload_species(self._life, name, WATCHER_ACTOR)
            log.info("models folder: %s has %s: %s", name, version, result.message)
            reloaded.append(name)
        return reloaded
