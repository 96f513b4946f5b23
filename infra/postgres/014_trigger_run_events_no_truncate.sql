DROP TRIGGER IF EXISTS run_events_no_truncate ON run_events;
CREATE TRIGGER run_events_no_truncate
  BEFORE TRUNCATE ON run_events
  FOR EACH STATEMENT EXECUTE FUNCTION refuse_run_events_change();
