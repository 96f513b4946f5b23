-- Versions of each projection (D8): the live one readers use (its tables in public), and those built beside
-- it by `tuneline replay projection NAME` (their tables in the schema <name>_v<version>) until dropped.
CREATE TABLE IF NOT EXISTS projection_versions (
  projection   text        NOT NULL,
  version      integer     NOT NULL,
  state        text        NOT NULL,            -- building / live / aside / retired / failed / dropped
  position     bigint,                          -- built (and compared) up to this run_events position
  differences  jsonb,                           -- per table: rows only in the live version, only in this one
  built_by     text,
  built_at     timestamptz NOT NULL DEFAULT now(),
  switched_at  timestamptz,
  PRIMARY KEY (projection, version)
);
