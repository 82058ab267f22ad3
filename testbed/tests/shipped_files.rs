//! The scenario and link schedule files shipped in the repo parse and validate.

use flow_testbed::scenario::{Action, Scenario, ScenarioTimeline};
use flow_testbed::shaper::LinkSchedule;

#[test]
fn edge_restart_scenario() {
    let s = Scenario::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scenarios/edge_restart.toml"
    ))
    .unwrap();
    assert_eq!(s.topology.nodes.len(), 4);
    let mut t = ScenarioTimeline::new(&s);
    let first = t.poll_due(std::time::Duration::from_secs(25));
    assert_eq!(first.len(), 1);
    assert_eq!(
        (first[0].action.clone(), first[0].target.as_str()),
        (Action::Kill, "edge1")
    );
}

#[test]
fn wan_link_schedule() {
    let s = LinkSchedule::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/links/wan_degrading.toml"
    ))
    .unwrap();
    assert_eq!(s.steps.len(), 3);
}
