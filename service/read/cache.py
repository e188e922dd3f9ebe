"""An in-process cache of rendered buddies, kept honest by the same NOTIFY the streams use.

`GET /v1/buddies/{id}` is the hottest route; serving it from memory makes it nearly as cheap
as a static JSON endpoint. Every apply transaction notifies `buddy_id:version` at commit and the
process's one listener drops that buddy from here; while the listener is not connected the cache
is not used at all, so it can never serve a version older than one it missed hearing about.
A read that raced with a change does not store its (possibly older) result: each entry is
written only if no invalidation for that buddy happened since the read began.

Each entry also remembers whose buddy it is (user id, audience), so a user token's read can be
answered from here too without serving one user's buddy to another (service/auth/scope.py).
"""

from __future__ import annotations

from collections import OrderedDict

# (user_id, audience) of a cached buddy; (None, None) matches no user token.
Owner = tuple[str | None, str | None]
NO_OWNER: Owner = (None, None)


class BuddyCache:
    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._entries: OrderedDict[str, tuple[str, bytes, Owner]] = OrderedDict()
        self._epoch = 0  # bumped by clear(): every read in flight is then too old to store
        self._changes: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self._max > 0

    def get(self, buddy_id: str) -> tuple[str, bytes] | None:
        entry = self.lookup(buddy_id)
        return (entry[0], entry[1]) if entry is not None else None

    def lookup(self, buddy_id: str) -> tuple[str, bytes, Owner] | None:
        """The ETag, body and owner of a cached buddy."""
        entry = self._entries.get(buddy_id)
        if entry is not None:
            self._entries.move_to_end(buddy_id)
        return entry

    def token(self, buddy_id: str) -> tuple[int, int]:
        """Taken before reading the database; `put` refuses if anything changed since."""
        return self._epoch, self._changes.get(buddy_id, 0)

    def put(
        self,
        buddy_id: str,
        token: tuple[int, int],
        etag: str,
        body: bytes,
        owner: Owner = NO_OWNER,
    ) -> None:
        if not self.enabled or token != self.token(buddy_id):
            return
        self._entries[buddy_id] = (etag, body, owner)
        self._entries.move_to_end(buddy_id)
        while len(self._entries) > self._max:
            evicted, _ = self._entries.popitem(last=False)
            self._changes.pop(evicted, None)

    def invalidate(self, buddy_id: str) -> None:
        self._entries.pop(buddy_id, None)
        if buddy_id in self._changes or len(self._changes) < 4 * self._max + 1024:
            self._changes[buddy_id] = self._changes.get(buddy_id, 0) + 1
        else:
            # Too many buddies to count one by one: fall back to invalidating everything.
            self.clear()

    def clear(self) -> None:
        self._entries.clear()
        self._changes.clear()
        self._epoch += 1
