-- Subscriptions: the change feed pushed to internal HTTP endpoints (service/subscriptions/).
--
-- Each subscription is a cursor on the feed plus an outbox. The worker that owns it (a
-- session advisory lock, so one process at a time sends for it) copies the feed's entries
-- past the cursor into the outbox and moves the cursor in one statement; an entry leaves the
-- outbox when the endpoint answers 2xx. Only the oldest outbox entry of each buddy is ever sent,
-- so a buddy's next change waits for the previous one's acknowledgement, while different
-- buddies go out in parallel.

CREATE TABLE subscriptions (
    subscription_id text        PRIMARY KEY,
    url             text        NOT NULL,
    fields          text[],
    description     text,
    secret          text        NOT NULL,
    status          text        NOT NULL DEFAULT 'active'
                                CHECK (status IN ('active', 'failing', 'disabled')),
    cursor_txid     bigint      NOT NULL,
    cursor_id       bigint      NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_success_at timestamptz,
    last_error      text,
    failing_since   timestamptz
);

COMMENT ON TABLE subscriptions IS
    'Endpoints the change feed is pushed to (admin API /v1/subscriptions), each with its place in the feed.';
COMMENT ON COLUMN subscriptions.fields IS 'Only entries whose `changed` has one of these keys; null: every entry.';
COMMENT ON COLUMN subscriptions.secret IS 'Standard Webhooks signing secret (whsec_ + base64), shown once at creation.';
COMMENT ON COLUMN subscriptions.status IS
    'active; failing (no 2xx since failing_since); disabled (failing longer than MIRROR_SUBSCRIPTION_DISABLE_AFTER_S, until enabled again).';
COMMENT ON COLUMN subscriptions.cursor_txid IS 'Feed position (txid, id) read into the outbox so far.';
COMMENT ON COLUMN subscriptions.failing_since IS 'First failure since the last 2xx; null while deliveries succeed.';

CREATE TABLE subscription_outbox (
    subscription_id text        NOT NULL REFERENCES subscriptions ON DELETE CASCADE,
    txid            bigint      NOT NULL,
    id              bigint      NOT NULL,
    buddy_id        text        NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription_id, txid, id),
    -- An entry pruned from the feed (or erased) cannot be sent any more.
    FOREIGN KEY (txid, id) REFERENCES changes (txid, id) ON DELETE CASCADE
);

COMMENT ON TABLE subscription_outbox IS
    'Feed entries of a subscription not yet acknowledged; per buddy, only the oldest is in flight.';
COMMENT ON COLUMN subscription_outbox.attempts IS 'Failed attempts so far (the backoff grows with it).';
COMMENT ON COLUMN subscription_outbox.next_attempt_at IS 'Not sent again before this time.';

-- The oldest entry of each buddy, per subscription.
CREATE INDEX subscription_outbox_buddy_idx ON subscription_outbox (subscription_id, buddy_id, txid, id);
-- The cascade from `changes` (pruning, erasure) finds its rows by this.
CREATE INDEX subscription_outbox_change_idx ON subscription_outbox (txid, id);
