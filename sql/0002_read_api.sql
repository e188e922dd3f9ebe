-- Indexes for the read API's newest-first listings.

-- Ledger of one buddy across all currencies, newest first (the per-currency index covers the rest).
CREATE INDEX ledger_buddy_time_idx ON ledger (buddy_id, occurred_at DESC, seq DESC);
-- Buddies of one user and audience, by id (keyset pagination of GET /v1/buddies?user_id=).
CREATE INDEX buddies_user_id_idx ON buddies (user_id, buddy_id);
