CREATE TABLE IF NOT EXISTS timeline_runs (
  run_id          text        PRIMARY KEY,
  correlation_id  text        NOT NULL,
  target          text,
  locator         text,
  status          text        NOT NULL,            -- running / succeeded / failed
  started_at      timestamptz NOT NULL,
  updated_at      timestamptz NOT NULL,
  last_position   bigint      NOT NULL,
  reason_code     text,
  failure         text
);
