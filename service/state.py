"""What the HTTP app shares across requests: settings and the clients the lifespan owns."""

from __future__ import annotations

from dataclasses import dataclass

from service.config import Settings
from service.inbox import Inbox
from service.queue import Waker
from service.store import Pool
from service.stream import Broadcaster


@dataclass
class AppState:
    settings: Settings
    pool: Pool
    waker: Waker
    broadcaster: Broadcaster
    inbox: Inbox
