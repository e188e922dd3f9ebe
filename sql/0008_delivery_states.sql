-- The stored delivery becomes immutable; where it stands (pending, applied, dead, ...) moves
-- to a narrow table of its own.
--
-- Marking a delivery applied used to UPDATE its `deliveries` row. `status` is in the inbox's
-- partial indexes, so that UPDATE was never HOT: it wrote a new version of the ~1 KB row and a
-- new entry in every index of the table, two of which (`delivery_id`, and `buddy_id, seq`) are
-- in random order. At 20,000,000 stored deliveries those indexes are gigabytes; each apply then
-- read their pages from disk and logged full-page images after every checkpoint, and applying
-- slowed as the inbox grew (bench/BENCHMARKS.md, Scale). Now applying updates a row of about
-- 60 bytes whose indexes are ordered by seq or time, whatever the inbox holds.
--
-- On an existing install this copies one row per stored delivery and holds an exclusive lock
-- on `deliveries` while it runs: receipts wait for it (answering 503 if they time out) and
-- Hatched retries them. README, Database.

CREATE TABLE delivery_states (
    seq             bigint      PRIMARY KEY,
    shard           integer     NOT NULL,
    event_id        text,
    status          text        NOT NULL DEFAULT 'accepted'
                    CHECK (status IN ('accepted', 'applied', 'duplicate', 'unmapped', 'dead')),
    reason          text,
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    applied_at      timestamptz
);

COMMENT ON TABLE delivery_states IS
    'Where each stored delivery stands: one row per row of deliveries (same seq), written with it.';
COMMENT ON COLUMN delivery_states.seq IS 'The delivery (deliveries.seq).';
COMMENT ON COLUMN delivery_states.shard IS 'Copy of deliveries.shard: the worker claims pending rows by shard.';
COMMENT ON COLUMN delivery_states.event_id IS 'Copy of deliveries.event_id, for v1 duplicate detection.';
COMMENT ON COLUMN delivery_states.status IS
    'accepted (waiting to apply), applied, duplicate (same event seen before), unmapped (unknown type), dead (see reason).';
COMMENT ON COLUMN delivery_states.reason IS 'Why a delivery is dead, unmapped or duplicate, or the last apply error.';
COMMENT ON COLUMN delivery_states.attempts IS 'How many times the worker tried to apply it.';
COMMENT ON COLUMN delivery_states.next_attempt_at IS 'After a failed attempt: not retried before this time.';
COMMENT ON COLUMN delivery_states.applied_at IS 'When it reached its final status.';

INSERT INTO delivery_states (seq, shard, event_id, status, reason, attempts, next_attempt_at,
                             applied_at)
SELECT seq, shard, event_id, status, reason, attempts, next_attempt_at, applied_at
FROM deliveries;

-- The same indexes as before, on the narrow table (see 0001, 0003 and 0006 for why each).
DROP INDEX IF EXISTS deliveries_pending_idx;
DROP INDEX IF EXISTS deliveries_status_idx;
DROP INDEX IF EXISTS deliveries_prune_idx;
DROP INDEX IF EXISTS deliveries_applied_event_idx;
CREATE INDEX delivery_states_pending_idx ON delivery_states (shard, seq) WHERE status = 'accepted';
CREATE INDEX delivery_states_status_idx ON delivery_states (status, seq) WHERE status <> 'applied';
CREATE INDEX delivery_states_prune_idx ON delivery_states (applied_at) WHERE status = 'applied';
CREATE UNIQUE INDEX delivery_states_applied_event_idx
    ON delivery_states ((CASE WHEN status = 'applied' THEN event_id END))
    WHERE event_id IS NOT NULL;

ALTER TABLE deliveries
    DROP COLUMN status,
    DROP COLUMN reason,
    DROP COLUMN attempts,
    DROP COLUMN next_attempt_at,
    DROP COLUMN applied_at;

COMMENT ON TABLE deliveries IS
    'Inbox: every verified Hatched delivery, stored raw before it was acknowledged; never updated. Its outcome is in delivery_states.';

-- For operators' queries: each stored delivery with where it stands, as one row.
CREATE VIEW inbox AS
SELECT d.*, s.status, s.reason, s.attempts, s.next_attempt_at, s.applied_at
FROM deliveries AS d JOIN delivery_states AS s ON s.seq = d.seq;

COMMENT ON VIEW inbox IS 'Every stored delivery with its state (deliveries joined to delivery_states).';
