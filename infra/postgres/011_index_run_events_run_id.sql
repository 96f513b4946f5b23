CREATE INDEX IF NOT EXISTS run_events_run_id_position ON run_events (run_id, global_position);
