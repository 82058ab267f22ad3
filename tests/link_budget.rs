//! Link probes within a byte budget, on real agents over loopback QUIC: an idle link that
//! no planner reads sends only the tiny liveness probe each round; once the estimate is
//! read for a decision, a goodput probe goes (the estimate is stale) and then stops again
//! while the estimate is fresh. Byte counts, not wall-clock timings, are asserted.

use std::time::Duration;

use flow_node::agent::wait_until;
use flow_node::parent::{ProbeBudget, ProbeConfig};
use flow_node::Agent;
use flow_protocol::Role;

mod common;

const BOUND: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_link_sends_only_liveness_probes_until_a_decision_needs_goodput() {
    let dir = common::tiny_family_without_eos();
    let edge = Agent::start(common::node_config(dir.path(), Role::Edge, "edge", 1, 3))
        .await
        .expect("edge starts");
    let mut d = common::node_config(dir.path(), Role::Device, "device", 0, 1);
    d.parent = Some((edge.local_addr().unwrap(), "edge".into()));
    d.probe = ProbeConfig {
        interval: Some(Duration::from_millis(50)),
        budget: ProbeBudget {
            // Rounds every 50 ms cost ~6 KB/s by themselves: a budget that leaves room for
            // goodput probes (what the budget allows is the unit tests' business).
            bytes_per_s: 1e6,
            // Fresh for the rest of the test once the first samples are in.
            goodput_refresh: Duration::from_secs(3600),
            ..ProbeBudget::default()
        },
        ..ProbeConfig::default()
    };
    let device = Agent::start(d).await.expect("device starts");
    let parent = device.parents().unwrap().active();

    // Idle, nobody plans: liveness probes only.
    assert!(wait_until(BOUND, || parent.probe_rounds() >= 10).await);
    assert_eq!(parent.goodput_probes(), 0);
    assert_eq!(parent.goodput_samples(), 0);
    let idle_wire = parent.wire_bytes();
    assert!(idle_wire > 0, "QUIC's counters are read");

    // A decision reads the estimate: it is stale (no sample), so goodput probes go until
    // the estimate has its minimum of samples.
    let want = ProbeBudget::default().min_goodput_samples;
    assert!(
        wait_until(BOUND, || {
            let _ = parent.planning_estimate();
            parent.goodput_samples() >= want
        })
        .await,
        "goodput samples: {}",
        parent.goodput_samples()
    );
    let sent = parent.goodput_probes();
    assert!(sent >= want, "{sent} goodput probes");
    assert!(
        parent.wire_bytes() - idle_wire > (want - 1) * 8192,
        "the goodput probes' bytes are on the wire: {} -> {} B",
        idle_wire,
        parent.wire_bytes()
    );

    // Fresh now: further reads and rounds send liveness probes only again.
    let rounds = parent.probe_rounds();
    assert!(
        wait_until(BOUND, || {
            let _ = parent.planning_estimate();
            parent.probe_rounds() >= rounds + 10
        })
        .await
    );
    assert_eq!(
        parent.goodput_probes(),
        sent,
        "no goodput probe for a fresh estimate"
    );
    device.shutdown().await;
    edge.shutdown().await;
}
