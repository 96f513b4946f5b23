-- Bearer tokens of the HTTP API (D18): only the sha256 of each token is kept. The owner mints them
-- (`tuneline token create`, `tuneline up`'s admin token); the API, as tuneline_app, may only read.
CREATE TABLE IF NOT EXISTS api_tokens (
  token_sha256  text        PRIMARY KEY,
  token_prefix  text        NOT NULL,            -- the first characters, to tell tokens apart in a listing
  subject       text        NOT NULL,
  role          text        NOT NULL CHECK (role IN ('viewer', 'operator', 'approver', 'admin')),
  created_at    timestamptz NOT NULL DEFAULT now(),
  revoked_at    timestamptz
);
