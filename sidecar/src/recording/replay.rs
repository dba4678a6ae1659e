//! A recorded session as a psql-like transcript, sans-IO.

use std::fmt::Write;

use super::record::{Event, Record};

/// Render one session's records (in order).
pub fn transcript(records: &[Record]) -> String {
    let mut out = String::new();
    let mut db = String::from("db");
    for r in records {
        let at = &r.at;
        match &r.event {
            Event::SessionStart {
                subject,
                method,
                claims,
                client,
                application_name,
                policy,
                policy_version,
                database,
            } => {
                db = database.clone();
                let _ = writeln!(out, "-- {at} session {} started", r.session);
                let _ = writeln!(out, "--   subject:  {subject} ({method})");
                for (k, v) in claims {
                    let _ = writeln!(out, "--   {k}: {v}");
                }
                let _ = writeln!(
                    out,
                    "--   client:   {client} application_name={application_name:?}"
                );
                let _ = writeln!(
                    out,
                    "--   policy:   {policy} (version {policy_version}), database {database}"
                );
            }
            Event::Statement {
                n,
                text,
                parameters,
                verdict,
                rule,
                reason,
                approval,
                approved_by,
            } => {
                let _ = writeln!(out);
                let mut why = verdict.to_string();
                if let Some(rule) = rule {
                    let _ = write!(why, ", rule {rule}");
                }
                if let Some(a) = approval {
                    let _ = write!(why, ", approval {a}");
                    if let Some(by) = approved_by {
                        let _ = write!(why, " approved by {by}");
                    }
                }
                let _ = writeln!(out, "-- {at} #{n} [{why}]");
                let mut lines = text.lines();
                let first = lines.next().unwrap_or("");
                let _ = writeln!(out, "{db}=> {first}");
                for l in lines {
                    let _ = writeln!(out, "{db}-> {l}");
                }
                if !parameters.is_empty() {
                    let shown: Vec<String> = parameters
                        .iter()
                        .enumerate()
                        .map(|(i, p)| format!("${}={}", i + 1, p.as_deref().unwrap_or("NULL")))
                        .collect();
                    let _ = writeln!(out, "-- parameters: {}", shown.join(" "));
                }
                if let Some(reason) = reason {
                    if verdict.refused() {
                        let _ = writeln!(out, "ERROR:  pgwarden: {reason}");
                    } else if verdict.audited() {
                        let _ = writeln!(out, "-- audit mode, forwarded: {reason}");
                    }
                }
            }
            Event::Result {
                n,
                duration_us,
                rows,
                tag,
                error,
                columns,
                sample,
                sample_cut,
            } => {
                if !columns.is_empty() || !sample.is_empty() {
                    table(&mut out, columns, sample);
                    let more = if *sample_cut {
                        format!(" (first {} kept)", sample.len())
                    } else {
                        String::new()
                    };
                    let noun = if *rows == 1 { "row" } else { "rows" };
                    let _ = writeln!(out, "({rows} {noun}{more})");
                }
                if let Some(e) = error {
                    let _ = writeln!(out, "{e}");
                }
                let _ = writeln!(
                    out,
                    "-- #{n} {} in {:.3} ms",
                    tag.as_deref()
                        .unwrap_or(if error.is_some() { "failed" } else { "done" }),
                    *duration_us as f64 / 1000.0
                );
            }
            Event::SessionEnd { reason, statements } => {
                let _ = writeln!(out);
                let _ = writeln!(
                    out,
                    "-- {at} session {} ended ({reason}) after {statements} statement(s)",
                    r.session
                );
            }
            Event::LogRestart { broken_at, reason } => {
                let _ = writeln!(
                    out,
                    "-- {at} the log was found broken at {broken_at} ({reason}); a new chain starts here"
                );
            }
        }
    }
    out
}

/// psql's aligned format.
fn table(out: &mut String, columns: &[String], rows: &[Vec<Option<String>>]) {
    let n = columns
        .len()
        .max(rows.iter().map(Vec::len).max().unwrap_or(0));
    let cell = |row: &Vec<Option<String>>, i: usize| -> String {
        match row.get(i) {
            Some(Some(v)) => v.replace('\n', "\\n"),
            _ => String::new(),
        }
    };
    let mut width: Vec<usize> = (0..n)
        .map(|i| columns.get(i).map(|c| c.chars().count()).unwrap_or(0))
        .collect();
    for row in rows {
        for (i, w) in width.iter_mut().enumerate() {
            *w = (*w).max(cell(row, i).chars().count());
        }
    }
    let head: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "{:^w$}",
                columns.get(i).map(String::as_str).unwrap_or(""),
                w = width[i]
            )
        })
        .collect();
    let _ = writeln!(out, " {} ", head.join(" | "));
    let rule: Vec<String> = width.iter().map(|w| "-".repeat(*w + 2)).collect();
    let _ = writeln!(out, "{}", rule.join("+"));
    for row in rows {
        let cells: Vec<String> = (0..n)
            .map(|i| format!("{:<w$}", cell(row, i), w = width[i]))
            .collect();
        let _ = writeln!(out, " {} ", cells.join(" | "));
    }
}
