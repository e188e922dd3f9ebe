-- Every applied batch rewrites the rows of the buddies it touched. None of the indexed columns
-- (buddy_id, user_id, audience, hatched_at, refreshed_at) changes on most of those updates, so
-- they can be HOT updates (no new index entries), but only if the new row version fits on the
-- same page, and at the default fillfactor of 100 a page of ~1.5 KB rows is always full. With
-- room left on each page the update touches the heap page alone instead of four indexes at
-- random places, which is what grows with the number of buddies (bench/BENCHMARKS.md, Scale).
-- It applies to pages written from now on; `VACUUM FULL buddies` (locks the table) or
-- pg_repack rewrites the existing ones.
ALTER TABLE buddies SET (fillfactor = 70);
