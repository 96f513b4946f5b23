GRANT SELECT ON projection_versions TO tuneline_app;
