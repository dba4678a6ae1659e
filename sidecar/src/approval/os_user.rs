//! OS users in standalone approvals: who asked (the uid the kernel reports
//! for a Unix-socket client, or owning a loopback TCP client's socket:
//! `tcp_owner`) and who decides (the uid running `pgwarden approvals`), by
//! name.
//!
//! Names come from `/etc/passwd` and `/etc/group` (the crate forbids
//! `unsafe`, so no `getpwuid_r`); a uid without an entry (e.g. only in
//! LDAP) is named `uid N`, which `approvers.users` can list as such. The
//! environment (`$USER`) is never asked: a process sets it at will.

use std::os::unix::fs::MetadataExt;

pub mod tcp_owner;

/// What a request records as its client's OS user when the kernel did not
/// tell (a TCP client not on this host, or not found): the same user may
/// then decide, as only the subject and service-account checks apply.
pub const UNKNOWN: &str = "unknown";

/// The name of `uid` in passwd-format `text`.
pub fn name_in(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut f = line.split(':');
        let name = f.next().filter(|n| !n.is_empty())?;
        let id: u32 = f.nth(1)?.parse().ok()?;
        (id == uid).then(|| name.to_owned())
    })
}

/// The groups `user` (primary group `gid`) belongs to in group-format `text`.
pub fn groups_in(group: &str, user: &str, gid: Option<u32>) -> Vec<String> {
    group
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            let [name, _, id, members] = f.as_slice() else {
                return None;
            };
            let primary = gid.is_some_and(|g| id.parse() == Ok(g));
            let member = members.split(',').any(|m| m == user);
            (!name.is_empty() && (primary || member)).then(|| (*name).to_owned())
        })
        .collect()
}

/// What `uid` is called on this machine.
pub fn name_of(uid: u32) -> String {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| name_in(&p, uid))
        .unwrap_or_else(|| format!("uid {uid}"))
}

/// This process's user (the owner of `/proc/self` is its effective uid)
/// and that user's groups.
pub fn current() -> Option<(String, Vec<String>)> {
    let meta = std::fs::metadata("/proc/self").ok()?;
    let name = name_of(meta.uid());
    let groups = std::fs::read_to_string("/etc/group")
        .map(|g| groups_in(&g, &name, Some(meta.gid())))
        .unwrap_or_default();
    Some((name, groups))
}

#[cfg(test)]
mod tests;
