-- A state row for every stored delivery that has none.
--
-- 0008 copies the outcomes into delivery_states with one INSERT ... SELECT and only then takes
-- the lock on `deliveries` that its DROP INDEX and DROP COLUMN need. Upgrades migrate first,
-- while the previous release still serves (deploy/README.md), so a delivery that one of its
-- receivers committed after the copy's snapshot, before the lock, is in `deliveries` with no
-- state row: no worker would ever claim it, and the `inbox` view (an inner join) hides it.
-- Once 0008 has committed, the previous release can no longer store anything (the columns it
-- writes are gone) and this release writes both rows in one statement, so every such delivery
-- is visible here.
--
-- They become pending: the worker parses each stored body again and reaches the status the
-- receiver had given it (unmapped, dead) or applies it. A delivery that a worker of the
-- previous release applied in the same window is applied again, which changes nothing: the
-- projector skips an event whose order key a field already holds (service/projector.py), and
-- its ledger row exists (ON CONFLICT DO NOTHING).
--
-- 13 s at 20,000,000 stored deliveries on the bench machine (bench/BENCHMARKS.md, Upgrade).

INSERT INTO delivery_states (seq, shard, event_id)
SELECT d.seq, d.shard, d.event_id
FROM deliveries AS d
WHERE NOT EXISTS (SELECT 1 FROM delivery_states AS s WHERE s.seq = d.seq)
ON CONFLICT (seq) DO NOTHING;
