CREATE TABLE IF NOT EXISTS timeline_entries (
  global_position bigint      PRIMARY KEY,
  run_id          text        NOT NULL,
  event_id        uuid        NOT NULL,
  type            text        NOT NULL,
  stage           text        NOT NULL,
  severity        text        NOT NULL,
  reason_code     text,
  occurred_at     timestamptz NOT NULL,
  summary         text        NOT NULL
);
