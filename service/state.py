"""What the HTTP app shares across requests: settings and the clients the lifespan owns."""

from __future__ import annotations

from dataclasses import dataclass

from service.config import Settings
from service.ingest.inbox import Inbox
from service.ingest.wakeups import Waker
from service.read.stream import Broadcaster
from service.store import Pool


@dataclass
class AppState:
    settings: Settings
    pool: Pool
    waker: Waker
    broadcaster: Broadcaster
    inbox: Inbox
