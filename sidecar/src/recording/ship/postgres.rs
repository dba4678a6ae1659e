//! The audit PostgreSQL as a recording [`Sink`]: each batch is one INSERT
//! with `ON CONFLICT DO NOTHING` (the record hash is the table's primary
//! key, so a batch sent twice is stored once, and the writer role needs
//! INSERT only). Each log has a chain id, so several gateways can share
//! one table and each chain still verifies on its own. Also what reads the
//! table back for `pgwarden sessions --store-dsn`.

use std::fs;
use std::sync::Arc;

use pgwarden_api::{SecretString, TlsMode};

use super::driver::{SealedRecord, Sink, Stored};
use crate::upstream::{self, tls::UpstreamTls, Credential, UpstreamError, UpstreamTarget};
use crate::wire::Limits;

pub const DEFAULT_TABLE: &str = "pgwarden_records";

/// The table an admin creates (pgwarden never creates or alters it).
pub fn table_ddl(table: &str) -> String {
    format!(
        "CREATE TABLE {table} (\n  chain   text NOT NULL,\n  seq     bigint NOT NULL,\n  hash    text PRIMARY KEY,\n  session text NOT NULL,\n  at      timestamptz NOT NULL,\n  kind    text NOT NULL,\n  line    text NOT NULL,\n  UNIQUE (chain, seq)\n);"
    )
}

/// A libpq-style URI: `postgres[ql]://user[:password]@host[:port]/db
/// [?sslmode=disable|require|verify-full&sslrootcert=FILE]`.
pub fn parse_dsn(dsn: &str) -> Result<UpstreamTarget, String> {
    let rest = dsn
        .strip_prefix("postgres://")
        .or_else(|| dsn.strip_prefix("postgresql://"))
        .ok_or("the DSN must start with postgres:// or postgresql://")?;
    let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (auth, hostpart) = main
        .rsplit_once('@')
        .ok_or("the DSN must name a user (user[:password]@host)")?;
    let (user, password) = auth.split_once(':').unwrap_or((auth, ""));
    let (hostport, db) = hostpart
        .split_once('/')
        .ok_or("the DSN must name a database (host/database)")?;
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => (
            h.trim_start_matches('[').trim_end_matches(']'),
            p.parse::<u16>()
                .map_err(|_| format!("invalid port {p:?}"))?,
        ),
        _ => (hostport, 5432),
    };
    if host.is_empty() || db.is_empty() || user.is_empty() {
        return Err("the DSN needs a user, a host and a database".into());
    }
    let mut mode = TlsMode::VerifyFull;
    let mut ca: Option<Vec<u8>> = None;
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "sslmode" => {
                mode = match v {
                    "disable" => TlsMode::Disable,
                    "require" => TlsMode::Require,
                    "verify-full" => TlsMode::VerifyFull,
                    other => {
                        return Err(format!(
                            "sslmode={other} is not supported (disable, require, verify-full)"
                        ))
                    }
                }
            }
            "sslrootcert" => {
                let path = percent_decode(v)?;
                ca = Some(fs::read(&path).map_err(|e| format!("sslrootcert {path}: {e}"))?);
            }
            other => return Err(format!("DSN parameter {other:?} is not supported")),
        }
    }
    let tls = UpstreamTls::from_mode(mode, ca.as_deref())?;
    Ok(UpstreamTarget {
        host: host.to_owned(),
        port,
        database: percent_decode(db)?,
        credential: Credential {
            username: percent_decode(user)?,
            password: SecretString::new(percent_decode(password)?),
        },
        tls,
    })
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or("truncated %-escape in the DSN")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| "invalid %-escape in the DSN")?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the DSN is not UTF-8 after %-decoding".into())
}

/// One audit table in one PostgreSQL, with the writer's connection (made
/// on the first delivery, dropped after a failed one).
pub struct AuditTable {
    target: Arc<UpstreamTarget>,
    table: String,
    limits: Limits,
    conn: Option<upstream::Upstream>,
}

impl AuditTable {
    pub fn new(target: Arc<UpstreamTarget>, table: String, limits: Limits) -> Self {
        AuditTable {
            target,
            table,
            limits,
            conn: None,
        }
    }
}

impl Sink for AuditTable {
    type Error = String;

    fn cursor_name(&self) -> String {
        let t = &self.target;
        let key = format!("{}:{}/{}/{}", t.host, t.port, t.database, self.table);
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.as_bytes());
        let hex: String = d.as_ref()[..6].iter().map(|b| format!("{b:02x}")).collect();
        format!("shipped-{hex}")
    }

    async fn deliver(&mut self, chain: &str, batch: &[SealedRecord]) -> Result<Stored, String> {
        let Some(last) = batch.last().map(|r| r.seq) else {
            return Ok(Stored { through: 0 });
        };
        let up = match self.conn.as_mut() {
            Some(up) => up,
            None => match upstream::connect(&self.target, &[], self.limits).await {
                Ok(up) => self.conn.insert(up),
                Err(e) => return Err(format!("unreachable: {e}")),
            },
        };
        let sql = insert_sql(&self.table, chain, batch);
        match upstream::query_rows(up, self.limits, &sql).await {
            // One statement: all of the batch is stored, or none.
            Ok(_) => Ok(Stored { through: last }),
            Err(e) => {
                if let Some(mut up) = self.conn.take() {
                    upstream::terminate(&mut up).await;
                }
                Err(store_error(
                    &e,
                    &self.target.credential.username,
                    &self.table,
                    "INSERT",
                ))
            }
        }
    }
}

/// A literal no text can break out of: dollar quoting with a tag the text
/// does not contain.
fn literal(s: &str) -> String {
    let mut tag = String::from("$pgw$");
    while s.contains(&tag) {
        tag = format!("$pgw{:08x}$", rand::random::<u32>());
    }
    format!("{tag}{s}{tag}")
}

fn insert_sql(table: &str, chain: &str, rows: &[SealedRecord]) -> String {
    let mut sql =
        format!("INSERT INTO {table} (chain, seq, hash, session, at, kind, line) VALUES ");
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str(&format!(
            "({},{},{},{},{}::timestamptz,{},{})",
            literal(chain),
            r.seq,
            literal(&r.hash),
            literal(&r.session),
            literal(&r.at),
            literal(r.kind),
            literal(&r.line)
        ));
    }
    // No conflict target: DO NOTHING then needs no SELECT privilege.
    sql.push_str(" ON CONFLICT DO NOTHING");
    sql
}

/// A failed query on the audit table in words an admin can act on: a
/// missing privilege names the role and the privilege (the gateway's writer
/// needs INSERT only; `pgwarden sessions --store-dsn` needs SELECT).
pub fn store_error(e: &UpstreamError, role: &str, table: &str, privilege: &str) -> String {
    match e {
        UpstreamError::Query { code, message } if code == "42501" => {
            let hint = if privilege == "SELECT" {
                format!("reading recordings needs a role that can SELECT it (GRANT SELECT ON {table} TO <auditor role>); the gateway's writer role is INSERT-only by design")
            } else {
                format!("the gateway ships records with INSERT only: GRANT {privilege} ON {table} TO {role}")
            };
            format!("role {role} lacks the {privilege} privilege on table {table} in the audit store (server: {message}); {hint}")
        }
        UpstreamError::Query { code, message } if code == "42P01" => format!(
            "no table {table} in the audit store database (server: {message}); an admin creates it (pgwarden never does)"
        ),
        other => other.to_string(),
    }
}

/// Every line in the store, grouped by chain, in order (for the CLI).
pub async fn fetch_lines(
    target: &UpstreamTarget,
    table: &str,
    limits: Limits,
) -> Result<Vec<(String, Vec<String>)>, String> {
    let mut up = upstream::connect(target, &[], limits)
        .await
        .map_err(|e| e.to_string())?;
    let rows = upstream::query_rows(
        &mut up,
        limits,
        &format!("SELECT chain, line FROM {table} ORDER BY chain, seq"),
    )
    .await
    .map_err(|e| store_error(&e, &target.credential.username, table, "SELECT"))?;
    upstream::terminate(&mut up).await;
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for row in rows {
        let (Some(Some(chain)), Some(Some(line))) = (row.first(), row.get(1)) else {
            continue;
        };
        match out.last_mut() {
            Some((c, lines)) if c == chain => lines.push(line.clone()),
            _ => out.push((chain.clone(), vec![line.clone()])),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsns_parse_like_libpq_uris() {
        let t =
            parse_dsn("postgres://wr%40iter:p%3Aw@127.0.0.1:5433/audit?sslmode=disable").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.database.as_str()),
            ("127.0.0.1", 5433, "audit")
        );
        assert_eq!(t.credential.username, "wr@iter");
        assert_eq!(t.credential.password.expose(), "p:w");
        let t = parse_dsn("postgresql://w@db.internal/audit?sslmode=require").unwrap();
        assert_eq!(t.port, 5432);
        for bad in [
            "mysql://x@h/db",
            "postgres://h/db",
            "postgres://u@h",
            "postgres://u@h:99999/db",
            "postgres://u@h/db?sslmode=prefer",
            "postgres://u@h/db?application_name=x",
        ] {
            assert!(parse_dsn(bad).is_err(), "{bad}");
        }
        // verify-full is the default and needs a CA.
        assert!(parse_dsn("postgres://u@h/db").is_err());
    }

    #[test]
    fn a_missing_privilege_is_named_with_the_role() {
        let denied = UpstreamError::Query {
            code: "42501".into(),
            message: "permission denied for table pgwarden_records".into(),
        };
        let e = store_error(&denied, "writer", "pgwarden_records", "SELECT");
        assert!(
            e.contains("role writer lacks the SELECT privilege on table pgwarden_records")
                && e.contains("INSERT-only")
                && !e.contains("protocol"),
            "{e}"
        );
        let e = store_error(&denied, "writer", "audit.records", "INSERT");
        assert!(
            e.contains("lacks the INSERT privilege")
                && e.contains("GRANT INSERT ON audit.records TO writer"),
            "{e}"
        );
        let missing = UpstreamError::Query {
            code: "42P01".into(),
            message: "relation \"x\" does not exist".into(),
        };
        assert!(store_error(&missing, "w", "x", "SELECT").contains("no table x"));
    }

    #[test]
    fn literals_cannot_be_broken_out_of() {
        let evil = "x$pgw$); DROP TABLE t; --";
        let l = literal(evil);
        let tag_end = l[1..].find('$').unwrap() + 2;
        let tag = &l[..tag_end];
        assert!(!evil.contains(tag), "{l}");
        assert!(l.starts_with(tag) && l.ends_with(tag));
    }
}
