-- First-user bootstrap: one row per user and audience guards the egg -> hatch -> buddy flow.
-- The primary key is the guard: however many requests arrive at once, one INSERT wins and runs
-- the flow; the others read this row. Progress is announced on NOTIFY hatched_mirror_bootstraps
-- (payload: the user id) for the read API's user streams.

CREATE TABLE bootstraps (
    user_id          text        NOT NULL,
    audience_key     text        NOT NULL,
    audience         text,
    status           text        NOT NULL
                     CHECK (status IN ('starting', 'hatching', 'mirroring', 'completed', 'failed')),
    claim            uuid,
    egg_id           text,
    operation_id     text,
    buddy_id         text,
    error            jsonb,
    attempts         integer     NOT NULL DEFAULT 1,
    polls            integer     NOT NULL DEFAULT 0,
    hatch_started_at timestamptz,
    polled_at        timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, audience_key)
);

COMMENT ON TABLE bootstraps IS
    'First-user bootstrap (POST /v1/users/{user_id}/buddy): at most one egg -> hatch flow per user and audience.';
COMMENT ON COLUMN bootstraps.user_id IS 'The customer''s end user.';
COMMENT ON COLUMN bootstraps.audience_key IS 'coalesce(audience, ''''): part of the key, so "no audience" is unique too.';
COMMENT ON COLUMN bootstraps.audience IS 'Hatched audience asked for; null when none.';
COMMENT ON COLUMN bootstraps.status IS
    'starting (a request is calling Hatched), hatching (hatch started, waiting for buddy.hatched), mirroring (buddy known, being mirrored), completed (buddy mirrored), failed (see error; the next request retries).';
COMMENT ON COLUMN bootstraps.claim IS 'Internal: the request that owns the starting phase.';
COMMENT ON COLUMN bootstraps.egg_id IS 'The Hatched egg used (reused with ensure=true, never a second one).';
COMMENT ON COLUMN bootstraps.operation_id IS 'Hatched hatch operation (GET /operations/{id}).';
COMMENT ON COLUMN bootstraps.buddy_id IS 'The buddy, once known.';
COMMENT ON COLUMN bootstraps.error IS 'Why it failed: the problem answered ({status, code, title, detail, ...}).';
COMMENT ON COLUMN bootstraps.attempts IS 'How many times the flow was started (retries after a failure).';
COMMENT ON COLUMN bootstraps.polls IS 'GET /operations polls made by the fallback poller.';
COMMENT ON COLUMN bootstraps.hatch_started_at IS 'When the hatch was started; the poller counts from here.';
COMMENT ON COLUMN bootstraps.polled_at IS 'Last fallback poll.';
COMMENT ON COLUMN bootstraps.created_at IS 'First request for this user and audience.';
COMMENT ON COLUMN bootstraps.updated_at IS 'Last change; for status starting, the lease of the request running it.';

-- The fallback poller looks for hatches that have waited too long.
CREATE INDEX bootstraps_hatching_idx ON bootstraps (hatch_started_at) WHERE status = 'hatching';
-- Completion by buddy id (a mirrored REST snapshot).
CREATE INDEX bootstraps_buddy_idx ON bootstraps (buddy_id)
    WHERE buddy_id IS NOT NULL AND status <> 'completed';

-- A new bootstrap row, or progress in one, wakes that user's streams.
CREATE FUNCTION bootstraps_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hatched_mirror_bootstraps', NEW.user_id);
    RETURN NULL;
END
$$;

COMMENT ON FUNCTION bootstraps_notify() IS
    'NOTIFY hatched_mirror_bootstraps with the user id when a bootstrap row changes.';

CREATE TRIGGER bootstraps_notify_insert AFTER INSERT ON bootstraps
    FOR EACH ROW EXECUTE FUNCTION bootstraps_notify();

-- Progress a stream shows; the poller's bookkeeping (polls, polled_at) wakes nobody.
CREATE TRIGGER bootstraps_notify_update AFTER UPDATE ON bootstraps
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status
                       OR OLD.operation_id IS DISTINCT FROM NEW.operation_id
                       OR OLD.buddy_id IS DISTINCT FROM NEW.buddy_id
                       OR OLD.error IS DISTINCT FROM NEW.error)
    EXECUTE FUNCTION bootstraps_notify();

-- A buddy that appears in the mirror (by buddy.hatched or a REST snapshot) completes the flow
-- of its user and audience (or of its egg, or of its buddy id) and wakes that user's streams.
CREATE FUNCTION buddies_complete_bootstrap() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE bootstraps
    SET status = 'completed', buddy_id = NEW.buddy_id, error = NULL, claim = NULL,
        updated_at = now()
    WHERE status <> 'completed'
      AND ((user_id = NEW.user_id
            AND (audience_key = coalesce(NEW.audience, '') OR egg_id = NEW.egg_id))
           OR buddy_id = NEW.buddy_id);
    -- Streams of a user who never asked for a bootstrap learn of the buddy too.
    PERFORM pg_notify('hatched_mirror_bootstraps', NEW.user_id);
    RETURN NULL;
END
$$;

COMMENT ON FUNCTION buddies_complete_bootstrap() IS
    'Marks the user''s bootstrap completed when its buddy is mirrored, and wakes the user''s streams.';

-- Only a new buddy or a change of owner, audience or egg fires it: the apply hot path of an
-- ordinary event pays one WHEN check.
CREATE TRIGGER buddies_complete_bootstrap_insert AFTER INSERT ON buddies
    FOR EACH ROW WHEN (NEW.user_id IS NOT NULL)
    EXECUTE FUNCTION buddies_complete_bootstrap();

CREATE TRIGGER buddies_complete_bootstrap_update AFTER UPDATE ON buddies
    FOR EACH ROW WHEN (NEW.user_id IS NOT NULL AND (OLD.user_id IS DISTINCT FROM NEW.user_id
                                                    OR OLD.audience IS DISTINCT FROM NEW.audience
                                                    OR OLD.egg_id IS DISTINCT FROM NEW.egg_id))
    EXECUTE FUNCTION buddies_complete_bootstrap();
