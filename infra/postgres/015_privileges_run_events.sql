REVOKE ALL ON run_events FROM PUBLIC;
REVOKE ALL ON run_events FROM tuneline_app;
GRANT SELECT, INSERT ON run_events TO tuneline_app;
