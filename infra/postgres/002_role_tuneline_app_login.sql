-- Services log in as tuneline_app itself, not as the owner with tuneline_app as the session's role:
-- a session that logs in as a superuser can SET ROLE back to it and step around every grant (and,
-- with session_replication_role, around the append-only triggers). tuneline_app is no superuser and
-- a member of no other role, so what 015 grants is all it can do. Its password, where the server
-- asks for one, is set by the migrator from TUNELINE_APP_DB_PASSWORD (services/audit/migrate.py).
ALTER ROLE tuneline_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
