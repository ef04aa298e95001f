"""Everything the lifespan builds once and the routes reach through dependencies."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from functools import partial

import faiss
import torch
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.db.health import DatabaseHealth
from service.db.migrate import require_head
from service.db.session import is_sqlite, make_engine, make_sessionmaker
from service.image_store import ImageStore
from service.metrics import Metrics
from service.ml.ann import IndexPlan
from service.ml.batching import BatchingConfig
from service.ml.embedder import resolve_device
from service.ml.images import ImagePolicy
from service.ml.index import gpu_count
from service.ml.registry import Registry
from service.security import FailureLimiter
from service.services import orphans
from service.services.identification import Limits
from service.services.reembedding import ReembedConfig, Reembedder
from service.services.replication import FollowConfig, IndexFollower, follow_model_switch
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
    follower: IndexFollower | None = None  # Postgres: other processes' index changes

    @property
    def limits(self) -> Limits:
        return limits_from(self.settings, self.images)

    def close(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        self.reembedder.stop()
        self.engine.dispose()


def limits_from(settings: Settings, images: ImagePolicy) -> Limits:
    """How requests are bounded and answers decided; a fine-tune judges its models by the same."""
    return Limits(
        images=images,
        default_threshold=settings.default_threshold,
        default_top_k=settings.default_top_k,
        max_top_k=settings.max_top_k,
        target_fpir=settings.target_fpir,
        target_fpir_by_species=dict(settings.target_fpir_by_species),
        review_fpir=settings.review_fpir,
        stranger_share=settings.stranger_share,
        stranger_share_by_species=dict(settings.stranger_share_by_species),
        min_match_confidence=settings.min_match_confidence,
        min_match_confidence_by_species=dict(settings.min_match_confidence_by_species),
    )


def image_policy(settings: Settings) -> ImagePolicy:
    return ImagePolicy(
        max_pixels=settings.max_image_pixels,
        max_request_pixels=settings.max_request_pixels,
        min_side=settings.min_image_side,
        min_std=settings.min_image_std,
        decodes=threading.BoundedSemaphore(settings.max_concurrent_decodes),
    )


# Forward-pass batch sizes when not set: on the CPU a batch of 8 already gives ResNet18 most of
# its gain per image, while larger ones made the fused EfficientNet model's requests wait seconds
# (docs/benchmarks.md, dynamic batching); a GPU gains up to far larger batches.
CPU_BATCH_MAX_IMAGES = 8
GPU_BATCH_MAX_IMAGES = 32


def batch_max_images(settings: Settings, device: torch.device) -> int:
    if settings.batch_max_images:
        return settings.batch_max_images
    return CPU_BATCH_MAX_IMAGES if device.type == "cpu" else GPU_BATCH_MAX_IMAGES


def batch_lanes(settings: Settings, device: torch.device) -> int:
    """Batches that run side by side: as set, else one on a GPU and, on the CPU, as many as there
    are shares of the cores of the size one forward pass uses (docs/benchmarks.md, dynamic batching)."""
    if settings.batch_lanes:
        return settings.batch_lanes
    if device.type != "cpu":
        return 1
    return max(1, (os.cpu_count() or 1) // torch.get_num_threads())


def build_runtime(settings: Settings, metrics: Metrics) -> Runtime:
    device = resolve_device(settings.device)
    if settings.cpu_threads is not None:
        # Process-wide, like the libraries' own defaults (one per CPU) that it replaces.
        torch.set_num_threads(settings.cpu_threads)
        faiss.omp_set_num_threads(settings.cpu_threads)
    # ANIMALID_DEVICE=cpu keeps the index on the CPU too; otherwise FAISS uses a GPU when it sees one.
    use_gpu_index = settings.device != "cpu" and gpu_count() > 0
    index_plan = IndexPlan(
        exact_max_vectors=settings.exact_search_max_vectors,
        kind=settings.approximate_index,
        refine=settings.pq_refine,
        nprobe=settings.ivf_nprobe,
    )
    lanes, when_idle = batch_lanes(settings, device), settings.batch_start == "when-idle"
    images = image_policy(settings)
    engine = make_engine(settings.database_url, settings.database_lock_wait_seconds)
    database = DatabaseHealth()
    database.watch(engine)
    try:
        require_head(engine, settings.database_url)
        sessions = make_sessionmaker(engine)
        registry = Registry(
            device=device,
            use_gpu_index=use_gpu_index,
            embed_batching=BatchingConfig(
                settings.batch_wait_ms / 1000.0,
                batch_max_images(settings, device),
                lanes,
                when_idle,
                settings.batch_min_speedup,
            ),
            search_batching=BatchingConfig(
                settings.search_batch_wait_ms / 1000.0, settings.search_batch_max_queries, lanes, when_idle
            ),
            observe_batch=metrics.observe_batch,
            index_plan=index_plan,
        )
        store = ImageStore(settings.image_store_dir)
        store.open()
        orphans.sweep(sessions, store, settings.orphan_grace_seconds, metrics)
        reembedder = Reembedder(
            engine,
            sessions,
            store,
            metrics,
            ReembedConfig(
                batch_size=settings.reembed_batch_size,
                images=images.for_stored_images(),
                use_gpu_index=use_gpu_index,
                index_plan=index_plan,
            ),
        )
        lifecycle = Lifecycle(
            sessions=sessions,
            registry=registry,
            reembedder=reembedder,
            models_dir=settings.models_dir,
            warmup=settings.warmup,
            trace_forward=settings.trace_forward,
            default_threshold=settings.default_threshold,
        )
        follower = None
        if is_sqlite(settings.database_url):
            log.info("SQLite: a single API process per database (several processes need Postgres)")
        else:
            follower = IndexFollower(
                sessions,
                registry,
                FollowConfig(settings.database_url, poll_s=settings.index_follow_poll_s),
                on_model_switch=partial(follow_model_switch, lifecycle),
            )
            follower.mark()  # before the indexes are built: changes meanwhile are applied after
        load_all(lifecycle)
        if follower is not None:
            follower.start()
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
        follower=follower,
        images=images,
        database=database,
        auth_failures=FailureLimiter(settings.auth_failure_limit, settings.auth_failure_window_seconds),
    )
