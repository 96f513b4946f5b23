GRANT SELECT, INSERT, UPDATE, DELETE ON history_runs, history_datasets TO tuneline_app;
