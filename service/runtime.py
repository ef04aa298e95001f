"""Everything the lifespan builds once and the routes reach through dependencies."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import faiss
import torch
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.db.health import DatabaseHealth
from service.db.migrate import MIGRATIONS_DIR, alembic_config
from service.db.session import make_engine, make_sessionmaker
from service.errors import ConfigurationError
from service.image_store import ImageStore
from service.metrics import Metrics
from service.ml.embedder import resolve_device
from service.ml.images import ImagePolicy
from service.ml.index import gpu_count
from service.ml.registry import Registry
from service.security import FailureLimiter
from service.services import orphans
from service.services.identification import Limits
from service.services.reembedding import ReembedConfig, Reembedder
from service.services.species import Lifecycle, load_all
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    registry: Registry
    store: ImageStore
    metrics: Metrics
    reembedder: Reembedder
    lifecycle: Lifecycle
    images: ImagePolicy
    database: DatabaseHealth
    auth_failures: FailureLimiter

    @property
    def limits(self) -> Limits:
        return Limits(
            images=self.images,
            default_threshold=self.settings.default_threshold,
            default_top_k=self.settings.default_top_k,
            max_top_k=self.settings.max_top_k,
        )

    def close(self) -> None:
        self.reembedder.stop()
        self.engine.dispose()


def check_schema(engine: Engine, database_url: str) -> None:
    """Refuse to start on a database the migrations have not brought to head."""
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    head = None
    if MIGRATIONS_DIR.is_dir():
        head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
    if current is None or (head is not None and current != head):
        raise ConfigurationError(
            f"the database schema is at revision {current or 'none'}, "
            f"this code needs {head or 'a migrated schema'}: "
            "run `animalid migrate` first"
        )


def image_policy(settings: Settings) -> ImagePolicy:
    return ImagePolicy(
        max_pixels=settings.max_image_pixels,
        max_request_pixels=settings.max_request_pixels,
        min_side=settings.min_image_side,
        min_std=settings.min_image_std,
        decodes=threading.BoundedSemaphore(settings.max_concurrent_decodes),
    )


def build_runtime(settings: Settings, metrics: Metrics) -> Runtime:
    device = resolve_device(settings.device)
    if settings.cpu_threads is not None:
        # Process-wide, like the libraries' own defaults (one per CPU) that it replaces.
        torch.set_num_threads(settings.cpu_threads)
        faiss.omp_set_num_threads(settings.cpu_threads)
    # ANIMALID_DEVICE=cpu keeps the index on the CPU too; otherwise FAISS uses a GPU when it sees one.
    use_gpu_index = settings.device != "cpu" and gpu_count() > 0
    images = image_policy(settings)
    engine = make_engine(settings.database_url)
    database = DatabaseHealth()
    database.watch(engine)
    try:
        check_schema(engine, settings.database_url)
        sessions = make_sessionmaker(engine)
        registry = Registry(device=device, use_gpu_index=use_gpu_index)
        store = ImageStore(settings.image_store_dir)
        store.open()
        orphans.sweep(sessions, store, settings.orphan_grace_seconds, metrics)
        reembedder = Reembedder(
            sessions,
            store,
            metrics,
            ReembedConfig(
                batch_size=settings.reembed_batch_size,
                images=images.for_stored_images(),
                use_gpu_index=use_gpu_index,
            ),
        )
        lifecycle = Lifecycle(
            sessions=sessions,
            registry=registry,
            reembedder=reembedder,
            models_dir=settings.models_dir,
            warmup=settings.warmup,
            default_threshold=settings.default_threshold,
        )
        load_all(lifecycle)
    except BaseException:
        engine.dispose()
        raise
    log.info(
        "AnimalID ready on %s (FAISS on %s): %s",
        device,
        "GPU" if use_gpu_index else "CPU",
        ", ".join(f"{name}={slot.status.value}" for name, slot in sorted(registry.slots.items()))
        or "no species",
    )
    return Runtime(
        settings=settings,
        engine=engine,
        sessions=sessions,
        registry=registry,
        store=store,
        metrics=metrics,
        reembedder=reembedder,
        lifecycle=lifecycle,
        images=images,
        database=database,
        auth_failures=FailureLimiter(settings.auth_failure_limit, settings.auth_failure_window_seconds),
    )
