REVOKE ALL ON api_tokens FROM PUBLIC;
REVOKE ALL ON api_tokens FROM tuneline_app;
GRANT SELECT ON api_tokens TO tuneline_app;
