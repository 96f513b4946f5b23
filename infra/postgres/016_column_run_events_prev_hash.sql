-- The hash chain (D19): the hash of the row before this one in position order (32 zero bytes for the
-- first). Rows recorded before the chain existed are hashed by the migrator (services/audit/chain.py).
ALTER TABLE run_events ADD COLUMN IF NOT EXISTS prev_hash bytea;
