-- Core schema: the inbox of deliveries, the mirrored buddies and their ledger.
-- Customers query these tables directly, so every table and column says what it holds.

CREATE TABLE deliveries (
    seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id  text        NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    format       text        NOT NULL CHECK (format IN ('v1', 'v2')),
    event_type   text,
    event_id     text,
    buddy_id     text,
    shard        integer     NOT NULL DEFAULT 0,
    occurred_at  timestamptz,
    signed_at    timestamptz NOT NULL,
    headers      jsonb       NOT NULL,
    body         bytea       NOT NULL,
    status       text        NOT NULL DEFAULT 'accepted'
                 CHECK (status IN ('accepted', 'applied', 'duplicate', 'unmapped', 'dead')),
    reason       text,
    attempts     integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    applied_at   timestamptz,
    CONSTRAINT deliveries_delivery_id_key UNIQUE (delivery_id)
);

COMMENT ON TABLE deliveries IS
    'Inbox: every verified Hatched delivery, stored raw before it was acknowledged, with its outcome.';
COMMENT ON COLUMN deliveries.seq IS 'Receipt order; breaks ties between equal occurred_at.';
COMMENT ON COLUMN deliveries.delivery_id IS
    'Hatched delivery id (v2 X-Hatched-Delivery, v1 deliveryId), or sha256:<body hash> when absent; the dedupe key.';
COMMENT ON COLUMN deliveries.received_at IS 'When the receiver stored it.';
COMMENT ON COLUMN deliveries.format IS 'Wire format: v1 (envelope, Hatched-Signature) or v2 (X-Hatched-* headers).';
COMMENT ON COLUMN deliveries.event_type IS 'Canonical event type (coin.* mapped to coins.*); null if unreadable.';
COMMENT ON COLUMN deliveries.event_id IS 'v1 eventId: the underlying event; a second delivery of it is a duplicate.';
COMMENT ON COLUMN deliveries.buddy_id IS 'The buddy the event is about; null if the body named none.';
COMMENT ON COLUMN deliveries.shard IS 'Worker shard (hash of buddy_id); deliveries of one buddy share a shard.';
COMMENT ON COLUMN deliveries.occurred_at IS 'Order key: v1 createdAt, else a payload time, else the signature time.';
COMMENT ON COLUMN deliveries.signed_at IS 'Signature timestamp of the attempt that was stored.';
COMMENT ON COLUMN deliveries.headers IS 'The Hatched headers of that attempt (lower-case names), for replay.';
COMMENT ON COLUMN deliveries.body IS 'The raw body bytes exactly as signed.';
COMMENT ON COLUMN deliveries.status IS
    'accepted (waiting to apply), applied, duplicate (same event seen before), unmapped (unknown type), dead (see reason).';
COMMENT ON COLUMN deliveries.reason IS 'Why a delivery is dead, unmapped or duplicate, or the last apply error.';
COMMENT ON COLUMN deliveries.attempts IS 'How many times the worker tried to apply it.';
COMMENT ON COLUMN deliveries.next_attempt_at IS 'After a failed attempt: not retried before this time.';
COMMENT ON COLUMN deliveries.applied_at IS 'When it reached its final status.';

-- The worker drains pending rows of one shard in receipt order.
CREATE INDEX deliveries_pending_idx ON deliveries (shard, seq) WHERE status = 'accepted';
-- Per-buddy history (events route, rebuild).
CREATE INDEX deliveries_buddy_idx ON deliveries (buddy_id, seq);
-- v1 duplicate detection by event id.
CREATE INDEX deliveries_event_id_idx ON deliveries (event_id) WHERE event_id IS NOT NULL;
-- Admin listing and replay by status.
CREATE INDEX deliveries_status_idx ON deliveries (status, seq) WHERE status <> 'applied';

CREATE TABLE buddies (
    buddy_id          text PRIMARY KEY,
    user_id           text,
    audience          text,
    egg_id            text,
    name              text,
    status            text,
    config_version_id text,
    evolution_stage   integer,
    image_url         text,
    thumb_url         text,
    base_image_url    text,
    coins             bigint,
    tokens            jsonb NOT NULL DEFAULT '{}',
    skills            jsonb NOT NULL DEFAULT '{}',
    badges            jsonb NOT NULL DEFAULT '{}',
    streaks           jsonb NOT NULL DEFAULT '{}',
    items_owned       text[] NOT NULL DEFAULT '{}',
    items_equipped    text[] NOT NULL DEFAULT '{}',
    appearance        jsonb,
    progression       jsonb,
    hatched_at        timestamptz,
    last_event_at     timestamptz,
    refreshed_at      timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    version           bigint NOT NULL DEFAULT 1,
    clock             jsonb NOT NULL DEFAULT '{}'
);

COMMENT ON TABLE buddies IS 'The mirror: the current state of every buddy, as the read API serves it.';
COMMENT ON COLUMN buddies.buddy_id IS 'Hatched buddy id.';
COMMENT ON COLUMN buddies.user_id IS 'The customer''s end user who owns the buddy.';
COMMENT ON COLUMN buddies.audience IS 'Hatched audience, when the buddy was hatched for one.';
COMMENT ON COLUMN buddies.egg_id IS 'The egg it hatched from.';
COMMENT ON COLUMN buddies.name IS 'Display name.';
COMMENT ON COLUMN buddies.status IS 'active once hatched (or as Hatched''s REST API reports).';
COMMENT ON COLUMN buddies.config_version_id IS 'The rulebook version the buddy is pinned to.';
COMMENT ON COLUMN buddies.evolution_stage IS 'Evolution stage; never goes down.';
COMMENT ON COLUMN buddies.image_url IS 'Image of the highest stage seen.';
COMMENT ON COLUMN buddies.thumb_url IS 'Thumbnail image.';
COMMENT ON COLUMN buddies.base_image_url IS 'Base image before appearance items (REST refresh only).';
COMMENT ON COLUMN buddies.coins IS 'Coin balance after the newest coin event.';
COMMENT ON COLUMN buddies.tokens IS 'Token balances: {"<token_type>": balance}.';
COMMENT ON COLUMN buddies.skills IS 'Skills: {"<skill_key>": {"value": n, "level": n}}.';
COMMENT ON COLUMN buddies.badges IS 'Badges: {"<badge_id>": {"status": "ready"|"awarded", "awarded_at": ts}}.';
COMMENT ON COLUMN buddies.streaks IS 'Streaks: {"<streak_key>": {"count": n, "last_milestone": n}}.';
COMMENT ON COLUMN buddies.items_owned IS 'Marketplace items owned, sorted.';
COMMENT ON COLUMN buddies.items_equipped IS 'Marketplace items equipped, sorted.';
COMMENT ON COLUMN buddies.appearance IS 'Appearance block (REST refresh only).';
COMMENT ON COLUMN buddies.progression IS 'Progression block (REST refresh only).';
COMMENT ON COLUMN buddies.hatched_at IS 'When buddy.hatched occurred.';
COMMENT ON COLUMN buddies.last_event_at IS 'occurred_at of the newest event applied.';
COMMENT ON COLUMN buddies.refreshed_at IS 'Last authoritative refresh from Hatched''s REST API.';
COMMENT ON COLUMN buddies.created_at IS 'When the mirror first saw the buddy.';
COMMENT ON COLUMN buddies.updated_at IS 'When the mirrored state last changed.';
COMMENT ON COLUMN buddies.version IS 'Grows by one with every change of the mirrored state; the ETag.';
COMMENT ON COLUMN buddies.clock IS
    'Internal: per-field order keys (last-writer-wins) and pending token deltas. Not for queries.';

CREATE INDEX buddies_user_idx ON buddies (user_id, audience, hatched_at DESC NULLS LAST, buddy_id);

CREATE TABLE ledger (
    delivery_id   text PRIMARY KEY,
    seq           bigint NOT NULL,
    buddy_id      text   NOT NULL,
    currency      text   NOT NULL,
    amount        bigint NOT NULL,
    balance_after bigint,
    reason        text,
    reference_id  text,
    ledger_id     text,
    is_lucky      boolean,
    occurred_at   timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE ledger IS 'Coin and token movements, one row per applied coins.*/token.* delivery.';
COMMENT ON COLUMN ledger.delivery_id IS
    'The delivery that recorded it (one entry per delivery); kept after the delivery is pruned.';
COMMENT ON COLUMN ledger.seq IS 'Inbox sequence of that delivery.';
COMMENT ON COLUMN ledger.buddy_id IS 'The buddy.';
COMMENT ON COLUMN ledger.currency IS '"coins" or the token type.';
COMMENT ON COLUMN ledger.amount IS 'Signed: positive when earned, negative when spent.';
COMMENT ON COLUMN ledger.balance_after IS 'Balance after the movement, as Hatched reported it.';
COMMENT ON COLUMN ledger.reason IS 'Hatched reason (v1: source.eventType).';
COMMENT ON COLUMN ledger.reference_id IS 'Hatched reference id.';
COMMENT ON COLUMN ledger.ledger_id IS 'Hatched ledger id.';
COMMENT ON COLUMN ledger.is_lucky IS 'Hatched lucky-bonus flag.';
COMMENT ON COLUMN ledger.occurred_at IS 'When the movement happened (order key).';

CREATE INDEX ledger_buddy_idx ON ledger (buddy_id, currency, occurred_at DESC, seq DESC);
