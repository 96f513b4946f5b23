-- run_events is append-only for everybody, owner included; the grants below also keep the
-- application role to SELECT and INSERT, so it is refused twice over.
CREATE OR REPLACE FUNCTION refuse_run_events_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'run_events is append-only: % refused', TG_OP
    USING ERRCODE = 'insufficient_privilege';
END
$$;
