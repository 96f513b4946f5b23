-- One row per projection: the last run_events position applied, updated in the same transaction
-- as the projection's rows (D8); a projection that stops on an error records where and why.
CREATE TABLE IF NOT EXISTS projection_checkpoints (
  projection      text        PRIMARY KEY,
  position        bigint      NOT NULL DEFAULT 0,
  updated_at      timestamptz NOT NULL DEFAULT now(),
  error_position  bigint,
  error           text
);
