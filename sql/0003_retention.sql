-- Retention: the pruner deletes applied deliveries oldest first; this partial index keeps each
-- small batch an index range scan however large the inbox grows.
CREATE INDEX deliveries_prune_idx ON deliveries (applied_at) WHERE status = 'applied';
