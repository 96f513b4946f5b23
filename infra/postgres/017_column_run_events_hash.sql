-- sha256(prev_hash || sha256(the event's canonical bytes)), computed by the recorder in position order;
-- `tuneline audit verify` recomputes it, `tuneline audit anchor` prints the last one.
ALTER TABLE run_events ADD COLUMN IF NOT EXISTS hash bytea;
