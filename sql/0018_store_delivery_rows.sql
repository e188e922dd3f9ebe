-- The receiver's batch as one array of rows instead of fifteen arrays of columns.
--
-- asyncpg checks every element of an array argument against the abstract Iterable and Sized
-- (to find nested arrays) before encoding it: fifteen arrays of a flush's deliveries were
-- about two such checks per value, and `serve`'s encoding of a 60-delivery flush took 0.47 ms
-- of CPU. An array of a composite type is one check per delivery, its fields encoded by their
-- binary codecs: 0.27 ms, and Postgres unnests one array instead of fifteen
-- (bench/BENCHMARKS.md, "Composite rows").
--
-- What the function does is store_deliveries(text[], ...)'s (sql/0017_store_deliveries.sql),
-- unchanged. That one stays, so that a receiver of the previous release keeps storing while a
-- rolling upgrade replaces it, but as a wrapper around this one: one body to maintain.

CREATE TYPE inbox_delivery AS (
    delivery_id  text,
    format       text,
    event_type   text,
    event_id     text,
    buddy_id     text,
    shard        int,
    occurred_at  timestamptz,
    signed_at    timestamptz,
    headers      text,
    body         bytea,
    status       text,
    reason       text,
    signature    bytea,
    event_data   text,
    event_parser smallint
);

COMMENT ON TYPE inbox_delivery IS
    'Internal: one delivery as the receiver hands it to store_deliveries (headers as JSON text).';

CREATE FUNCTION store_deliveries(p_rows inbox_delivery[])
RETURNS TABLE (delivery_id text, seq bigint)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    -- The batch's buddy ids that were erased (their tombstones counted a hit).
    gone text[] := '{}';
BEGIN
    -- See sql/0017_store_deliveries.sql for why the lock comes first and the probe is EXECUTEd.
    LOCK TABLE deliveries IN ROW EXCLUSIVE MODE;
    IF EXISTS (SELECT FROM tombstones) THEN
        EXECUTE $probe$
            WITH y AS (
                SELECT r.buddy_id AS b,
                       erasure_hmac(r.buddy_id, k.inner_pad, k.outer_pad) AS hash,
                       count(*) AS n
                FROM unnest($1::inbox_delivery[]) AS r, erasure_key AS k
                WHERE r.buddy_id IS NOT NULL
                GROUP BY r.buddy_id, k.inner_pad, k.outer_pad
            ), hit AS (
                UPDATE tombstones AS t SET hits = t.hits + y.n, last_hit_at = now()
                FROM y WHERE t.buddy_hash = y.hash
                RETURNING y.b
            )
            SELECT coalesce(array_agg(b), '{}') FROM hit
        $probe$ INTO gone USING p_rows;
    END IF;
    RETURN QUERY
    WITH x AS (
        SELECT r.delivery_id AS d, r.format AS f, r.event_type AS t, r.event_id AS e,
               r.buddy_id AS b, r.shard AS s, r.occurred_at AS o, r.signed_at AS sa,
               r.headers AS h, r.body, r.status AS st, r.reason AS r, r.signature AS sig,
               r.event_data AS ed, r.event_parser AS ep
        FROM unnest(p_rows) AS r
    ), kept AS (
        SELECT * FROM x WHERE x.b IS NULL OR NOT (x.b = ANY (gone))
    ), sigs AS (
        INSERT INTO delivery_signatures (signature, signed_at)
        SELECT sig, sa FROM kept WHERE sig IS NOT NULL
        ON CONFLICT (signature) DO NOTHING
        RETURNING signature
    ), stored AS (
        INSERT INTO deliveries (delivery_id, format, event_type, event_id, buddy_id, shard,
                                occurred_at, signed_at, headers, body, event_data, event_parser)
        SELECT d, f, t, e, b, s, o, sa, h::jsonb, body, ed::json, ep FROM kept
        WHERE kept.sig IS NULL OR kept.sig IN (SELECT signature FROM sigs)
        ON CONFLICT (delivery_id) DO NOTHING
        RETURNING delivery_id, seq, shard, event_id
    ), states AS (
        INSERT INTO delivery_states (seq, shard, event_id, status, reason, applied_at)
        SELECT stored.seq, stored.shard, stored.event_id, x.st, x.r,
               CASE WHEN x.st = 'accepted' THEN NULL ELSE now() END
        FROM stored JOIN x ON x.d = stored.delivery_id
    )
    SELECT stored.delivery_id, stored.seq FROM stored
    UNION ALL
    SELECT x.d, NULL FROM x WHERE x.b = ANY (gone);
END
$$;

COMMENT ON FUNCTION store_deliveries(inbox_delivery[]) IS
    'The receiver''s INSERT of a batch of deliveries (one row each): each stored one''s seq, NULL for one of an erased buddy.';

CREATE OR REPLACE FUNCTION store_deliveries(
    p_ids text[], p_formats text[], p_types text[], p_event_ids text[], p_buddy_ids text[],
    p_shards int[], p_occurred timestamptz[], p_signed timestamptz[], p_headers text[],
    p_bodies bytea[], p_statuses text[], p_reasons text[], p_signatures bytea[],
    p_event_data text[], p_parsers smallint[])
RETURNS TABLE (delivery_id text, seq bigint)
LANGUAGE sql
AS $$
    SELECT * FROM store_deliveries(ARRAY(
        SELECT ROW(d, f, t, e, b, s, o, sa, h, body, st, r, sig, ed, ep)::inbox_delivery
        FROM unnest(p_ids, p_formats, p_types, p_event_ids, p_buddy_ids, p_shards, p_occurred,
                    p_signed, p_headers, p_bodies, p_statuses, p_reasons, p_signatures,
                    p_event_data, p_parsers) WITH ORDINALITY
             AS x(d, f, t, e, b, s, o, sa, h, body, st, r, sig, ed, ep, n)
        ORDER BY n
    ))
$$;
