"""What the worker's startup puts in arq's job context, typed for every job that reads it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Required, TypedDict

if TYPE_CHECKING:
    from arq.connections import ArqRedis

    from service.apply.applier import ApplyLimits
    from service.config import Settings
    from service.hatched.client import HatchedAPI
    from service.store import Pool
    from service.subscriptions.sender import Sender


class WorkerContext(TypedDict, total=False):
    """arq's `ctx`: `settings` from the start, arq's `redis`, the rest once `startup` ran (a
    test calling a job directly gives what that job reads)."""

    settings: Required[Settings]
    redis: ArqRedis
    pool: Pool
    limits: ApplyLimits
    hatched: HatchedAPI | None
    sender: Sender
    # Set when the worker begins a graceful stop: jobs end their batch loop early.
    stopping: bool
    job_try: int
