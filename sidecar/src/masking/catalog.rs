//! Reading the column map from the database over a proxy-owned connection:
//! the catalog queries, driven through `MapBuilder`.

use std::sync::Arc;

use super::columns::{MapBuilder, MaskMap};
use super::rules::MaskRules;
use crate::upstream::{self, UpstreamError, UpstreamTarget};
use crate::wire::Limits;

const USER_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND n.nspname NOT LIKE 'pg\\_toast%'";
const RELKINDS: &str = "c.relkind IN ('r', 'v', 'm', 'f', 'p')";

fn relations_query() -> String {
    format!(
        "SELECT c.oid, n.nspname, c.relname FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE {RELKINDS} AND {USER_SCHEMAS}"
    )
}

/// Columns whose name some masking entry could match. The regex holds only
/// ASCII letters, digits, `_` and escapes (see `MaskRules`), never a quote.
fn columns_query(name_regex: &str) -> String {
    format!(
        "SELECT a.attrelid, a.attnum, a.attname FROM pg_catalog.pg_attribute a \
         JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE a.attnum > 0 AND NOT a.attisdropped AND {RELKINDS} AND {USER_SCHEMAS} \
         AND a.attname ~ '{}'",
        name_regex.replace('\'', "''")
    )
}

/// Which columns each view's rewrite rule reads.
const DEPENDENCIES_QUERY: &str = "SELECT DISTINCT r.ev_class, d.refobjid, d.refobjsubid \
     FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid \
     WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass \
     AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass \
     AND d.refobjsubid > 0 AND r.ev_class <> d.refobjid";

fn oid_list(oids: &[u32]) -> String {
    oids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Log in with the policy's credential and build the map.
pub async fn load(
    rules: &MaskRules,
    target: &Arc<UpstreamTarget>,
    limits: Limits,
) -> Result<MaskMap, UpstreamError> {
    let params = [
        (
            "application_name".to_owned(),
            "pgwarden masking catalog".to_owned(),
        ),
        ("client_encoding".to_owned(), "UTF8".to_owned()),
    ];
    let mut up = upstream::connect(target, &params, limits).await?;
    let relations = upstream::query_rows(&mut up, limits, &relations_query()).await?;
    let columns =
        upstream::query_rows(&mut up, limits, &columns_query(&rules.column_name_regex())).await?;
    let deps = upstream::query_rows(&mut up, limits, DEPENDENCIES_QUERY).await?;
    let inherits = upstream::query_rows(
        &mut up,
        limits,
        "SELECT inhrelid, inhparent FROM pg_catalog.pg_inherits",
    )
    .await?;
    let mut builder = MapBuilder::new(rules, &relations, &columns, &deps, &inherits);
    loop {
        let views = builder.views_to_classify();
        if views.is_empty() {
            break;
        }
        let list = oid_list(&views);
        let cols = upstream::query_rows(
            &mut up,
            limits,
            &format!(
                "SELECT attrelid, attnum, attname FROM pg_catalog.pg_attribute \
                 WHERE attrelid IN ({list}) AND attnum > 0 AND NOT attisdropped"
            ),
        )
        .await?;
        let defs = upstream::query_rows(
            &mut up,
            limits,
            &format!(
                "SELECT oid, pg_catalog.pg_get_viewdef(oid) FROM pg_catalog.pg_class \
                 WHERE oid IN ({list})"
            ),
        )
        .await?;
        builder.add_views(&cols, &defs);
    }
    upstream::terminate(&mut up).await;
    Ok(builder.finish())
}
