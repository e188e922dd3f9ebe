-- The change feed: one row per visible change of a buddy (its version grew), written by the
-- same statement that writes the buddy (service/store/buddies.py, WRITE_BATCH).
--
-- Order. Entries are ordered by (txid, id): the writing transaction's id, then a sequence. A
-- sequence alone is in allocation order: a transaction that took id 7 and commits after the
-- one that took id 8 would show 7 to a reader already past 8, who then never sees it. Readers
-- therefore see only entries of transactions below the xmin of their snapshot (every
-- transaction with a smaller id has ended), and any entry that becomes visible later belongs
-- to a transaction at or above that xmin, so it sorts after everything already read. The
-- cost: a write transaction left open anywhere in the database (a long `replay --status all`,
-- a migration) holds the feed back until it ends; nothing is lost or reordered.

CREATE TABLE changes (
    txid         bigint      NOT NULL DEFAULT pg_current_xact_id()::text::bigint,
    id           bigint      GENERATED ALWAYS AS IDENTITY,
    buddy_id     text        NOT NULL,
    user_id      text,
    audience     text,
    version      bigint      NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now(),
    cause_kind   text        NOT NULL CHECK (cause_kind IN ('delivery', 'refresh', 'rebuild', 'replay')),
    delivery_id  text,
    event_type   text,
    changed      jsonb       NOT NULL,
    PRIMARY KEY (txid, id)
);

COMMENT ON TABLE changes IS
    'Change feed: one entry per visible change of a buddy (version grew), in commit order (txid, id); pruned after MIRROR_CHANGES_RETENTION_DAYS.';
COMMENT ON COLUMN changes.txid IS
    'Top-level id of the transaction that wrote it; readers see it once every older transaction has ended.';
COMMENT ON COLUMN changes.id IS 'Order within the feed among entries of one transaction.';
COMMENT ON COLUMN changes.buddy_id IS 'The buddy that changed.';
COMMENT ON COLUMN changes.user_id IS 'Its owner after the change.';
COMMENT ON COLUMN changes.audience IS 'Its audience after the change.';
COMMENT ON COLUMN changes.version IS 'The buddy''s version after the change (consecutive per buddy).';
COMMENT ON COLUMN changes.committed_at IS 'Time of the writing transaction (the buddy''s updated_at).';
COMMENT ON COLUMN changes.cause_kind IS 'delivery, refresh (REST snapshot), rebuild or replay.';
COMMENT ON COLUMN changes.delivery_id IS 'The stored delivery applied last in that change; null for a rebuild.';
COMMENT ON COLUMN changes.event_type IS 'Its event type; null for a rebuild.';
COMMENT ON COLUMN changes.changed IS
    'Every top-level field of the buddy object that differs: {"field": {"from": .., "to": ..}}.';

-- Feed filters, and erasure of a user's entries.
CREATE INDEX changes_buddy_idx ON changes (buddy_id, txid, id);
CREATE INDEX changes_user_idx ON changes (user_id, txid, id);

-- How far pruning went: a cursor below this may have missed pruned entries (410).
CREATE TABLE changes_horizon (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    txid     bigint  NOT NULL,
    id       bigint  NOT NULL
);

COMMENT ON TABLE changes_horizon IS
    'One row: the largest (txid, id) the pruner deleted; cursors below it answer 410 cursor_expired.';

INSERT INTO changes_horizon (txid, id) VALUES (0, 0);

-- A requeued delivery (replay command or admin replay) is applied with cause kind `replay`.
ALTER TABLE delivery_states ADD COLUMN replayed boolean NOT NULL DEFAULT false;

COMMENT ON COLUMN delivery_states.replayed IS
    'Requeued by a replay: its next application is recorded in the change feed as a replay.';
