-- A change's time is the statement that wrote it, not its transaction's start.
--
-- committed_at (and a changed buddy's updated_at) were now(): the start of the apply
-- transaction, before the worker claimed its batch, locked the buddies and projected them.
-- They are now one clock_timestamp() read by the statement that writes them, the last before
-- the commit (service/store/buddies.py, WRITE_BATCH): closer to when the change became
-- visible, which is what a subscriber measures its lag from. Only comments change here.

COMMENT ON COLUMN changes.committed_at IS
    'When the statement that wrote it ran, just before its transaction committed; the buddy''s updated_at for that change.';
COMMENT ON COLUMN buddies.updated_at IS
    'When the mirrored state last changed (the statement that wrote it, just before its commit).';
