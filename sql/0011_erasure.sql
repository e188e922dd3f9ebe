-- Erasure of an end user (DELETE /v1/users/{user_id}, `hatched-mirror forget`): the user's
-- buddies and everything derived from them are deleted, and each erased buddy id leaves a
-- tombstone so that a late delivery, a Hatched retry, a refresh or a backfill cannot bring the
-- buddy back. A tombstone must not reveal the id it stands for, so it holds a keyed hash:
-- HMAC-SHA256 under a key that only this database holds. An unkeyed hash of an id would not do:
-- ids are guessable, and anyone with a copy of the table could hash candidates and compare.
--
-- The key is drawn here, once, from the server's strong random source (gen_random_uuid, in core
-- since PostgreSQL 13, so no extension is needed) and never leaves the database: the service
-- only ever calls erasure_hash(). HMAC is built from core sha256() (RFC 2104): the key, padded
-- to the 64-byte block, is stored XORed with the inner and the outer pad, which is all the
-- function needs. Dropping this row makes every existing tombstone unmatchable (erased buddies
-- could then come back): it is part of the data, back it up with the rest.

CREATE TABLE erasure_key (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    inner_pad bytea   NOT NULL CHECK (length(inner_pad) = 64),
    outer_pad bytea   NOT NULL CHECK (length(outer_pad) = 64),
    created_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE erasure_key IS
    'Internal: the secret key of erasure_hash() (one row). Never exported or logged; without it tombstones match nothing.';
COMMENT ON COLUMN erasure_key.singleton IS 'Always true: there is one key.';
COMMENT ON COLUMN erasure_key.inner_pad IS 'HMAC key (32 random bytes, zero-padded to 64) XOR 0x36.';
COMMENT ON COLUMN erasure_key.outer_pad IS 'HMAC key (32 random bytes, zero-padded to 64) XOR 0x5c.';
COMMENT ON COLUMN erasure_key.created_at IS 'When the key was drawn.';

DO $$
DECLARE
    key bytea := uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid())
                 || decode(repeat('00', 32), 'hex');
    ipad bytea := decode(repeat('00', 64), 'hex');
    opad bytea := decode(repeat('00', 64), 'hex');
BEGIN
    FOR i IN 0..63 LOOP
        ipad := set_byte(ipad, i, get_byte(key, i) # 54);   -- 0x36
        opad := set_byte(opad, i, get_byte(key, i) # 92);   -- 0x5c
    END LOOP;
    INSERT INTO erasure_key (inner_pad, outer_pad) VALUES (ipad, opad);
END
$$;

-- HMAC-SHA256 from the two padded keys. A plain expression, so Postgres inlines it: the
-- receiver's INSERT computes it once per delivery with the pads read once per statement.
CREATE FUNCTION erasure_hmac(id text, inner_pad bytea, outer_pad bytea) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT sha256(outer_pad || sha256(inner_pad || convert_to(id, 'UTF8')))
$$;

COMMENT ON FUNCTION erasure_hmac(text, bytea, bytea) IS
    'HMAC-SHA256 of an id, given the key XOR the inner and the outer pad (see erasure_key).';

CREATE FUNCTION erasure_hash(id text) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT erasure_hmac(id, k.inner_pad, k.outer_pad) FROM erasure_key AS k
$$;

COMMENT ON FUNCTION erasure_hash(text) IS
    'HMAC-SHA256 of an id under the key in erasure_key: how tombstones name an erased buddy.';

CREATE TABLE tombstones (
    buddy_hash  bytea       PRIMARY KEY,
    erased_at   timestamptz NOT NULL DEFAULT now(),
    hits        bigint      NOT NULL DEFAULT 0,
    last_hit_at timestamptz
);

COMMENT ON TABLE tombstones IS
    'One row per erased buddy: deliveries, refreshes and backfills of it are answered "forgotten" and stored nowhere.';
COMMENT ON COLUMN tombstones.buddy_hash IS 'erasure_hash(buddy_id): does not reveal the id.';
COMMENT ON COLUMN tombstones.erased_at IS 'When the buddy was erased.';
COMMENT ON COLUMN tombstones.hits IS 'Deliveries, refreshes and backfill loads of the buddy turned away since.';
COMMENT ON COLUMN tombstones.last_hit_at IS 'When the last of them came.';
