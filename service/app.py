"""``create_app(settings)``: the FastAPI application. Models and indexes load in its lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from service import __version__
from service.api.openapi import complete
from service.api.routes import (
    audit,
    enroll,
    explain,
    health,
    identify,
    individuals,
    jobs,
    review,
    species,
    verify,
)
from service.api.upload_limit import UploadLimitMiddleware
from service.errors import ConfigurationError, install_error_handlers
from service.metrics import Metrics, MetricsMiddleware
from service.runtime import Runtime, build_runtime
from service.security import KeyringError
from service.services.model_watch import ModelWatcher
from service.settings import Settings

log = logging.getLogger(__name__)

DESCRIPTION = """
Recognise individual animals from photos of their faces.

* **Enroll** photos of an individual (multipart files or base64 JSON); no retraining needed.
* **Identify** a photo: individuals ranked by similarity, each once, and a `match` / `unknown` decision
  from the model card's calibrated threshold.
* **Verify** a photo against an individual (all its photos) or another photo.
* **Explain** a match with a Grad-CAM heatmap.

Authentication: an API key in the `x-api-key` header. The read scope covers identify, verify, explain
and listing; the admin scope also covers enroll, update, delete and merge. Every error is a JSON body
`{"code", "message", "details"}` with a stable `code`.
"""

TAGS = [
    {"name": "enroll", "description": "Add photos of individuals"},
    {"name": "identify", "description": "1:N search with an open-set decision"},
    {"name": "verify", "description": "1:1 comparison"},
    {"name": "explain", "description": "Grad-CAM heatmaps"},
    {"name": "individuals", "description": "Individuals and their images"},
    {"name": "species", "description": "Loaded models, thresholds and evaluation metrics"},
    {"name": "jobs", "description": "Fine-tune jobs run by worker processes"},
    {"name": "operations", "description": "Health, readiness and metrics"},
]

DOCS_ASSETS_URL = "/docs-assets"

StartupHook = Callable[[Runtime], None]


def _check(settings: Settings) -> None:
    try:
        keys = len(settings.keyring)
    except KeyringError as exc:
        raise ConfigurationError(f"ANIMALID_API_KEYS: {exc}") from exc
    if not settings.auth_disabled and keys == 0:
        raise ConfigurationError(
            "no API keys configured: set ANIMALID_API_KEYS (e.g. 'KEY1:read,KEY2:admin'), or turn "
            "authentication "
            "off explicitly with ANIMALID_AUTH_DISABLED=true"
        )
    if settings.auth_disabled:
        log.warning(
            "authentication is DISABLED (ANIMALID_AUTH_DISABLED=true): every caller has the admin scope"
        )


def create_app(settings: Settings | None = None, on_startup: StartupHook | None = None) -> FastAPI:
    """Build the app. Nothing is loaded until the lifespan starts (``TestClient`` as a context manager,
    or a server). ``on_startup`` runs in a worker thread once models and indexes are ready."""
    settings = settings if settings is not None else Settings()
    _check(settings)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await anyio.to_thread.run_sync(partial(build_runtime, settings, metrics))
        app.state.runtime = runtime
        watcher = ModelWatcher(runtime.lifecycle, settings.model_watch_s)
        try:
            if on_startup is not None:
                await anyio.to_thread.run_sync(on_startup, runtime)
            watcher.start()
            yield
        finally:
            await anyio.to_thread.run_sync(watcher.stop)
            await anyio.to_thread.run_sync(runtime.close)
            # A stopped app lets go of its models, indexes and pools: FastAPI keeps every app it built
            # alive for good (its callable caches hold the docs routes, closures over the app).
            del app.state.runtime

    # /docs (Swagger UI) and /redoc load their scripts and styles from this server (the files ship in
    # the fastapi-offline package), never from a CDN: self-hosted machines often have no internet.
    app = FastAPIOffline(
        static_url=DOCS_ASSETS_URL,
        title="AnimalID",
        version=__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics

    def index_sizes() -> dict[str, int]:
        runtime: Runtime | None = getattr(app.state, "runtime", None)
        return runtime.registry.index_sizes() if runtime is not None else {}

    metrics.watch_index_sizes(index_sizes)
    install_error_handlers(app)
    for router in (
        enroll.router,
        identify.router,
        verify.router,
        explain.router,
        individuals.router,
        species.router,
        jobs.router,
        health.router,
        review.router,
        audit.router,
    ):
        app.include_router(router)
    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete(build_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    # Added last, so it is the outermost of ours: oversized bodies never reach the routes.
    app.add_middleware(UploadLimitMiddleware, max_bytes=settings.max_upload_bytes)
    return app
