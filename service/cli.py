"""The ``animalid`` command: ``serve``, ``migrate`` and ``demo`` here, ``enroll`` and ``identify``
as clients of a running service; the training package adds ``train``, ``evaluate``, ``export`` and
``gradcam``. Each sub-command sets ``func(args) -> int``.

Heavy modules (torch, uvicorn, the app) are imported inside the commands that need them, so
``animalid --help`` answers at once. A user's mistake (a missing folder, a bad option value, an
unreachable database or server) ends the command with one line on stderr and exit status 2;
``--log-level DEBUG`` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from service import __version__
from service.errors import ConfigurationError, ServiceError
from service.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from service.client import AnimalIDClient
    from service.schemas import CandidatePublic, IdentifyResult

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


def prepare_database(database_url: str) -> None:
    """Before serving: the embedded SQLite database migrates itself; any other must already be at
    the code's revision (``animalid migrate`` is a deliberate step on a shared server)."""
    from service.db import migrate
    from service.db.session import is_sqlite, make_engine

    if is_sqlite(database_url):
        migrate.upgrade(database_url)
        return
    engine = make_engine(database_url)
    try:
        migrate.require_head(engine, database_url)
    finally:
        engine.dispose()


def _serve(args: argparse.Namespace) -> int:
    from service import listening
    from service.app import create_app

    settings = _settings(args)
    sock = listening.bind(settings.host, settings.port)  # before anything slow: a taken port fails now
    prepare_database(settings.database_url)
    with _embedded_worker(settings):
        listening.serve(create_app(settings), sock, args.log_level.lower())
    return 0


@contextmanager
def _embedded_worker(settings: Settings) -> Iterator[None]:
    """With ANIMALID_EMBEDDED_WORKER, a worker in a child process for as long as the server runs.

    For the embedded SQLite setup, where running a second service is a chore; a child process, so
    training never takes the API's threads. Stopped with SIGTERM: its job goes back to the queue.
    """
    if not settings.embedded_worker:
        yield
        return
    import multiprocessing

    from service.worker import serve_worker

    child = multiprocessing.get_context("spawn").Process(
        target=serve_worker, args=(settings,), name="animalid-worker", daemon=False
    )
    child.start()
    log.info("worker started in child process %d", child.pid)
    try:
        yield
    finally:
        child.terminate()
        child.join(120)
        if child.is_alive():
            child.kill()


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
    models = paths.models
    if Settings().embedded_worker:
        # A promoted fine-tune replaces the served artifact: never the bundled one.
        models = data / "models"
        if not models.is_dir():
            import shutil

            shutil.copytree(paths.models, models)
    settings = _settings(
        args,
        database_url=f"sqlite:///{(data / 'animalid.db').resolve()}",
        image_store_dir=data / "images",
        models_dir=models,
        jobs_dir=data / "jobs",
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
        print("  " + demo.curl_command(settings.api_url, summary.species, queries[0] if queries else None))
        print(f"API docs: {settings.api_url}/docs", flush=True)

    app = create_app(settings, on_startup=ready)
    with _embedded_worker(settings):
        listening.serve(app, sock, args.log_level.lower())
    return 0


@contextmanager
def _database_session(settings: Settings) -> Iterator[Session]:
    """A session on the migrated database ``settings`` name, for a command run beside the API."""
    from service.db.migrate import require_head
    from service.db.session import make_engine, make_sessionmaker

    engine = make_engine(settings.database_url, settings.database_lock_wait_seconds)
    try:
        require_head(engine, settings.database_url)
        with make_sessionmaker(engine)() as session:
            yield session
    finally:
        engine.dispose()


def _gallery_export(args: argparse.Namespace) -> int:
    from service.image_store import ImageStore
    from service.services.gallery_export import export_gallery

    settings = _settings(args)
    with _database_session(settings) as session:
        result = export_gallery(session, ImageStore(settings.image_store_dir), args.species, args.out)
    print(
        json.dumps(
            {
                "manifest": str(result.manifest),
                "individuals": result.individuals,
                "images": result.images,
                "groups": result.groups,
                "unreadable": list(result.unreadable),
            }
        )
    )
    return 0


def _gallery_check(args: argparse.Namespace) -> int:
    from service.runtime import image_policy, limits_from
    from service.services.herd_check import check_and_keep, check_herd, describe

    settings = _settings(args)
    with _database_session(settings) as session:
        if args.apply:
            fpir = limits_from(settings, image_policy(settings)).fpir_for(args.species)
            figures = check_and_keep(
                session, settings.models_dir, args.species, args.max_queries, fpir, "cli"
            )
        else:
            figures = describe(check_herd(session, settings.models_dir, args.species, args.max_queries))
    print(json.dumps(figures))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from service.schemas_jobs import FinetuneRequest
    from service.security import Principal, Scope
    from service.services import jobs
    from service.worker import Worker

    settings = _settings(args)
    request = FinetuneRequest(
        epochs=args.epochs, lr=args.lr, holdout=args.holdout, strangers=args.strangers, start=args.start
    )
    worker = Worker(settings)
    try:
        with worker.sessions() as session:
            job = jobs.queue_finetune(
                session, args.species, request, Principal(Scope.ADMIN, "cli"), settings.models_dir
            )
        print(json.dumps({"job_id": str(job.id), "status": job.status}), flush=True)
        if args.queue:
            return 0
        claimed = worker.claim(only=job.id)
        if claimed is None:
            print(f"animalid: job {job.id} was taken by a worker; follow it with GET /jobs/{job.id}")
            return 0
        worker.run_job(claimed)
        with worker.sessions() as session:
            done = jobs.get_job(session, job.id)
    finally:
        worker.close()
    print(done.model_dump_json(include={"id", "status", "error", "result"}))
    return 0 if done.status == "succeeded" else 1


def _worker(args: argparse.Namespace) -> int:
    from service.worker import serve_worker

    overrides = {"worker_threads": args.threads} if args.threads else {}
    serve_worker(_settings(args, **overrides), once=args.once)
    return 0


def _client(args: argparse.Namespace) -> AnimalIDClient:
    from service.client import AnimalIDClient

    settings = _settings(args)
    key = args.api_key if args.api_key is not None else settings.client_api_key.get_secret_value()
    return AnimalIDClient(args.url or settings.api_url, api_key=key or None)


def _enroll(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from service import folder_enroll

    plan = folder_enroll.photos_by_individual(args.source, args.species)
    total = folder_enroll.count_photos(plan)
    with (
        _client(args) as client,
        tqdm(total=total, unit="photo", desc="enroll", disable=args.quiet, file=sys.stderr) as bar,
    ):
        summary = folder_enroll.enroll_folder(client, plan, args.species, args.batch_size, bar.update)
    print("\n".join(summary.lines()))
    return 1 if summary.refused else 0


def _identify(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for photo in args.photos:
            result = client.identify(args.species, photo, top_k=args.top_k)
            if args.json:
                print(json.dumps({"photo": str(photo)} | result.model_dump(mode="json")))
                continue
            print(identify_line(photo, result))
    return 0


def identify_line(photo: Path, result: IdentifyResult) -> str:
    """One photo's answer as ``animalid identify`` prints it: the service's decision first (match,
    uncertain or unknown), with the individual it is about when there is one, then the candidates."""

    def name(c: CandidatePublic) -> str:
        return f"{c.external_id or c.individual_id}"

    candidates = ", ".join(f"{name(c)} {c.similarity:.3f}" for c in result.candidates)
    shown = result.best if result.decision == "match" else None
    if result.decision == "uncertain" and result.candidates:
        shown = result.candidates[0]  # between the review threshold and the match one: a person looks
    answer: str = result.decision
    if shown is not None:
        detail = f"{shown.similarity:.3f}"
        if result.confidence is not None:
            detail += f", confidence {result.confidence:.2f}"
            floor = result.min_confidence
            if floor is not None and shown.similarity >= result.threshold and result.confidence < floor:
                detail += f", below the {floor:g} a match needs"
        answer += f" {name(shown)} ({detail})"
    return f"{photo}: {answer} at threshold {result.threshold:.3f}; candidates: {candidates or 'none'}"


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", help="the API's address (default: ANIMALID_CLIENT_URL, else ANIMALID_HOST:PORT)"
    )
    parser.add_argument("--api-key", help="API key (default: ANIMALID_CLIENT_API_KEY)")


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

    enroll = sub.add_parser(
        "enroll",
        help="enroll a folder per animal (or a manifest) through the API",
        description="Enroll SOURCE through a running service: a folder holding one sub-folder of photos per "
        "animal (its name is the animal's external id), or a CSV manifest path,individual[,species]. "
        "Photos an animal already has are not sent again, so a second run (or the rest of an interrupted "
        "one) enrolls nothing twice. Photos the service refuses are listed with the reason at the end; "
        "the exit status is then 1.",
    )
    enroll.add_argument("source", type=Path, help="folder of per-animal folders, or a manifest CSV")
    enroll.add_argument(
        "--species", required=True, help="species to enroll into (a manifest's other rows are left out)"
    )
    enroll.add_argument(
        "--batch-size", type=_positive, default=16, help="photos per request (default: %(default)s)"
    )
    enroll.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_client_options(enroll)
    # ValueError: training.data's DatasetError (no such folder or manifest, a bad manifest row).
    enroll.set_defaults(func=_enroll, user_errors=(ValueError, OSError))

    identify = sub.add_parser(
        "identify",
        help="identify photos through the API",
        description="Ask a running service who each PHOTO shows; one line per photo (or JSON with --json).",
    )
    identify.add_argument("photos", nargs="+", type=Path, metavar="PHOTO", help="photo to identify")
    identify.add_argument("--species", required=True, help="species of the animals")
    identify.add_argument("--top-k", type=_positive, help="candidates to list (default: the service's)")
    identify.add_argument(
        "--json", action="store_true", help="print the API's answer, one JSON line per photo"
    )
    _add_client_options(identify)
    identify.set_defaults(func=_identify, user_errors=(OSError,))

    gallery = sub.add_parser("gallery", help="the enrolled photos of a species as a dataset")
    gallery_sub = gallery.add_subparsers(dest="gallery_command", required=True, metavar="ACTION")
    export = gallery_sub.add_parser(
        "export",
        help="write the enrolled images, one folder per individual, and a manifest",
        description="OUT/<individual>/<image>.<ext> plus OUT/manifest.csv (path,individual,species,"
        "group,external_id,image_id; group = enrolment batch), readable by `animalid train --dataset`.",
    )
    export.add_argument("--species", required=True, help="species to export")
    export.add_argument("--out", type=Path, required=True, help="an empty or new folder")
    export.set_defaults(func=_gallery_export, user_errors=(ServiceError,))
    check = gallery_sub.add_parser(
        "check",
        help="would the model card's open-set thresholds hold for the enrolled animals as strangers?",
        description="Leaves each enrolled animal out in turn and asks its stored vectors against the rest, "
        "as a never-enrolled herd-mate would be asked: per target FPIR, the card's threshold for this "
        "gallery, the share of those photos at or past it (95%% interval over the animals) and the "
        "threshold that would hold the target. With --apply, the check is kept in the served card and "
        "the service raises its thresholds by how far they fall short for this herd (the worker does so "
        "by itself as the gallery grows: ANIMALID_HERD_CHECK_GROWTH).",
    )
    check.add_argument("--species", required=True, help="species to check")
    check.add_argument(
        "--apply",
        action="store_true",
        help="keep the check in the models folder's card (also at the species' target FPIR); audited",
    )
    check.add_argument(
        "--max-queries", type=_positive, default=5000, help="photos asked at most (drawn at random)"
    )
    check.set_defaults(func=_gallery_check, user_errors=(ServiceError,))

    finetune = sub.add_parser(
        "finetune",
        help="fine-tune a species' model on its enrolled photos; promote it only if it wins",
        description="Queues a fine-tune job and runs it here (or with --queue leaves it to "
        "`animalid worker`). The serving model (champion) and the new one (challenger) are judged on "
        "the same held-back enrolment batches; the challenger replaces the served artifact only when "
        "it wins by the configured margins "
        "(ANIMALID_PROMOTE_MIN_TOP1_GAIN, ANIMALID_PROMOTE_MIN_FAR_DROP).",
    )
    finetune.add_argument("--species", required=True, help="species to fine-tune")
    finetune.add_argument("--epochs", type=int, help="default: ANIMALID_FINETUNE_EPOCHS")
    finetune.add_argument("--lr", type=float, help="default: ANIMALID_FINETUNE_LR")
    finetune.add_argument("--holdout", type=float, help="share of enrolment batches held back to judge")
    finetune.add_argument(
        "--strangers",
        type=float,
        help="share of the animals kept out of training to calibrate the new model "
        "(default: ANIMALID_FINETUNE_STRANGERS)",
    )
    finetune.add_argument("--start", help="artifact folder in the models folder to start from")
    finetune.add_argument("--queue", action="store_true", help="only queue the job for a worker")
    finetune.set_defaults(func=_finetune)

    worker = sub.add_parser(
        "worker",
        help="run queued jobs (fine-tunes) from the database",
        description="Claims jobs from the database and runs them, one at a time, with "
        "ANIMALID_WORKER_THREADS CPU threads. SIGTERM hands the running job back to the queue at its "
        "next epoch; a worker that dies has its job resumed from the last checkpoint by another one "
        "after ANIMALID_JOB_STALE_AFTER_S.",
    )
    worker.add_argument("--threads", type=int, help="default: ANIMALID_WORKER_THREADS")
    worker.add_argument("--once", action="store_true", help="exit when the queue is empty")
    worker.set_defaults(func=_worker)

    _add_training_commands(sub)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Libraries' chatter (FAISS's loader reports a variant it did not need, alembic lists its
    # plugins, httpx logs every request of `enroll` and `identify` across their progress bar and
    # answers) reads like trouble at INFO; keep their warnings, and all of it under DEBUG.
    if args.log_level != "DEBUG":
        for noisy in ("faiss.loader", "alembic.runtime.plugins", "httpx"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command in ("serve", "demo"):
            limit_threads(_settings(args))
        return int(args.func(args))
    except user_errors(args) as exc:
        log.debug("%s failed", args.command, exc_info=True)
        print(f"animalid {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2


def user_errors(args: argparse.Namespace) -> tuple[type[BaseException], ...]:
    """What ends a command with one line instead of a traceback: configuration, database and server
    connection errors everywhere, plus what the command declares (``set_defaults(user_errors=...)``)."""
    from pydantic import ValidationError
    from sqlalchemy.exc import OperationalError

    from service.client import ClientError

    return (
        ConfigurationError,
        ValidationError,
        OperationalError,
        ClientError,
        *getattr(args, "user_errors", ()),
    )


def one_line(exc: BaseException) -> str:
    from pydantic import ValidationError
    from sqlalchemy.exc import OperationalError

    if isinstance(exc, OperationalError):
        return f"cannot use the database: {one_line(exc.orig) if exc.orig is not None else exc}"
    if isinstance(exc, ValidationError):  # the settings: say which variable and why
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return f"invalid settings: {'; '.join(problems)}"
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


if __name__ == "__main__":
    raise SystemExit(main())
