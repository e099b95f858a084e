-- pgtraj SQL API, part 0: roles.
--
-- Files in sql/ are re-applied in name order by every `pgtraj install` (CREATE OR REPLACE), after the
-- migrations; tables are defined only in migrations/, privileges only in 90_privileges.sql.
--
--   pgtraj_user     may use models: embed, predict, search, read the registry, batch-embed and keep fresh
--                   the tables it may write. Writes no pgtraj table directly.
--   pgtraj_admin    everything pgtraj_user may, plus train, register, import and deploy models.
--   pgtraj_service  NOLOGIN, never granted to anyone: owns the SECURITY DEFINER functions through which
--                   the roles above write pgtraj's bookkeeping, and holds only the table rights those
--                   functions need. Each of them checks the caller's rights on the table concerned.
-- Grant the first two to login roles: GRANT pgtraj_user TO analyst;
--
-- Every function pins search_path = pg_catalog, pgtraj and names extension objects by their schema
-- (@extschema:NAME@, filled in at install), so a function or operator planted in a schema on the caller's
-- path is never what pgtraj calls. Procedures that commit cannot carry a SET clause: their SQL (in
-- pgtraj/runtime) is fully qualified instead.

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
    BEGIN
        CREATE ROLE pgtraj_service NOLOGIN BYPASSRLS;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END;
    IF NOT pg_catalog.pg_has_role('pgtraj_admin', 'pgtraj_user', 'MEMBER') THEN
        GRANT pgtraj_user TO pgtraj_admin;
    END IF;
END
$$;

-- The role a SECURITY DEFINER function of pgtraj acts for. Such a function cannot see its caller's
-- current_user, so the caller passes it (a parameter defaulting to current_user, which is evaluated on
-- the caller's side) and this checks the session may act as that role: nobody can claim a role they
-- could not SET ROLE to.
CREATE OR REPLACE FUNCTION pgtraj._acting_for(caller name) RETURNS name
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pgtraj AS $$
BEGIN
    IF caller IS NULL OR NOT pg_has_role(session_user, caller, 'MEMBER') THEN
        RAISE EXCEPTION 'pgtraj: role % may not act for role %', session_user, coalesce(caller::text, 'NULL')
              USING ERRCODE = '42501';
    END IF;
    RETURN caller;
END
$$;

-- Writes fail on a hot standby anyway; this says where to run them instead.
CREATE OR REPLACE FUNCTION pgtraj._check_writable(what text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pgtraj AS $$
BEGIN
    IF pg_is_in_recovery() THEN
        RAISE EXCEPTION 'pgtraj: cannot % on a hot standby (this server is read-only)', what
              USING ERRCODE = '25006',
                    HINT = 'run it on the primary; a standby serves embed, predict_*, score and similar';
    END IF;
END
$$;
