CREATE UNIQUE INDEX IF NOT EXISTS history_runs_target_version ON history_runs (target, version) WHERE version IS NOT NULL;
