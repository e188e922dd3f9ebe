-- The receiver's INSERT as a function, so that its plan is made once per connection.
--
-- The service's connections plan every statement for its parameters (plan_cache_mode =
-- force_custom_plan, service/store/pool.py): a generic plan made while a table was empty is a
-- sequential scan that the connection keeps. But the receiver's statement (the tombstone
-- probe and its hit count, the signature, the delivery, its state row) took 0.66 ms to plan,
-- a quarter of a flush of 32 deliveries, on every flush (bench/BENCHMARKS.md). Its only part
-- whose best plan depends on a table's size is the tombstone probe; every other part inserts
-- through a unique index or joins the batch's own rows. So the function plans the rest once,
-- generically (PL/pgSQL caches the plan of each statement; the SET below makes it generic),
-- and runs the tombstone probe, only when some buddy was ever erased, with EXECUTE, which
-- plans it for its arguments each time, as before.
--
-- What it does is the statement's as it was (service/store/inbox.py, insert_deliveries):
-- - a delivery for an erased buddy (its keyed hash has a tombstone, sql/0011_erasure.sql) is
--   not stored at all: it only counts a hit on the tombstone, and comes back with a NULL seq;
-- - a delivery whose signature is already stored (a replay, sql/0013) is skipped like a known
--   delivery id, and is not returned; the caller made ids and signatures unique in the batch;
-- - a stored delivery gets its state row in the same statement: both or neither.

CREATE FUNCTION store_deliveries(
    p_ids text[], p_formats text[], p_types text[], p_event_ids text[], p_buddy_ids text[],
    p_shards int[], p_occurred timestamptz[], p_signed timestamptz[], p_headers text[],
    p_bodies bytea[], p_statuses text[], p_reasons text[], p_signatures bytea[],
    p_event_data text[], p_parsers smallint[])
RETURNS TABLE (delivery_id text, seq bigint)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    -- The batch's buddy ids that were erased (their tombstones counted a hit).
    gone text[] := '{}';
BEGIN
    -- The lock the INSERT below takes anyway, taken first: an erasure in progress holds it off
    -- (service/store/erasure.py, LOCK_INBOX) until it commits, so the probe, whose snapshot is
    -- taken after this, sees that erasure's tombstones.
    LOCK TABLE deliveries IN ROW EXCLUSIVE MODE;
    IF EXISTS (SELECT FROM tombstones) THEN
        EXECUTE $probe$
            WITH y AS (
                SELECT b, erasure_hmac(b, k.inner_pad, k.outer_pad) AS hash, count(*) AS n
                FROM unnest($1::text[]) AS b, erasure_key AS k
                WHERE b IS NOT NULL
                GROUP BY b, k.inner_pad, k.outer_pad
            ), hit AS (
                UPDATE tombstones AS t SET hits = t.hits + y.n, last_hit_at = now()
                FROM y WHERE t.buddy_hash = y.hash
                RETURNING y.b
            )
            SELECT coalesce(array_agg(b), '{}') FROM hit
        $probe$ INTO gone USING p_buddy_ids;
    END IF;
    RETURN QUERY
    WITH x AS (
        SELECT *
        FROM unnest(p_ids, p_formats, p_types, p_event_ids, p_buddy_ids, p_shards, p_occurred,
                    p_signed, p_headers, p_bodies, p_statuses, p_reasons, p_signatures,
                    p_event_data, p_parsers)
             AS x(d, f, t, e, b, s, o, sa, h, body, st, r, sig, ed, ep)
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

COMMENT ON FUNCTION store_deliveries(text[], text[], text[], text[], text[], int[], timestamptz[],
    timestamptz[], text[], bytea[], text[], text[], bytea[], text[], smallint[]) IS
    'The receiver''s INSERT of a batch of deliveries (arrays, one element per delivery): each stored one''s seq, NULL for one of an erased buddy.';
