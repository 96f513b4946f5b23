-- The audit spine: every event and command, in JetStream stream order (D1).
CREATE TABLE IF NOT EXISTS run_events (
  global_position  bigint      PRIMARY KEY,          -- the JetStream stream sequence
  event_id         uuid        NOT NULL UNIQUE,      -- also the Nats-Msg-Id (D3)
  type             text        NOT NULL,
  schema_version   integer     NOT NULL,
  run_id           text        NOT NULL,
  correlation_id   text        NOT NULL,
  causation_id     uuid,
  occurred_at      timestamptz NOT NULL,
  recorded_at      timestamptz NOT NULL DEFAULT now(),
  producer         text        NOT NULL,
  severity         text        NOT NULL,
  reason_code      text,
  subject          text        NOT NULL,
  payload          jsonb       NOT NULL,
  CHECK (global_position > 0)
);
