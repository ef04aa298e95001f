"""The ``animalid`` command: ``serve``, ``migrate`` and ``demo`` here; the training package adds
``train``, ``evaluate``, ``export`` and ``gradcam``. Each sub-command sets ``func(args) -> int``.

Heavy modules (torch, uvicorn, the app) are imported inside the commands that need them, so
``animalid --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from service import __version__
from service.errors import ConfigurationError
from service.settings import Settings

log = logging.getLogger("animalid")


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    base = Settings()
    update = {key: value for key, value in overrides.items() if value is not None}
    for key in ("host", "port"):
        value = getattr(args, key, None)
        if value is not None:
            update[key] = value
    return base.model_copy(update=update) if update else base


def limit_threads(settings: Settings) -> None:
    """Make ANIMALID_CPU_THREADS hold in every thread, before torch and FAISS load.

    Requests run in worker threads. OpenMP gives each new thread the thread count of the
    environment, not the one a start-up call set in another thread, so without this the workers
    use every core and a small, shared CPU thrashes (seen: forward 35 ms instead of 26 ms).
    Explicit OMP_NUM_THREADS / MKL_NUM_THREADS settings win.
    """
    if settings.cpu_threads is not None:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, str(settings.cpu_threads))


def _serve(args: argparse.Namespace) -> int:
    from service import listening
    from service.app import create_app

    settings = _settings(args)
    sock = listening.bind(settings.host, settings.port)  # before anything slow: a taken port fails now
    listening.serve(create_app(settings), sock, args.log_level.lower())
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from service.db import migrate

    settings = _settings(args)
    migrate.upgrade(settings.database_url, args.revision)
    print(f"database migrated to {args.revision}: {_redacted(settings.database_url)}")
    return 0


def _redacted(url: str) -> str:
    from sqlalchemy import make_url

    return make_url(url).render_as_string(hide_password=True)


def _demo(args: argparse.Namespace) -> int:
    from service import demo, listening
    from service.app import create_app
    from service.db import migrate
    from service.runtime import Runtime
    from service.services.galleries import discover_artifacts

    paths = demo.DemoPaths(
        models=args.models_dir or demo.DemoPaths.models,
        gallery=args.gallery_dir or demo.DemoPaths.gallery,
        queries=args.queries_dir or demo.DemoPaths.queries,
    )
    if not discover_artifacts(paths.models):
        print(f"no demo model found in {paths.models} (expected {paths.models}/<species>/)", file=sys.stderr)
        return 2
    data = args.data_dir
    settings = _settings(
        args,
        database_url=f"sqlite:///{(data / 'animalid.db').resolve()}",
        image_store_dir=data / "images",
        models_dir=paths.models,
        auth_disabled=True,
    )
    sock = listening.bind(settings.host, settings.port)  # before migrating: a taken port fails now
    print("AnimalID demo: authentication is DISABLED (demo only; never expose this server).")
    print(f"database: {_redacted(settings.database_url)}; images: {settings.image_store_dir}")
    migrate.upgrade(settings.database_url)

    def ready(runtime: Runtime) -> None:
        summary = demo.enroll_gallery(runtime, paths.gallery, args.species)
        print(
            f"gallery: {summary.individuals} {summary.species} individuals, "
            f"{summary.images_added} photos enrolled now, {summary.images_present} already enrolled"
        )
        queries = demo.image_files(paths.queries)
        print("try it:")
        print(
            "  "
            + demo.curl_command(
                settings.host, settings.port, summary.species, queries[0] if queries else None
            )
        )
        print(f"API docs: http://{settings.host}:{settings.port}/docs", flush=True)

    app = create_app(settings, on_startup=ready)
    listening.serve(app, sock, args.log_level.lower())
    return 0


def _add_training_commands(subparsers: argparse._SubParsersAction) -> None:
    """``training.cli.add_commands`` when the training package provides it."""
    try:
        training_cli = importlib.import_module("training.cli")
    except ModuleNotFoundError as exc:
        if exc.name != "training.cli":
            raise
        log.debug("training.cli not found: no training commands")
        return
    training_cli.add_commands(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="animalid", description="Recognise individual animals from photos of their faces."
    )
    parser.add_argument("--version", action="version", version=f"animalid {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging verbosity"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="run the REST service", description="Serve the API with uvicorn (settings: ANIMALID_*)."
    )
    serve.add_argument("--host", help="listen address (default: ANIMALID_HOST)")
    serve.add_argument("--port", type=int, help="listen port (default: ANIMALID_PORT)")
    serve.set_defaults(func=_serve)

    migrate = sub.add_parser(
        "migrate",
        help="create or upgrade the database schema",
        description="Run the Alembic migrations against ANIMALID_DATABASE_URL.",
    )
    migrate.add_argument("--revision", default="head", help="target revision (default: head)")
    migrate.set_defaults(func=_migrate)

    demo = sub.add_parser(
        "demo",
        help="serve the bundled demo model and gallery (no API keys)",
        description="Migrate an embedded SQLite database, enroll the bundled sample gallery (once), print a "
        "curl command that identifies a bundled query photo, then serve without authentication.",
    )
    demo.add_argument("--host", help="listen address (default: ANIMALID_HOST)")
    demo.add_argument("--port", type=int, help="listen port (default: ANIMALID_PORT)")
    demo.add_argument("--species", help="species to enroll the gallery into (default: the only one)")
    demo.add_argument(
        "--data-dir", type=Path, default=Path("var/demo"), help="database and images (default: %(default)s)"
    )
    demo.add_argument("--models-dir", type=Path, help="instead of the bundled service/demo/models")
    demo.add_argument("--gallery-dir", type=Path, help="instead of the bundled service/demo/gallery")
    demo.add_argument("--queries-dir", type=Path, help="instead of the bundled service/demo/queries")
    demo.set_defaults(func=_demo)

    _add_training_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Libraries' start-up chatter (FAISS's loader reports a variant it did not need, alembic lists
    # its plugins) reads like trouble at INFO; keep their warnings, and all of it under DEBUG.
    if args.log_level != "DEBUG":
        for noisy in ("faiss.loader", "alembic.runtime.plugins"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command in ("serve", "demo"):
            limit_threads(_settings(args))
        return int(args.func(args))
    except ConfigurationError as exc:
        print(f"animalid: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
