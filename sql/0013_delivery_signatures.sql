-- Replay defence: the signatures of recently stored deliveries.
--
-- Hatched's HMAC covers only "{timestamp}.{body}": the delivery id and event type headers of a
-- v2 delivery are not signed, so a captured delivery could be sent again within the signature
-- window under a new delivery id (or another event type) and pass verification. Hatched signs
-- each attempt afresh, so it never sends the same signature twice; a second request carrying a
-- stored signature is a replay and is answered `duplicate` without storing anything.
--
-- A table of its own rather than a column of `deliveries`: it only has to remember signatures
-- for as long as they can pass the timestamp check, so the worker's prune keeps it small, and
-- creating it takes no lock on the large inbox.

CREATE TABLE delivery_signatures (
    signature  bytea       PRIMARY KEY,
    signed_at  timestamptz NOT NULL
);

COMMENT ON TABLE delivery_signatures IS
    'Internal: SHA-256 of "{timestamp}.{hmac}" of each stored webhook attempt, kept while the signature could still verify; a request repeating one is a replay.';
COMMENT ON COLUMN delivery_signatures.signature IS 'sha256 of the signature timestamp and the matching HMAC (hex).';
COMMENT ON COLUMN delivery_signatures.signed_at IS 'Signature timestamp; rows past the window are pruned.';

CREATE INDEX delivery_signatures_signed_at_idx ON delivery_signatures (signed_at);
