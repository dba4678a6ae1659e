//! What pgwarden knows about PostgreSQL's own objects: which catalog relations
//! exist (unqualified names resolve to pg_catalog first), which are harmless
//! for drivers and `psql \d`, which are never readable, which built-in
//! functions exist, and which ones are never callable.

use std::collections::HashSet;
use std::sync::LazyLock;

/// Relations in pg_catalog on PostgreSQL 15 (scripts/gen-catalog).
static PG_CATALOG_RELATIONS: LazyLock<HashSet<&'static str>> =
    LazyLock::new(|| include_str!("catalog/pg15_relations.txt").lines().collect());

/// Functions in pg_catalog on PostgreSQL 15 (scripts/gen-catalog).
static PG_CATALOG_FUNCTIONS: LazyLock<HashSet<&'static str>> =
    LazyLock::new(|| include_str!("catalog/pg15_functions.txt").lines().collect());

/// Operators in pg_catalog on PostgreSQL 15 (scripts/gen-catalog).
static PG_CATALOG_OPERATORS: LazyLock<HashSet<&'static str>> =
    LazyLock::new(|| include_str!("catalog/pg15_operators.txt").lines().collect());

/// Built-ins with an overload that is volatile or not executable by PUBLIC on
/// PostgreSQL 15 (scripts/gen-catalog).
static PG_CATALOG_RESTRICTED: LazyLock<HashSet<&'static str>> = LazyLock::new(|| {
    include_str!("catalog/pg15_functions_restricted.txt")
        .lines()
        .collect()
});

/// Built-ins callable with one argument of any row type (scripts/gen-catalog).
static PG_CATALOG_ROWARG: LazyLock<HashSet<&'static str>> = LazyLock::new(|| {
    include_str!("catalog/pg15_functions_rowarg.txt")
        .lines()
        .collect()
});

/// Whether `t.name` may be the call `name(t)` on the whole row `t`.
pub fn takes_a_row(name: &str) -> bool {
    PG_CATALOG_ROWARG.contains(name)
}

pub fn is_builtin_operator(name: &str) -> bool {
    PG_CATALOG_OPERATORS.contains(name)
}

pub fn is_catalog_relation(name: &str) -> bool {
    PG_CATALOG_RELATIONS.contains(name)
}

pub fn is_builtin_function(name: &str) -> bool {
    PG_CATALOG_FUNCTIONS.contains(name)
}

/// The structural default for a built-in function nobody's rule names: the
/// catalog decides, not a list of known-dangerous names, so the next
/// dangerous built-in is refused before anyone lists it. A built-in is
/// *restricted* when PostgreSQL itself keeps it from PUBLIC (it reads files,
/// controls the server, ...) or marks it volatile (it may change state:
/// sequences, advisory locks, notifications, WAL, other sessions), unless it
/// is one of the volatile built-ins known to read or change nothing beyond
/// the caller's own session.
pub fn is_restricted_builtin(name: &str) -> bool {
    PG_CATALOG_RESTRICTED.contains(name) && !HARMLESS_VOLATILE_FUNCTIONS.contains(&name)
}

/// Volatile built-ins with no effect outside the calling session: random
/// numbers and clocks, reads of the server's own counters, sizes and
/// positions (psql's `\l+` and `\d+` call several), and the
/// tablesample method BERNOULLI. Everything else volatile needs a rule.
pub const HARMLESS_VOLATILE_FUNCTIONS: &[&str] = &[
    "random",
    "setseed",
    "clock_timestamp",
    "timeofday",
    "gen_random_uuid",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "currval",
    "lastval",
    // Releasing the session's own advisory locks (asyncpg's pool reset).
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "current_query",
    "bernoulli",
    "pg_blocking_pids",
    "pg_safe_snapshot_blocking_pids",
    "pg_isolation_test_session_is_blocked",
    "pg_lock_status",
    "pg_notification_queue_usage",
    "pg_jit_available",
    "pg_is_in_recovery",
    "pg_is_wal_replay_paused",
    "pg_get_wal_replay_pause_state",
    "pg_current_wal_lsn",
    "pg_current_wal_flush_lsn",
    "pg_current_wal_insert_lsn",
    "pg_last_wal_receive_lsn",
    "pg_last_wal_replay_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_last_committed_xact",
    "pg_database_size",
    "pg_relation_size",
    "pg_table_size",
    "pg_indexes_size",
    "pg_total_relation_size",
    "pg_tablespace_size",
    "pg_partition_tree",
    "pg_partition_ancestors",
    "pg_collation_actual_version",
    "pg_database_collation_actual_version",
    "pg_sequence_last_value",
    "pg_prepared_xact",
    "pg_xact_status",
    "txid_status",
    "pg_xact_commit_timestamp",
    "pg_xact_commit_timestamp_origin",
    "pg_stat_clear_snapshot",
    "pg_stat_get_xact_blocks_fetched",
    "pg_stat_get_xact_blocks_hit",
    "pg_stat_get_xact_function_calls",
    "pg_stat_get_xact_function_self_time",
    "pg_stat_get_xact_function_total_time",
    "pg_stat_get_xact_numscans",
    "pg_stat_get_xact_tuples_deleted",
    "pg_stat_get_xact_tuples_fetched",
    "pg_stat_get_xact_tuples_hot_updated",
    "pg_stat_get_xact_tuples_inserted",
    "pg_stat_get_xact_tuples_returned",
    "pg_stat_get_xact_tuples_updated",
    "pg_stat_get_recovery_prefetch",
    "pg_control_checkpoint",
    "pg_control_init",
    "pg_control_recovery",
    "pg_control_system",
    "pg_get_multixact_members",
    "pg_get_wal_resource_managers",
];

/// Sequence functions that advance or set a sequence: judged as an UPDATE of
/// the sequence they name, so the rules for that relation decide.
pub const SEQUENCE_WRITES: &[&str] = &["nextval", "setval"];

/// Catalog relations whose contents are secrets or other sessions' data:
/// password hashes, user-mapping options (passwords of other servers), column
/// statistics (sampled values of every column), other sessions' query text,
/// large objects, server configuration files, subscription conninfo.
pub const SENSITIVE_RELATIONS: &[&str] = &[
    "pg_catalog.pg_authid",
    "pg_catalog.pg_shadow",
    "pg_catalog.pg_user_mapping",
    "pg_catalog.pg_user_mappings",
    "pg_catalog.pg_statistic",
    "pg_catalog.pg_statistic_ext_data",
    "pg_catalog.pg_stats",
    "pg_catalog.pg_stats_ext",
    "pg_catalog.pg_stats_ext_exprs",
    "pg_catalog.pg_stat_activity",
    "pg_catalog.pg_largeobject",
    "pg_catalog.pg_hba_file_rules",
    "pg_catalog.pg_ident_file_mappings",
    "pg_catalog.pg_file_settings",
    "pg_catalog.pg_subscription",
    "pg_catalog.pg_stat_replication",
    "pg_catalog.pg_stat_wal_receiver",
    "pg_catalog.pg_replication_origin_status",
    "information_schema.user_mapping_options",
    "information_schema.user_mappings",
    "public.pg_stat_statements",
    "public.pg_stat_statements_info",
];

/// Catalog relations drivers and `psql \d` read; they describe structure,
/// never row data. Reads of these are always allowed.
pub const HARMLESS_RELATIONS: &[&str] = &[
    "pg_catalog.pg_aggregate",
    "pg_catalog.pg_am",
    "pg_catalog.pg_amop",
    "pg_catalog.pg_amproc",
    "pg_catalog.pg_attrdef",
    "pg_catalog.pg_attribute",
    "pg_catalog.pg_auth_members",
    "pg_catalog.pg_available_extensions",
    "pg_catalog.pg_available_extension_versions",
    "pg_catalog.pg_cast",
    "pg_catalog.pg_class",
    "pg_catalog.pg_collation",
    "pg_catalog.pg_constraint",
    "pg_catalog.pg_conversion",
    "pg_catalog.pg_cursors",
    "pg_catalog.pg_database",
    "pg_catalog.pg_default_acl",
    "pg_catalog.pg_depend",
    "pg_catalog.pg_description",
    "pg_catalog.pg_enum",
    "pg_catalog.pg_event_trigger",
    "pg_catalog.pg_extension",
    "pg_catalog.pg_foreign_data_wrapper",
    "pg_catalog.pg_foreign_server",
    "pg_catalog.pg_foreign_table",
    "pg_catalog.pg_index",
    "pg_catalog.pg_indexes",
    "pg_catalog.pg_inherits",
    "pg_catalog.pg_init_privs",
    "pg_catalog.pg_language",
    "pg_catalog.pg_locks",
    "pg_catalog.pg_matviews",
    "pg_catalog.pg_namespace",
    "pg_catalog.pg_opclass",
    "pg_catalog.pg_operator",
    "pg_catalog.pg_opfamily",
    "pg_catalog.pg_partitioned_table",
    "pg_catalog.pg_policies",
    "pg_catalog.pg_policy",
    "pg_catalog.pg_prepared_statements",
    "pg_catalog.pg_prepared_xacts",
    "pg_catalog.pg_proc",
    "pg_catalog.pg_publication",
    "pg_catalog.pg_publication_namespace",
    "pg_catalog.pg_publication_rel",
    "pg_catalog.pg_publication_tables",
    "pg_catalog.pg_range",
    "pg_catalog.pg_rewrite",
    "pg_catalog.pg_roles",
    "pg_catalog.pg_rules",
    "pg_catalog.pg_seclabel",
    "pg_catalog.pg_seclabels",
    "pg_catalog.pg_sequence",
    "pg_catalog.pg_sequences",
    "pg_catalog.pg_settings",
    "pg_catalog.pg_shdepend",
    "pg_catalog.pg_shdescription",
    "pg_catalog.pg_stat_gssapi",
    "pg_catalog.pg_stat_ssl",
    "pg_catalog.pg_statistic_ext",
    "pg_catalog.pg_tables",
    "pg_catalog.pg_tablespace",
    "pg_catalog.pg_timezone_abbrevs",
    "pg_catalog.pg_timezone_names",
    "pg_catalog.pg_transform",
    "pg_catalog.pg_trigger",
    "pg_catalog.pg_ts_config",
    "pg_catalog.pg_ts_config_map",
    "pg_catalog.pg_ts_dict",
    "pg_catalog.pg_ts_parser",
    "pg_catalog.pg_ts_template",
    "pg_catalog.pg_type",
    "pg_catalog.pg_user",
    "pg_catalog.pg_views",
];

/// Schemas whose relations are all harmless reads, except those listed as
/// sensitive.
pub const HARMLESS_SCHEMAS: &[&str] = &["information_schema"];

/// Functions that are never callable, whatever the rules say: they execute SQL
/// text the proxy cannot see (`query_to_xml`, `dblink`, `ts_stat`, the
/// two-argument `ts_rewrite`), touch server files
/// (`pg_read_file`, `lo_import`, `pg_ls_dir`), other servers, other sessions
/// (`pg_terminate_backend`, `pg_stat_get_activity`), or server settings
/// (`set_config` could change search_path behind the proxy's back).
pub const DENIED_FUNCTIONS: &[&str] = &[
    "dblink*",
    "query_to_xml*",
    "*_to_xml*",
    "*_to_xmlschema",
    "ts_stat",
    "ts_rewrite",
    "pg_read_*",
    "lo_*",
    "loread",
    "lowrite",
    "pg_ls_*",
    "pg_stat_file",
    "pg_file_*",
    "pg_logdir_ls",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_signal_backend",
    "set_config",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_promote",
    "pg_current_logfile",
    "pg_stat_get_activity",
    "pg_stat_get_backend_activity",
    "pg_hba_file_rules",
    "pg_ident_file_mappings",
    "pg_show_all_file_settings",
    "pg_create_*_replication_slot",
    "pg_drop_replication_slot",
    "pg_copy_*_replication_slot",
    "pg_logical_slot_*",
    "pg_replication_*",
    "pg_switch_wal",
    "pg_backup_*",
    "pg_log_backend_memory_contexts",
    "pg_import_system_collations",
    "pg_stat_reset*",
    "pg_wal_replay_*",
    "pg_create_restore_point",
    "pg_get_backend_memory_contexts",
    "pg_stat_statements*",
    "postgres_fdw_*",
];

/// Settings whose change would let the server read SQL differently from the
/// proxy, or escape the proxy's identity: never changeable.
pub const PROTECTED_SETTINGS: &[&str] = &[
    "client_encoding",
    "standard_conforming_strings",
    "search_path",
    "default_transaction_read_only",
    "session_replication_role",
    "role",
    "session_authorization",
    "session characteristics",
    "backslash_quote",
    "escape_string_warning",
    "allow_system_table_mods",
    "lo_compat_privileges",
];

/// Settings a client may choose in its startup packet: the formatting ones
/// drivers send. A subset of `HARMLESS_SETTINGS` (a test keeps it one);
/// anything else is refused at startup, because any setting can be given
/// there (search_path, role, session_authorization...).
pub const STARTUP_SETTINGS: &[&str] = &[
    "application_name",
    "datestyle",
    "timezone",
    "intervalstyle",
    "extra_float_digits",
    "bytea_output",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
];

/// Settings a driver or person may change freely: formatting, timeouts,
/// planner knobs. Anything else is a SESSION access for the rules.
pub const HARMLESS_SETTINGS: &[&str] = &[
    "application_name",
    "datestyle",
    "timezone",
    "intervalstyle",
    "extra_float_digits",
    "bytea_output",
    "client_min_messages",
    "lock_timeout",
    "statement_timeout",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "transaction",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
    "jit",
    "work_mem",
    "maintenance_work_mem",
    "timezone_abbreviations",
    "xmlbinary",
    "xmloption",
    "default_transaction_isolation",
    "enable_*",
    "random_page_cost",
    "seq_page_cost",
    "cpu_*_cost",
    "effective_cache_size",
    "max_parallel_workers_per_gather",
    "plan_cache_mode",
    "row_security",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_list_of_harmless_settings() {
        for s in STARTUP_SETTINGS {
            assert!(
                HARMLESS_SETTINGS
                    .iter()
                    .any(|g| crate::glob::glob_match(g, s)),
                "startup setting {s} is not a harmless setting"
            );
            assert!(!PROTECTED_SETTINGS.contains(s), "{s}");
        }
    }
}
