REVOKE ALL ON run_event_skipped_positions FROM PUBLIC;
GRANT SELECT, INSERT ON run_event_skipped_positions TO tuneline_app;
