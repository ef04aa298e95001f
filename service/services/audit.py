"""The audit log: what admins did and which key checks were refused, and reading it back."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session, sessionmaker

from service.db.health import UNAVAILABLE
from service.db.repository import AuditFilter, Repository
from service.schemas import AuditEntryPublic, AuditPage
from service.services.individuals import Page

log = logging.getLogger(__name__)

REFUSED = "auth_refused"
UNAUTHENTICATED = "unauthenticated"


def record_refusal(
    sessions: sessionmaker[Session],
    actor: str | None,
    client: str,
    method: str,
    path: str,
    status: int,
    reason: str,
) -> None:
    """One audit entry for a refused key check (401 or 403). The key itself is never stored; a key
    that exists but lacks the scope is named by its fingerprint. A database that cannot take the
    entry does not change the answer: the refusal is logged instead."""
    details = {"client": client, "method": method, "path": path, "status": status, "reason": reason}
    try:
        with sessions() as session:
            Repository(session).audit(REFUSED, "", actor or UNAUTHENTICATED, None, details)
            session.commit()
    except UNAVAILABLE as exc:
        log.warning("refused key check not audited (%s): %s", type(exc).__name__, details)


def entries(session: Session, filters: AuditFilter, page: Page) -> AuditPage:
    rows, total = Repository(session).audit_page(filters, page.offset, page.limit)
    return AuditPage(
        data=[
            AuditEntryPublic(
                id=row.id,
                action=row.action,
                species=row.species or None,
                individual_id=row.individual_id,
                actor=row.actor,
                details=dict(row.details or {}),
                created_at=row.created_at,
            )
            for row in rows
        ],
        count=total,
        offset=page.offset,
        limit=page.limit,
    )
