"""A sandbox's egress decisions: what it asked to reach, what was allowed or refused and why."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from cellbox.api.deps import Manager, Owner
from cellbox.interpreter.models import EgressLogPage, EgressRecordInfo, EgressSummary

router = APIRouter(prefix="/v1/sandboxes", tags=["network"])


@router.get("/{sandbox_id}/egress", response_model=EgressLogPage)
async def egress_log(
    sandbox_id: str,
    owner: Owner,
    manager: Manager,
    after: Annotated[int, Query(ge=-1, description="Only records with a larger seq.")] = -1,
    limit: Annotated[int, Query(ge=1, le=10_000, description="At most this many records.")] = 1000,
) -> EgressLogPage:
    """The sandbox's decision log, oldest first (an in-memory ring: the newest
    ``egress_log_size`` records; the totals count everything). Empty for a sandbox without egress."""
    log = await manager.egress_log(owner, sandbox_id)
    if log is None:
        return EgressLogPage(summary=EgressSummary(sandbox_id=sandbox_id))
    return EgressLogPage(
        summary=EgressSummary.model_validate(log.summary()),
        records=[EgressRecordInfo.model_validate(r.to_dict()) for r in log.records(after, limit)],
    )
