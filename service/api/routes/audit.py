"""``GET /audit``: the audit log, newest first, paged and filtered."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from service.api.deps import AdminPrincipal, SessionDep
from service.api.openapi import error_responses
from service.api.routes.individuals import PageDep
from service.db.repository import AuditFilter
from service.schemas import EXAMPLE_TS, EXAMPLE_UUID, AuditPage, PlainText, UtcTime
from service.services import audit

router = APIRouter(tags=["operations"])


@router.get(
    "/audit",
    response_model=AuditPage,
    summary="Read the audit log",
    description=(
        "Every admin action (enroll, update, delete, merge, reload) and every refused key check "
        "(`auth_refused`, with the client address; a key is named only by its fingerprint, and only when it "
        "exists), newest first. Filters combine. Needs the admin scope."
    ),
    responses=error_responses(401, 403, 422),
)
def read_audit_log(
    principal: AdminPrincipal,
    session: SessionDep,
    pagination: PageDep,
    action: Annotated[PlainText | None, Query(description="Only this action", examples=["merge"])] = None,
    species: Annotated[PlainText | None, Query(description="Only this species", examples=["dog"])] = None,
    individual_id: Annotated[
        uuid.UUID | None, Query(description="Only entries about this individual", examples=[EXAMPLE_UUID])
    ] = None,
    actor: Annotated[
        PlainText | None,
        Query(description="Only this key fingerprint (or `unauthenticated`)", examples=["3f1c2e4a9b7d"]),
    ] = None,
    since: Annotated[
        UtcTime | None, Query(description="Entries at or after this time", examples=[EXAMPLE_TS])
    ] = None,
    until: Annotated[
        UtcTime | None, Query(description="Entries before this time", examples=[EXAMPLE_TS])
    ] = None,
) -> AuditPage:
    filters = AuditFilter(
        action=action, species=species, individual_id=individual_id, actor=actor, since=since, until=until
    )
    return audit.entries(session, filters, pagination)
