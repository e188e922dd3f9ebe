-- Parse once: the receiver stores the canonical event's data beside the raw delivery, and the
-- worker applies that instead of reading the body again.
--
-- Re-reading each stored body (JSON parse, snake_case keys, id and time checks, the depth
-- limit) was about a sixth of the worker's CPU per delivery (bench/BENCHMARKS.md, issue 20),
-- for a result the receiver had already computed. The raw body stays the record: a delivery
-- whose `event_parser` is not the worker's current one (stored before this migration, or by
-- an older normaliser) is read from the body again, as before.
--
-- `json` rather than `jsonb`: stored and sent back as the text the receiver wrote, with no
-- tree built on either side, and queryable all the same. Both columns are nullable and have no
-- default, so adding them rewrites nothing.

ALTER TABLE deliveries
    ADD COLUMN event_data json,
    ADD COLUMN event_parser smallint;

COMMENT ON COLUMN deliveries.event_data IS
    'The event payload as the receiver normalised it (snake_case keys, v1 names mapped); null when there was nothing to apply (dead, unmapped) or for REST snapshots.';
COMMENT ON COLUMN deliveries.event_parser IS
    'Version of the normaliser that wrote event_data; the worker reads the raw body again when it is not its own.';
