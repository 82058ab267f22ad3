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

/// Every scenario in testbed/scenarios/ parses, and only names services of the compose file.
#[test]
fn every_shipped_scenario_parses_against_the_compose_services() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios");
    let compose =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
            .unwrap();
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let s = Scenario::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            for node in &s.topology.nodes {
                assert!(
                    compose.contains(&format!("\n  {node}:\n")),
                    "{}: `{node}` is not a compose service",
                    p.display()
                );
            }
            n += 1;
        }
    }
    assert!(n >= 3, "scenarios found: {n}");
}
