-- The History projection (services/audit/projections/history.py): one row per fine-tune run of a target,
-- from its start to what became of its version; rebuilt from run_events like the timeline (D8).
CREATE TABLE IF NOT EXISTS history_runs (
  run_id                text        PRIMARY KEY,
  target                text        NOT NULL,
  status                text        NOT NULL,   -- running / failed / cancelled / candidate / validated / rejected / production / archived
  outcome               text        NOT NULL,   -- pending / promoted / rejected / abandoned
  started_at            timestamptz NOT NULL,
  ended_at              timestamptz,            -- the run's end: its registration, or its failure
  updated_at            timestamptz NOT NULL,
  last_position         bigint      NOT NULL,
  reason_code           text,                   -- why it was abandoned
  failure               text,
  locator               text,
  recipe                text,
  train_rows            integer,                -- the rows the model was trained on (prep's train split)
  validation_rows       integer,
  test_rows             integer,
  dataset_version       text,                   -- prep's content hash
  dataset_semver        text,                   -- the target's dataset number (history_datasets)
  manifest_sha256       text,
  test_set_sha256       text,
  accuracy              double precision,       -- the candidate's held-out (test set) accuracy
  baseline_accuracy     double precision,
  candidate_judge_mean  double precision,
  baseline_judge_mean   double precision,
  baseline              text,
  delta                 double precision,
  p_value               double precision,
  n                     integer,
  gate_passed           boolean,
  gate_failed           text[],
  gate_event_id         text,
  export_sha256         text,
  version               integer,
  override              boolean     NOT NULL DEFAULT false,
  rejection_reason      text,
  acts                  jsonb       NOT NULL DEFAULT '[]'   -- who acted: [{at, type, actor, reason, position}]
);
