DROP TRIGGER IF EXISTS run_events_no_update_delete ON run_events;
CREATE TRIGGER run_events_no_update_delete
  BEFORE UPDATE OR DELETE ON run_events
  FOR EACH ROW EXECUTE FUNCTION refuse_run_events_change();
