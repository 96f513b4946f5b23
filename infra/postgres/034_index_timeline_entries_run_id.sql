CREATE INDEX IF NOT EXISTS timeline_entries_run_id_position ON timeline_entries (run_id, global_position);
