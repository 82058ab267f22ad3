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

/// Every scenario in testbed/scenarios/ parses, and only names services of its compose
/// files (the base one and the scenario's `compose_overrides`) and links of their shaper.
#[test]
fn every_shipped_scenario_parses_against_the_compose_services() {
    let root = env!("CARGO_MANIFEST_DIR");
    let read = |f: &str| {
        std::fs::read_to_string(format!("{root}/{f}")).unwrap_or_else(|e| panic!("{f}: {e}"))
    };
    let mut n = 0;
    let mut with_overrides = 0;
    for e in std::fs::read_dir(format!("{root}/scenarios")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let s = Scenario::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let mut files = vec![read("docker-compose.yml")];
            files.extend(s.topology.compose_overrides.iter().map(|o| read(o)));
            with_overrides += usize::from(files.len() > 1);
            // an override's `links` command replaces the base one
            let shaper = files
                .iter()
                .rev()
                .find(|f| f.contains("testbed shape"))
                .expect("a shaper command");
            for node in &s.topology.nodes {
                assert!(
                    files.iter().any(|f| f.contains(&format!("\n  {node}:\n"))),
                    "{}: `{node}` is not a compose service",
                    p.display()
                );
            }
            for link in &s.topology.links {
                let (a, b) = link.split_once(':').unwrap();
                assert!(
                    shaper.contains(&format!("name={a}:{b},"))
                        || shaper.contains(&format!("name={b}:{a},")),
                    "{}: link `{link}` is not a shaped link of its compose files",
                    p.display()
                );
            }
            n += 1;
        }
    }
    assert!(n >= 5 && with_overrides >= 2, "scenarios found: {n}");
}
