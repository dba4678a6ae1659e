//! The server settings the gateway's judgement relies on, sans-IO.
//!
//! pgwarden reads SQL text the way a PostgreSQL server with these settings
//! reads it: `standard_conforming_strings = on` (a backslash in '...' is a
//! plain character), `client_encoding = UTF8` (no multi-byte encoding can
//! swallow a quote), names resolved under the pinned search_path, the role it
//! logged in as. The server announces each of these with ParameterStatus at
//! login and whenever it changes, so the gateway checks the login values and
//! ends the session — FATAL, naming the setting — the moment one changes
//! behind its back (user code calling set_config, say). Refusing the change
//! up front stays the first line; this catches what the analyser cannot see.

use crate::wire::PgError;

/// PostgreSQL major versions whose grammar the analyser's (libpg_query,
/// PostgreSQL 18's grammar) is known to read the same way for what it judges.
pub const SUPPORTED_MAJORS: std::ops::RangeInclusive<u32> = 13..=18;

/// Settings whose value must be exactly this for the analyser to be right.
const REQUIRED: &[(&str, &str)] = &[
    ("client_encoding", "UTF8"),
    ("standard_conforming_strings", "on"),
    ("integer_datetimes", "on"),
];

/// Settings that must keep their login value: who the session is, where
/// unqualified names resolve, whether it may write.
const PINNED: &[&str] = &[
    "session_authorization",
    "is_superuser",
    "search_path",
    "default_transaction_read_only",
];

/// The login values of the watched settings.
#[derive(Debug, Default, Clone)]
pub struct ServerSettings {
    pinned: Vec<(&'static str, String)>,
}

impl ServerSettings {
    /// Check the ParameterStatus values a server sent at login.
    pub fn at_login<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<ServerSettings, PgError> {
        let mut s = ServerSettings::default();
        let mut seen_version = false;
        let mut required_seen = [false; REQUIRED.len()];
        for (name, value) in params {
            if name == "server_version" {
                seen_version = true;
                check_version(value)?;
            }
            if let Some(i) = REQUIRED.iter().position(|(n, _)| *n == name) {
                required_seen[i] = true;
            }
            s.on_change(name, value)
                .map_err(|e| PgError::upstream_failed(e.message))?;
            if let Some(n) = PINNED.iter().find(|n| **n == name) {
                s.pinned.push((n, value.to_owned()));
            }
        }
        if !seen_version {
            return Err(PgError::upstream_failed(
                "the upstream server did not report server_version; pgwarden cannot tell which grammar it speaks",
            ));
        }
        if let Some(i) = required_seen.iter().position(|seen| !seen) {
            return Err(PgError::upstream_failed(format!(
                "the upstream server did not report {}; pgwarden relies on it being {}",
                REQUIRED[i].0, REQUIRED[i].1
            )));
        }
        Ok(s)
    }

    /// A ParameterStatus during the session. Err: the session must end.
    pub fn on_change(&mut self, name: &str, value: &str) -> Result<(), PgError> {
        if let Some((_, want)) = REQUIRED.iter().find(|(n, _)| *n == name) {
            if !value.eq_ignore_ascii_case(want) {
                return Err(changed(name, value, want));
            }
        }
        if let Some((_, was)) = self.pinned.iter().find(|(n, _)| *n == name) {
            if value != was {
                return Err(changed(name, value, was));
            }
        }
        Ok(())
    }
}

fn changed(name: &str, value: &str, want: &str) -> PgError {
    PgError::server_setting_changed(format!(
        "the server reports {name} = \"{value}\", but pgwarden judges statements as the server reads them with {name} = \"{want}\"; the session is closed (the change was not made through pgwarden)"
    ))
}

fn check_version(value: &str) -> Result<(), PgError> {
    let major = value
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|m| m.parse::<u32>().ok());
    match major {
        Some(m) if SUPPORTED_MAJORS.contains(&m) => Ok(()),
        _ => Err(PgError::upstream_failed(format!(
            "the upstream server is PostgreSQL {value}; pgwarden supports PostgreSQL {} to {}",
            SUPPORTED_MAJORS.start(),
            SUPPORTED_MAJORS.end()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(extra: &[(&'static str, &'static str)]) -> Result<ServerSettings, PgError> {
        let mut p = vec![
            ("server_version", "15.8 (Debian 15.8-0+deb12u1)"),
            ("client_encoding", "UTF8"),
            ("standard_conforming_strings", "on"),
            ("integer_datetimes", "on"),
            ("session_authorization", "app"),
            ("is_superuser", "on"),
            ("DateStyle", "ISO, MDY"),
        ];
        for (n, v) in extra {
            p.retain(|(k, _)| k != n);
            p.push((n, v));
        }
        ServerSettings::at_login(p)
    }

    #[test]
    fn login_values_are_checked() {
        assert!(login(&[]).is_ok());
        for (name, value) in [
            ("standard_conforming_strings", "off"),
            ("client_encoding", "SJIS"),
            ("integer_datetimes", "off"),
            ("server_version", "12.3"),
            ("server_version", "19devel"),
            ("server_version", "banana"),
        ] {
            let e = login(&[(name, value)]).unwrap_err();
            assert!(e.is_fatal());
            assert!(
                e.message.contains(name) || e.message.contains(value),
                "{}",
                e.message
            );
        }
        assert!(login(&[("server_version", "18.1")]).is_ok());
        assert!(login(&[("server_version", "13.0")]).is_ok());
    }

    #[test]
    fn a_change_behind_the_gateway_ends_the_session() {
        let mut s = login(&[]).unwrap();
        // Harmless settings change freely.
        assert!(s.on_change("DateStyle", "German").is_ok());
        assert!(s.on_change("application_name", "x").is_ok());
        assert!(s.on_change("standard_conforming_strings", "on").is_ok());
        for (name, value) in [
            ("standard_conforming_strings", "off"),
            ("client_encoding", "SJIS"),
            ("session_authorization", "postgres"),
            ("is_superuser", "off"),
        ] {
            let e = s.on_change(name, value).unwrap_err();
            assert!(e.is_fatal());
            assert!(e.message.contains(name), "{}", e.message);
        }
        // A setting first reported mid-session (search_path on newer servers)
        // is not invented: only login values are pinned.
        assert!(s.on_change("search_path", "public").is_ok());
    }
}
