-- A target's datasets numbered as they were first prepared (in run_events order): 1.0.0, then a minor
-- bump when rows were added, a patch when rows were corrected or removed, a major one when the label
-- space changed; the content hash and the manifest's sha256 beside each.
CREATE TABLE IF NOT EXISTS history_datasets (
  target            text        NOT NULL,
  dataset_version   text        NOT NULL,
  semver            text        NOT NULL,
  major             integer     NOT NULL,
  minor             integer     NOT NULL,
  patch             integer     NOT NULL,
  label_space       text[]      NOT NULL,
  rows              integer     NOT NULL,
  manifest_sha256   text        NOT NULL,
  first_run_id      text        NOT NULL,
  first_position    bigint      NOT NULL,
  prepared_at       timestamptz NOT NULL,
  PRIMARY KEY (target, dataset_version)
);
