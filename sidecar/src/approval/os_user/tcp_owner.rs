//! The OS user behind a loopback TCP client (Linux): the kernel lists every
//! TCP socket of this network namespace, with its owner's uid, in
//! `/proc/net/tcp` and `/proc/net/tcp6`. The client's end of a connection
//! to us is the socket whose local address is the client's and whose remote
//! address is ours.
//!
//! Only a client on this host is in that table: one on loopback (or on one
//! of this host's own addresses) in the same network namespace. A client on
//! another machine, or behind another namespace's NAT, is not found and its
//! owner stays unknown.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const TABLES: [&str; 2] = ["/proc/net/tcp", "/proc/net/tcp6"];

/// Connection states in which the entry is a full socket with its owner's
/// uid. TIME_WAIT (06) and NEW_SYN_RECV (0C) entries are kernel-owned
/// leftovers that report uid 0, which would name root; LISTEN (0A) is no
/// client.
const OWNED_STATES: [&str; 7] = ["01", "04", "05", "07", "08", "09", "0B"];

/// Whether the table can know `client`: it is on this host (loopback, or
/// connected from the address it reached us on).
pub fn is_local(client: SocketAddr, server: SocketAddr) -> bool {
    let (c, s) = (canonical(client).ip(), canonical(server).ip());
    c.is_loopback() || c == s
}

/// The uid owning the client's end of the connection `client` → `server`,
/// read from the kernel's tables; `None` when it is not there (not local,
/// closed meanwhile, no procfs).
pub fn lookup(client: SocketAddr, server: SocketAddr) -> Option<u32> {
    let tables: Vec<String> = TABLES
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect();
    owner_in(tables.iter().map(String::as_str), client, server)
}

/// The owner of the client's socket in `/proc/net/tcp`-format `tables`.
/// Malformed lines are skipped; two owners for one address pair (which
/// the kernel never lists) answer `None` rather than guess.
pub fn owner_in<'a>(
    tables: impl IntoIterator<Item = &'a str>,
    client: SocketAddr,
    server: SocketAddr,
) -> Option<u32> {
    let (client, server) = (canonical(client), canonical(server));
    let mut found = None;
    for line in tables.into_iter().flat_map(str::lines) {
        let Some(entry) = Entry::parse(line) else {
            continue;
        };
        if entry.local != client || entry.remote != server || !OWNED_STATES.contains(&entry.state) {
            continue;
        }
        match found {
            None => found = Some(entry.uid),
            Some(uid) if uid == entry.uid => {}
            Some(_) => return None,
        }
    }
    found
}

/// One line of the table: `sl local remote st queues timer retransmits uid …`.
struct Entry<'a> {
    local: SocketAddr,
    remote: SocketAddr,
    state: &'a str,
    uid: u32,
}

impl<'a> Entry<'a> {
    fn parse(line: &'a str) -> Option<Self> {
        let f: Vec<&str> = line.split_whitespace().take(8).collect();
        let [_, local, remote, state, _, _, _, uid] = f.as_slice() else {
            return None;
        };
        Some(Entry {
            local: socket_addr(local)?,
            remote: socket_addr(remote)?,
            state,
            uid: decimal(uid)?,
        })
    }
}

/// `HEX:PORT`: the address as the kernel stores it (32-bit words of network
/// order bytes, printed as native integers), the port as a hex number.
fn socket_addr(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    if port.len() != 4
        || !ip
            .bytes()
            .chain(port.bytes())
            .all(|b| b.is_ascii_hexdigit())
    {
        return None;
    }
    let port = u16::from_str_radix(port, 16).ok()?;
    // All ASCII from here on: slicing by byte index cannot split a char.
    let word = |i: usize| {
        let w = ip.get(i * 8..i * 8 + 8)?;
        u32::from_str_radix(w, 16).ok().map(u32::to_ne_bytes)
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(canonical(SocketAddr::new(ip, port)))
}

fn decimal(s: &str) -> Option<u32> {
    // `parse` would accept a leading '+'; the kernel never prints one.
    s.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| s.parse().ok())?
}

/// An IPv4 client of a dual-stack socket appears as `::ffff:a.b.c.d` on one
/// side and as plain IPv4 on the other: compare them as IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

#[cfg(test)]
mod tests;
