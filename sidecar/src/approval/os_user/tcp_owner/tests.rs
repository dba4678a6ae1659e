use super::*;

// Lines as a little-endian kernel prints them (captured, uids changed): a
// listener on 127.0.0.1:41279, a client 127.0.0.1:59538 (uid 1000)
// connected to it, and the gateway's accepted end (uid 0).
const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:A13F 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1712288 1 00000000626ae888 100 0 0 10 0
   2: 0100007F:E892 0100007F:A13F 01 00000000:00000000 00:00000000 00000000  1000        0 1712289 2 0000000040b591d4 20 0 0 10 -1
   3: 0100007F:A13F 0100007F:E892 01 00000000:00000000 00:00000000 00000000     0        0 1712290 1 0000000039039ebe 20 0 0 10 -1
   4: 0100007F:E893 0100007F:A13F 06 00000000:00000000 03:00001234 00000000     0        0 0 3 0000000000000000
";

// A dual-stack listener on [::]:52579: a client [::1]:32944 (uid 1001),
// and the gateway's end of an IPv4 client 127.0.0.1:45070 (v4-mapped).
const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   1: 00000000000000000000000001000000:CD63 00000000000000000000000001000000:80B0 01 00000000:00000000 00:00000000 00000000     0        0 1712297 1 0000000015a98d66 20 0 0 10 -1
   2: 00000000000000000000000001000000:80B0 00000000000000000000000001000000:CD63 01 00000000:00000000 00:00000000 00000000  1001        0 1712296 2 00000000d1915b01 20 0 0 10 -1
   3: 0000000000000000FFFF00000100007F:CD63 0000000000000000FFFF00000100007F:B00E 01 00000000:00000000 00:00000000 00000000     0        0 1712295 1 00000000876b5fcc 20 0 0 10 -1
";

// The IPv4 client of that dual-stack listener, in the IPv4 table.
const TCP_DUAL: &str =
    "   7: 0100007F:B00E 0100007F:CD63 01 00000000:00000000 00:00000000 00000000  1002        0 1712294 2 0000000040b591d4 20 0 0 10 -1\n";

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[cfg(target_endian = "little")]
#[test]
fn the_clients_end_of_the_connection_names_its_owner() {
    let server = sa("127.0.0.1:41279");
    assert_eq!(owner_in([TCP], sa("127.0.0.1:59538"), server), Some(1000));
    // Our own end (local = server) is never taken for the client's.
    assert_eq!(owner_in([TCP], server, sa("127.0.0.1:59538")), Some(0));
    assert_eq!(owner_in([TCP], sa("127.0.0.1:59539"), server), None);
    assert_eq!(
        owner_in([TCP6, TCP], sa("[::1]:32944"), sa("[::1]:52579")),
        Some(1001)
    );
}

#[cfg(target_endian = "little")]
#[test]
fn a_v4_client_of_a_dual_stack_listener_is_found_by_its_v4_address() {
    // The gateway sees [::ffff:127.0.0.1]:45070 → [::ffff:127.0.0.1]:52579.
    let client = sa("[::ffff:127.0.0.1]:45070");
    let server = sa("[::ffff:127.0.0.1]:52579");
    assert_eq!(owner_in([TCP6, TCP_DUAL], client, server), Some(1002));
    assert!(is_local(client, server));
}

#[cfg(target_endian = "little")]
#[test]
fn time_wait_leftovers_do_not_name_root() {
    // 59539's only entry is TIME_WAIT, whose uid 0 is the kernel's.
    assert_eq!(
        owner_in([TCP], sa("127.0.0.1:59539"), sa("127.0.0.1:41279")),
        None
    );
}

#[cfg(target_endian = "little")]
#[test]
fn two_owners_for_one_pair_is_no_answer() {
    let twice = format!(
        "{TCP}{}",
        TCP.lines().nth(2).unwrap().replace(" 1000 ", " 1234 ")
    );
    assert_eq!(
        owner_in(
            [twice.as_str()],
            sa("127.0.0.1:59538"),
            sa("127.0.0.1:41279")
        ),
        None
    );
}

#[test]
fn hostile_lines_are_skipped_without_panicking() {
    let server = sa("127.0.0.1:41279");
    let client = sa("127.0.0.1:59538");
    let good = TCP.lines().nth(2).unwrap();
    let hostile = [
        "",
        ":",
        "0: : : : : : : :",
        "0: 0100007F:E892",
        "0: 0100007F:E892 0100007F:A13F 01 x x x",
        "0: 0100007F:E892 0100007F:A13F 01 a b c -1",
        "0: 0100007F:E892 0100007F:A13F 01 a b c +1000",
        "0: 0100007F:E892 0100007F:A13F 01 a b c 99999999999999999999",
        "0: 0100007F:+892 0100007F:A13F 01 a b c 1000",
        "0: 0100007F:E8920 0100007F:A13F 01 a b c 1000",
        "0: 0100007é:E892 0100007F:A13F 01 a b c 1000",
        "0: 0100007F0:E892 0100007F:A13F 01 a b c 1000",
        "0: ééééééééééééééé:E892 0100007F:A13F 01 a b c 1000",
        "0: 000000000000000000000000010000éé:80B0 0100007F:A13F 01 a b c 1000",
        "0: 0100007F:E892:1 0100007F:A13F 01 a b c 1000",
        "\u{0}\u{ffff}\t\r",
    ];
    for line in hostile {
        assert_eq!(owner_in([line], client, server), None, "{line:?}");
    }
    // Garbage around a real line does not hide it (little-endian layout).
    let mixed = format!("{}\n{good}\n{}", hostile.join("\n"), hostile.join("\n"));
    if cfg!(target_endian = "little") {
        assert_eq!(owner_in([mixed.as_str()], client, server), Some(1000));
    }
}

#[test]
fn only_clients_on_this_host_are_looked_up() {
    let server = sa("10.0.0.5:6432");
    assert!(is_local(sa("127.0.0.1:5000"), sa("127.0.0.1:6432")));
    assert!(is_local(sa("[::1]:5000"), sa("[::1]:6432")));
    assert!(is_local(sa("10.0.0.5:5000"), server));
    assert!(!is_local(sa("10.0.0.6:5000"), server));
}

#[test]
fn this_processs_own_loopback_connection_is_found_in_the_kernels_table() {
    // The real table, through the same path the gateway takes.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (_accepted, peer) = listener.accept().unwrap();
    assert_eq!(peer, client.local_addr().unwrap());
    let me = std::fs::metadata("/proc/self").map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid()
    });
    assert_eq!(lookup(peer, listener.local_addr().unwrap()), me.ok());
}
