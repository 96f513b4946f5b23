CREATE INDEX IF NOT EXISTS history_runs_target_started ON history_runs (target, started_at, run_id);
