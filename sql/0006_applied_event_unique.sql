-- v1 duplicate detection looks up a batch of event ids among applied deliveries. The plain
-- event_id index it replaces was planned, on a new table without statistics yet, as a scan of
-- the whole inbox (a hundred ids at the default selectivity look like most of the table), or
-- as a scan of deliveries_prune_idx (every applied row), for every batch, until an ANALYZE.
--
-- At most one delivery of an event is ever applied (a second one ends `duplicate`), so the
-- index can be unique, and the planner then knows each probe finds at most one row with or
-- without statistics. It indexes an expression rather than having a `status = 'applied'`
-- predicate, because a query implying that predicate would also qualify the prune index.
-- The unique index makes "applied twice" impossible at the database, not only in code.
-- IF [NOT] EXISTS: on a large inbox an operator may build the index beforehand with
-- CREATE UNIQUE INDEX CONCURRENTLY (README, Database), and drop the old one the same way.
DROP INDEX IF EXISTS deliveries_event_id_idx;
CREATE UNIQUE INDEX IF NOT EXISTS deliveries_applied_event_idx
    ON deliveries ((CASE WHEN status = 'applied' THEN event_id END))
    WHERE event_id IS NOT NULL;
COMMENT ON INDEX deliveries_applied_event_idx IS
    'v1 duplicate detection: the one applied delivery of each Hatched event id.';
