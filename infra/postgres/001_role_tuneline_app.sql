-- The role services act as. It may read and append run_events, never change them.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tuneline_app') THEN
    CREATE ROLE tuneline_app NOLOGIN;
  END IF;
END
$$;
