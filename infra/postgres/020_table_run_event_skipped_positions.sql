-- Stream positions the recorder accounted for without a run_events row (a dead-lettered message,
-- a re-published duplicate), so that any other hole in global_position is a real gap.
CREATE TABLE IF NOT EXISTS run_event_skipped_positions (
  global_position bigint      PRIMARY KEY,
  reason_code     text        NOT NULL,
  event_id        uuid,
  detail          text        NOT NULL,
  recorded_at     timestamptz NOT NULL DEFAULT now()
);
