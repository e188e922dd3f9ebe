-- Refreshes from Hatched's REST API are stored in the inbox like webhooks (format 'rest'), so
-- the projector applies them in order with everything else and a rebuild replays them too.

ALTER TABLE deliveries DROP CONSTRAINT deliveries_format_check;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_format_check
    CHECK (format IN ('v1', 'v2', 'rest'));
COMMENT ON COLUMN deliveries.format IS
    'v1 (envelope, Hatched-Signature), v2 (X-Hatched-* headers), or rest (a snapshot fetched from Hatched''s REST API).';

ALTER TABLE buddies ADD COLUMN remote_snapshot jsonb;
COMMENT ON COLUMN buddies.remote_snapshot IS
    'The buddy object exactly as Hatched''s REST API last returned it, unknown fields included.';

-- Buddies not refreshed for longest come first for reconciliation.
CREATE INDEX buddies_refreshed_idx ON buddies (refreshed_at NULLS FIRST, buddy_id);

CREATE TABLE backfill_checkpoints (
    run_key    text PRIMARY KEY,
    cursor     text,
    done       bigint NOT NULL DEFAULT 0,
    finished   boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE backfill_checkpoints IS
    'Progress of `hatched-mirror backfill` runs, so an interrupted run resumes where it stopped.';
COMMENT ON COLUMN backfill_checkpoints.run_key IS 'What the run loads: all, or a hash of the ids.';
COMMENT ON COLUMN backfill_checkpoints.cursor IS 'Hatched listing cursor (or list position) to resume from.';
COMMENT ON COLUMN backfill_checkpoints.done IS 'Buddies loaded so far.';
COMMENT ON COLUMN backfill_checkpoints.finished IS 'The run completed.';
