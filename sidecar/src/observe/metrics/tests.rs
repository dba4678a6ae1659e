use std::sync::atomic::Ordering::Relaxed;

use super::*;

fn ship(shipped: u64, oldest: i64) -> Arc<ship::driver::Progress> {
    let p = ship::driver::Progress::default();
    p.shipped_seq.store(shipped, Relaxed);
    p.oldest_unshipped.store(oldest, Relaxed);
    Arc::new(p)
}

#[test]
fn recording_gauges_follow_the_writer_and_the_slowest_store() {
    let spool = spool::Progress::default();
    spool.accepted.store(10, Relaxed);
    spool.settled.store(7, Relaxed);
    spool.durable_seq.store(107, Relaxed);
    let r = recording(Some(&spool), &[ship(100, 990), ship(105, 998)], 1000);
    assert_eq!(
        r,
        Recording {
            unwritten: 3,
            unshipped: 7,
            lag_seconds: 10,
        }
    );
    // Caught up, or no store: nothing waits.
    let r = recording(Some(&spool), &[ship(107, 0)], 1000);
    assert_eq!((r.unshipped, r.lag_seconds), (0, 0));
    assert_eq!(
        recording(None, &[], 1000),
        Recording {
            unwritten: 0,
            unshipped: 0,
            lag_seconds: 0,
        }
    );
    // A clock that went back never shows a negative lag.
    assert_eq!(recording(None, &[ship(0, 2000)], 1000).lag_seconds, 0);
}

#[test]
fn refusals_are_counted_per_policy_and_rule() {
    let m = Metrics::new();
    m.statements_refused
        .with_label_values(&["default/shop", "no-deletes"])
        .inc();
    m.statements_refused
        .with_label_values(&["default/shop", "default"])
        .inc();
    let text = m.render();
    assert!(
        text.contains(
            r#"pgwarden_statements_refused_total{policy="default/shop",rule="no-deletes"} 1"#
        ),
        "{text}"
    );
    for name in [
        "pgwarden_approvals_pending 0",
        "pgwarden_recording_shipping_lag_seconds 0",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
}
