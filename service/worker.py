"""``animalid worker``: a process that claims jobs from the database and runs them.

The API only queues jobs; training never takes the API's threads. A worker:

- claims the oldest queued job, or a running one whose worker fell silent for
  ``ANIMALID_JOB_STALE_AFTER_S`` (it died): see :meth:`JobRepository.claim`;
- keeps the claim alive with a heartbeat thread every ``ANIMALID_JOB_HEARTBEAT_S``, which also
  notices a cancel request or a claim lost to another worker;
- stores progress (stage, epoch, loss, ETA) after every epoch; the job stops there when cancelled
  or when the worker is asked to stop (SIGTERM/SIGINT), and a stopped job goes back to the queue;
- resumes a taken-over job from its last epoch checkpoint (the job folder is in
  ``ANIMALID_JOBS_DIR``, shared by every worker);
- uses ``ANIMALID_WORKER_THREADS`` CPU threads;
- when idle, queues a herd check of every species that is due one (:func:`herd_check.due`: never
  checked with its serving card or at its target FPIR, or its gallery grown by
  ``ANIMALID_HERD_CHECK_GROWTH``), at most every :data:`HERD_SCAN_S` seconds.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from service.db.job_repository import JobRepository
from service.db.migrate import require_head
from service.db.models import Job, JobStatus
from service.db.repository import Repository
from service.db.session import is_sqlite, make_engine, make_sessionmaker
from service.errors import ServiceError
from service.image_store import ImageStore
from service.runtime import image_policy, limits_from
from service.schemas_jobs import FinetuneRequest
from service.services import herd_check
from service.services.finetune import FinetuneEnv, FinetunePolicy, run_finetune
from service.services.jobs import FINETUNE, HERD_CHECK, queue_herd_check
from service.settings import Settings

log = logging.getLogger(__name__)

HERD_SCAN_S = 60.0
"""How often an idle worker looks for species due a herd check."""


class JobStopped(Exception):
    """Raised in a job's thread at its next progress report."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status  # cancelled, or queued (handed back), or "" when the claim was lost
        self.reason = reason


@dataclass
class _Claim:
    job_id: uuid.UUID
    cancel: threading.Event
    lost: threading.Event


class Worker:
    def __init__(self, settings: Settings, name: str | None = None) -> None:
        self.settings = settings
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.engine = make_engine(settings.database_url, settings.database_lock_wait_seconds)
        require_head(self.engine, settings.database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.store = ImageStore(settings.image_store_dir)
        self.stop = threading.Event()
        self._postgres = not is_sqlite(settings.database_url)

    def close(self) -> None:
        self.engine.dispose()

    def run(self, once: bool = False) -> int:
        """Claim and run jobs until stopped (``once``: until the queue is empty). Returns jobs run."""
        import torch

        torch.set_num_threads(self.settings.worker_threads)
        log.info(
            "worker %s: %d threads, polling every %.1f s",
            self.name,
            self.settings.worker_threads,
            self.settings.worker_poll_s,
        )
        ran = 0
        scanned = -HERD_SCAN_S
        while not self.stop.is_set():
            job = self.claim()
            if job is None and time.monotonic() - scanned >= HERD_SCAN_S:
                scanned = time.monotonic()
                try:
                    if self.queue_due_herd_checks():
                        continue
                except Exception:  # the database briefly away, say: the next scan looks again
                    log.exception("worker %s: looking for herd checks due failed", self.name)
            if job is None:
                if once:
                    break
                self.stop.wait(self.settings.worker_poll_s)
                continue
            self.run_job(job)
            ran += 1
        return ran

    def queue_due_herd_checks(self) -> list[str]:
        """Queue a herd check of each species due one; returns their names. A species whose check
        is already queued or running is skipped (another worker queueing it at the same moment
        ends this scan with a conflict; the next scan goes on)."""
        s = self.settings
        limits = limits_from(s, image_policy(s))
        queued = []
        with self.sessions() as session:
            for species in Repository(session).all_species():
                name = species.name
                if not herd_check.due(
                    session,
                    s.models_dir,
                    name,
                    s.herd_check_growth,
                    s.herd_check_min_individuals,
                    limits.fpir_for(name),
                ):
                    continue
                if JobRepository(session).active_for(name, HERD_CHECK) is not None:
                    continue
                queue_herd_check(session, name, f"worker:{self.name}")
                queued.append(name)
        return queued

    def claim(self, only: uuid.UUID | None = None) -> Job | None:
        with self.sessions() as session:
            return JobRepository(session).claim(
                self.name, timedelta(seconds=self.settings.job_stale_after_s), self._postgres, only
            )

    def run_job(self, job: Job) -> None:
        claim = _Claim(job.id, threading.Event(), threading.Event())
        log.info(
            "worker %s: job %s (%s %s), attempt %d", self.name, job.id, job.kind, job.species, job.attempts
        )
        if job.attempts > self.settings.job_max_attempts:
            self._finish(job, JobStatus.FAILED, {}, f"gave up after {job.attempts - 1} attempts")
            return
        beat_stop = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat, args=(claim, beat_stop), name=f"heartbeat-{job.id}", daemon=True
        )
        beat.start()
        try:
            result = self._execute(job, lambda progress: self._report(claim, progress))
        except JobStopped as stop:
            if stop.status == JobStatus.QUEUED:
                self._release(job)
            elif stop.status:
                self._finish(job, stop.status, {}, stop.reason)
            log.info("worker %s: job %s stopped: %s", self.name, job.id, stop.reason)
        except ServiceError as exc:  # the job cannot work as asked: no retry
            self._finish(job, JobStatus.FAILED, {}, exc.message)
        except Exception as exc:
            log.exception("worker %s: job %s failed", self.name, job.id)
            self._finish(job, JobStatus.FAILED, {}, f"{type(exc).__name__}: {exc}"[:2000])
        else:
            self._finish(job, JobStatus.SUCCEEDED, result, None)
        finally:
            beat_stop.set()
            beat.join()

    def _execute(self, job: Job, report: Any) -> dict[str, Any]:
        s = self.settings
        if job.kind == HERD_CHECK:
            report({"stage": "check"})
            fpir = limits_from(s, image_policy(s)).fpir_for(job.species)
            with self.sessions() as session:
                return herd_check.check_and_keep(
                    session, s.models_dir, job.species, s.herd_check_max_queries, fpir, f"worker:{self.name}"
                )
        if job.kind != FINETUNE:
            raise ServiceError(f"unknown job kind {job.kind!r}")
        env = FinetuneEnv(self.sessions, self.store, s.models_dir, s.jobs_dir)
        policy = FinetunePolicy(
            epochs=s.finetune_epochs,
            lr=s.finetune_lr,
            holdout=s.finetune_holdout,
            strangers=s.finetune_strangers,
            min_top1_gain=s.promote_min_top1_gain,
            min_far_drop=s.promote_min_far_drop,
            threads=s.worker_threads,
            device=s.device,
            limits=limits_from(s, image_policy(s)),
        )
        return run_finetune(env, job.id, job.species, FinetuneRequest(**job.params), policy, report)

    def _report(self, claim: _Claim, progress: dict[str, Any]) -> None:
        if claim.lost.is_set():
            raise JobStopped("", "another worker took the job over")
        if claim.cancel.is_set():
            raise JobStopped(JobStatus.CANCELLED, "cancelled on request")
        if self.stop.is_set():
            raise JobStopped(JobStatus.QUEUED, "the worker is stopping; the job goes back to the queue")
        with self.sessions() as session:
            held, cancel = JobRepository(session).heartbeat(claim.job_id, self.name, progress)
        if not held:
            claim.lost.set()
        if cancel:
            claim.cancel.set()

    def _heartbeat(self, claim: _Claim, done: threading.Event) -> None:
        while not done.wait(self.settings.job_heartbeat_s):
            try:
                with self.sessions() as session:
                    held, cancel = JobRepository(session).heartbeat(claim.job_id, self.name)
            except Exception:  # the database may be briefly away; the next beat tries again
                log.exception("worker %s: heartbeat of job %s failed", self.name, claim.job_id)
                continue
            if not held:
                claim.lost.set()
            if cancel:
                claim.cancel.set()

    def _finish(self, job: Job, status: str, result: dict[str, Any], error: str | None) -> None:
        with self.sessions() as session:
            if not JobRepository(session).finish(job.id, self.name, status, result, error):
                session.rollback()
                return
            action = f"{job.kind}_{result.get('decision', status)}"
            details: dict[str, Any] = {"job_id": str(job.id), "status": status}
            if error:
                details["error"] = error[:500]
            if result.get("decision"):
                details["new_model_version"] = result["challenger"].get("model_version")
                details["champion_model_version"] = result["champion"]["model_version"]
            Repository(session).audit(action[:32], job.species, f"worker:{self.name}"[:64], None, details)
            session.commit()

    def _release(self, job: Job) -> None:
        with self.sessions() as session:
            JobRepository(session).release(job.id, self.name)
            session.commit()


def serve_worker(settings: Settings, once: bool = False) -> int:
    """Run a worker until SIGTERM/SIGINT (the running job goes back to the queue at its next epoch)."""
    worker = Worker(settings)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: worker.stop.set())
    try:
        return worker.run(once=once)
    finally:
        worker.close()
