"""The typed registry the lifespan fills: one slot per species, each with what is serving now.

A slot's ``serving`` is an immutable (model, gallery, model version) triple. Replacing it is one
attribute assignment, so a new model and its index take over atomically: a request that already
holds the old triple finishes on it, the next one gets the new one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from service.errors import SpeciesNotFound, SpeciesUnavailable
from service.ml.ann import IndexPlan
from service.ml.batching import BatchingConfig, EmbedBatcher, SearchBatcher
from service.ml.embedder import Embedder
from service.ml.gallery import Candidate, Gallery

log = logging.getLogger(__name__)


class SpeciesStatus(StrEnum):
    READY = "ready"  # serving
    REINDEXING = "reindexing"  # serving the old model while a new one re-embeds the gallery
    BUILDING = "building"  # a new model is re-embedding the gallery and nothing older can serve
    DISABLED = "disabled"  # no usable artifact; see reason


@dataclass(frozen=True)
class Serving:
    embedder: Embedder
    gallery: Gallery
    model_version_id: int

    @property
    def model_version(self) -> str:
        return self.embedder.model_version


@dataclass
class Pending:
    embedder: Embedder
    model_version_id: int
    done: int = 0
    total: int = 0
    error: str | None = None


@dataclass
class SpeciesSlot:
    name: str
    artifact_path: Path | None = None
    serving: Serving | None = None
    pending: Pending | None = None
    # Why the species does not serve, in words safe to show anyone (no paths, no hashes) ...
    disabled_reason: str | None = None
    # ... and the underlying error, for the log and the admin status only.
    disabled_detail: str | None = None
    # Serialises writes to this species' database rows and index (enroll, delete, merge, swap).
    write_lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def status(self) -> SpeciesStatus:
        if self.serving is not None:
            return SpeciesStatus.REINDEXING if self.pending is not None else SpeciesStatus.READY
        if self.pending is not None:
            return SpeciesStatus.BUILDING
        return SpeciesStatus.DISABLED

    @property
    def reason(self) -> str | None:
        if self.pending is not None and self.pending.error:
            return "re-embedding failed"
        if self.serving is None and self.pending is not None:
            return "re-embedding stored images with a new model; nothing older can serve"
        return self.disabled_reason

    @property
    def detail(self) -> str | None:
        """The error behind ``reason`` (may name files): for the log and the admin status."""
        if self.pending is not None and self.pending.error:
            return self.pending.error
        return self.disabled_detail if self.disabled_reason is not None else None

    def disable(self, reason: str | None, detail: str | None = None) -> None:
        self.disabled_reason, self.disabled_detail = reason, detail

    def require_serving(self) -> Serving:
        serving = self.serving
        if serving is None:
            raise SpeciesUnavailable(
                f"species {self.name!r} is not serving: {self.reason or 'no model'}",  # never the detail
                species=self.name,
                status=self.status.value,
            )
        return serving


# (species, operation, items in the batch): called once per forward pass or index search.
BatchObserver = Callable[[str, str, int], None]


@dataclass
class Registry:
    device: torch.device
    use_gpu_index: bool
    slots: dict[str, SpeciesSlot] = field(default_factory=dict)
    embed_batching: BatchingConfig = field(default_factory=BatchingConfig)
    search_batching: BatchingConfig = field(default_factory=BatchingConfig)
    observe_batch: BatchObserver | None = None
    index_plan: IndexPlan = field(default_factory=IndexPlan)  # exact or approximate search, by gallery size
    # Per species, the batcher of the model (and index) it served last; a swap starts a new one.
    _embed_batchers: dict[str, EmbedBatcher] = field(default_factory=dict, repr=False)
    _search_batchers: dict[str, SearchBatcher] = field(default_factory=dict, repr=False)
    _batchers_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def embed(self, species: str, embedder: Embedder, images: Sequence[Image.Image]) -> np.ndarray:
        """``embedder.embed(images)``, in one forward pass with concurrent requests' images."""
        return self.embed_batcher(species, embedder).embed(images)

    def search(self, species: str, gallery: Gallery, query: np.ndarray, top_k: int) -> list[Candidate]:
        """``gallery.search_individuals(query, top_k)``, in one index search with concurrent ones."""
        return self.search_batcher(species, gallery).search_individuals(query, top_k)

    def embed_batcher(self, species: str, embedder: Embedder) -> EmbedBatcher:
        with self._batchers_lock:
            batcher = self._embed_batchers.get(species)
            if batcher is None or batcher.embedder is not embedder:
                config = self.embed_batching.for_model(embedder.batch_speedup)
                if self.embed_batching.enabled and not config.enabled:
                    log.info(
                        "species %s: %s runs a batch of %d at %.2fx the images per second of one (below "
                        "%g): its requests are not batched",
                        species,
                        embedder.model_version,
                        config.max_items,
                        embedder.batch_speedup,
                        config.min_speedup,
                    )
                batcher = EmbedBatcher(embedder, config, self._observer(species, "embed"))
                self._embed_batchers[species] = batcher
            return batcher

    @property
    def speedup_batch(self) -> int:
        """The batch size at which a model's :attr:`Embedder.batch_speedup` is measured when it is
        loaded: the forward batches' largest while batching depends on it, else 1 (not measured)."""
        config = self.embed_batching
        return config.max_items if config.enabled and config.min_speedup > 0 else 1

    def search_batcher(self, species: str, gallery: Gallery) -> SearchBatcher:
        with self._batchers_lock:
            batcher = self._search_batchers.get(species)
            if batcher is None or batcher.gallery is not gallery:
                batcher = SearchBatcher(gallery, self.search_batching, self._observer(species, "search"))
                self._search_batchers[species] = batcher
            return batcher

    def _observer(self, species: str, operation: str) -> Callable[[int], None] | None:
        observe = self.observe_batch
        if observe is None:
            return None
        return lambda size: observe(species, operation, size)

    def slot(self, species: str) -> SpeciesSlot:
        try:
            return self.slots[species]
        except KeyError:
            raise SpeciesNotFound(
                f"unknown species {species!r}", species=species, known=sorted(self.slots)
            ) from None

    def serving(self, species: str) -> Serving:
        return self.slot(species).require_serving()

    def index_sizes(self) -> dict[str, int]:
        return {
            name: len(slot.serving.gallery) for name, slot in self.slots.items() if slot.serving is not None
        }
