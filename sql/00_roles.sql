-- pgtraj SQL API, part 0: roles and schema privileges.
--
-- Files in sql/ are re-applied in name order by every `pgtraj install` (CREATE OR REPLACE), after the
-- migrations; tables are defined only in migrations/.
--
--   pgtraj_user   may use models: embed, predict, search, read the registry. Cannot train, deploy,
--                 register or install.
--   pgtraj_admin  everything pgtraj_user may, plus train, deploy and register models.
-- Grant them to login roles: GRANT pgtraj_user TO analyst;

-- Roles are cluster-wide: an install into another database may create them at the same moment.
DO $$
BEGIN
    BEGIN
        CREATE ROLE pgtraj_user NOLOGIN;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END;
    BEGIN
        CREATE ROLE pgtraj_admin NOLOGIN;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END;
    IF NOT pg_has_role('pgtraj_admin', 'pgtraj_user', 'MEMBER') THEN
        GRANT pgtraj_user TO pgtraj_admin;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA pgtraj TO pgtraj_user;
