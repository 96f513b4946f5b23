CREATE TABLE IF NOT EXISTS timeline_stages (
  run_id          text        NOT NULL,
  stage           text        NOT NULL,
  status          text        NOT NULL,            -- running / succeeded / failed
  started_at      timestamptz NOT NULL,
  ended_at        timestamptz,
  last_type       text        NOT NULL,
  last_position   bigint      NOT NULL,
  reason_code     text,
  detail          text,
  PRIMARY KEY (run_id, stage)
);
