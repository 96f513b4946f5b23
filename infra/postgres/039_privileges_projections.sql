GRANT SELECT, INSERT, UPDATE, DELETE ON projection_checkpoints, timeline_runs, timeline_stages, timeline_entries TO tuneline_app;
