//! The session on virtual time, against scripted engines and parents (`pair.rs`).

use std::time::Duration;

use flow_partition::{DegradePolicy, DegradeReason};
use flow_protocol::{
    Backfill, Continue, Encoding, ErrorCode, ExitThreshold, InferMode, Message, Policy, Role,
    Sampling, WireTensor,
};
use tokio::time::Instant;

use super::pair::{rows, FakeEngine, FakeParent, Fate, Outcome, Pair, Script, H};
use super::{to_wire, EntryRequest, Session, SessionConfig};
use crate::engine::Stage;
use crate::error::NodeError;

pub(super) const PROMPT: usize = 3;
pub(super) const MS: Duration = Duration::from_millis(1);

/// The full model's token at position `p`.
pub(super) fn reference(p: usize) -> u32 {
    ((p * 7 + 3) % 31) as u32
}

pub(super) fn script(f: fn(usize) -> u32) -> Script {
    Box::new(f)
}

/// A wrong token for position `p` (never `reference(p)`).
pub(super) fn wrong(p: usize) -> u32 {
    (reference(p) + 1) % 31
}

fn escalate(threshold: f32) -> Policy {
    Policy {
        mode: InferMode::Escalate,
        thresholds: vec![ExitThreshold { exit: 1, threshold }],
        ..Policy::default()
    }
}

pub(super) fn config(policy: Policy, role: Role, stage: Stage, parents: usize) -> SessionConfig {
    SessionConfig {
        id: 7,
        request: 1,
        role,
        stage,
        policy,
        sampling: Sampling::default(),
        has_parent: parents > 0,
        keep_history: parents > 1,
        encoding: None,
        degrade: DegradePolicy::default(),
    }
}

pub(super) const DEVICE: Stage = Stage {
    a: 0,
    b: 1,
    exit: true,
};

/// An entry session generating `n` tokens after a `PROMPT`-token prompt.
pub(super) fn entry(
    policy: Policy,
    parents: Vec<FakeParent>,
    engine: FakeEngine,
    n: usize,
) -> Pair {
    let now = Instant::now();
    let cfg = config(policy, Role::Device, DEVICE, parents.len());
    let req = EntryRequest {
        prompt: vec![1; PROMPT],
        max_new_tokens: n,
        stop: vec![],
    };
    Pair::new(Session::entry(cfg, req, now), engine, parents, now)
}

pub(super) fn parent(fate: impl FnMut(usize) -> Fate + 'static) -> FakeParent {
    FakeParent::new(script(reference), fate)
}

pub(super) fn fast(_: usize) -> Fate {
    Fate::Reply(10 * MS)
}

/// A parent that answers its first `k` messages and then falls silent.
pub(super) fn dies_after(k: usize) -> FakeParent {
    parent(move |i| if i < k { fast(i) } else { Fate::Silent })
}

/// Every position after the prompt exactly once, in order.
pub(super) fn check_positions(p: &Pair, n: usize) {
    let got: Vec<usize> = p.tokens.iter().map(|t| t.0.position as usize).collect();
    assert_eq!(
        got,
        (PROMPT..PROMPT + n).collect::<Vec<_>>(),
        "{:?}",
        p.tokens
    );
}

pub(super) fn ids(p: &Pair) -> Vec<u32> {
    p.tokens.iter().map(|t| t.0.id).collect()
}

pub(super) fn want(n: usize) -> Vec<u32> {
    (PROMPT..PROMPT + n).map(reference).collect()
}

#[test]
fn escalate_always_answers_every_token_from_the_parent() {
    let engine = FakeEngine::new(script(wrong), |_| true);
    let mut p = entry(escalate(2.0), vec![parent(fast)], engine, 6);
    assert!(matches!(p.run(), Outcome::Done("length")));
    check_positions(&p, 6);
    assert_eq!(ids(&p), want(6));
    assert!(p.tokens.iter().all(|t| t.0.tier == Role::Cloud && !t.1));
    assert_eq!(p.session.stats().hops, 6);
}

#[test]
fn answered_positions_are_owed_and_backfilled_in_order() {
    // Confident (answered at the device) except every third position.
    let engine = FakeEngine::new(script(reference), |p| p % 3 != 0);
    let mut p = entry(escalate(0.5), vec![parent(fast)], engine, 10);
    assert!(matches!(p.run(), Outcome::Done("length")));
    check_positions(&p, 10);
    assert_eq!(ids(&p), want(10));
    for (t, _) in &p.tokens {
        let up = t.position % 3 == 0;
        assert_eq!(t.tier, if up { Role::Cloud } else { Role::Device }, "{t:?}");
    }
    // The parent checked every backfill continued its KV; some carried several rows.
    let backfilled = p
        .sent
        .iter()
        .filter(|(_, m)| matches!(m, Message::Continue(c) if c.backfill.is_some()));
    assert!(backfilled.count() >= 2);
}

#[test]
fn a_stop_token_ends_the_request() {
    let engine = FakeEngine::new(script(reference), |_| true);
    let now = Instant::now();
    let cfg = config(escalate(0.5), Role::Device, DEVICE, 0);
    let req = EntryRequest {
        prompt: vec![1; PROMPT],
        max_new_tokens: 10,
        stop: vec![reference(PROMPT + 2)],
    };
    let mut p = Pair::new(Session::entry(cfg, req, now), engine, vec![], now);
    assert!(matches!(p.run(), Outcome::Done("stop")));
    check_positions(&p, 3);
}

#[test]
fn a_lost_parent_fails_over_with_every_state_resent() {
    let engine = FakeEngine::new(script(reference), |_| true);
    // Escalates every token, with the local exit computed (threshold not above 1).
    let dies = dies_after(3);
    let mut p = entry(escalate(0.999), vec![dies, parent(fast)], engine, 8);
    assert!(matches!(p.run(), Outcome::Done("length")));
    check_positions(&p, 8);
    // The step in flight is retried on the new parent: nothing degraded, the undisturbed
    // output.
    assert!(
        p.tokens.iter().all(|t| !t.1 && t.0.tier == Role::Cloud),
        "{:?}",
        p.tokens
    );
    assert!(p.degrades.is_empty());
    assert_eq!((p.timeouts, p.resets, p.failovers), (1, 1, 1));
    assert_eq!(p.session.stats().failovers, 1);
    // The new parent got positions 0.. from the first message (its KV checks passed).
    let Message::Continue(c) = &p.parents[1].received[0] else {
        panic!("not a Continue")
    };
    assert_eq!(c.backfill.as_ref().unwrap().start, 0);
    assert_eq!(p.parents[1].kv, PROMPT + 7);
    // Each parent's stream started with the session's Open: one each, the same request.
    let opens: Vec<_> = p.parents.iter().map(|q| q.opens.clone()).collect();
    assert_eq!((opens[0].len(), opens[1].len()), (1, 1));
    assert_eq!(opens[0][0], opens[1][0]);
    assert_eq!(ids(&p), want(8));
}

#[test]
fn a_late_reply_after_fail_over_is_ignored() {
    let engine = FakeEngine::new(script(wrong), |_| true);
    // The third reply comes 150 ms late (deadline 100 ms), while the session already runs
    // on the second parent.
    let late = parent(|i| Fate::Reply(if i == 2 { 150 * MS } else { 10 * MS }));
    let slow = parent(|_| Fate::Reply(30 * MS));
    let mut p = entry(escalate(0.999), vec![late, slow], engine, 8);
    assert!(matches!(p.run(), Outcome::Done("length")));
    check_positions(&p, 8);
    // Position PROMPT + 2 was answered once, by the second parent (the step moved with
    // the session) — not by the late reply, which is never acted on.
    assert!(
        p.tokens.iter().all(|t| !t.1 && t.0.tier == Role::Cloud),
        "{:?}",
        p.tokens
    );
    assert_eq!(ids(&p), want(8));
    assert_eq!(p.parents[1].received.len(), 6);
    assert_eq!(p.timeouts, 1);
    p.drain();
}

#[test]
fn a_slow_parent_still_heard_from_is_waited_for() {
    let engine = FakeEngine::new(script(wrong), |_| true);
    // Replies take 700 ms (first deadline 100 ms), but the parent is alive throughout:
    // every token comes from it, nothing degraded, no fail-over to the fast second parent.
    let mut slow = parent(|_| Fate::Reply(700 * MS));
    slow.alive = true;
    slow.patience = Duration::from_secs(5);
    let mut p = entry(escalate(0.999), vec![slow, parent(fast)], engine, 4);
    assert!(matches!(p.run(), Outcome::Done("length")));
    check_positions(&p, 4);
    assert!(
        p.tokens.iter().all(|t| !t.1 && t.0.tier == Role::Cloud),
        "{:?}",
        p.tokens
    );
    assert_eq!((p.timeouts, p.failovers), (0, 0));
    // 100 ms, then liveness checks every 250 ms: 3 per token.
    assert_eq!(p.session.stats().slow_replies, 4 * 3);
    // The parent's budget is the whole patience, not the first deadline.
    let Message::Continue(c) = &p.sent[0].1 else {
        panic!()
    };
    assert_eq!(c.deadline_ms, Some(5000));
    p.drain();
}

#[test]
fn a_parent_heard_from_but_never_answering_is_lost_after_its_patience() {
    let engine = FakeEngine::new(script(wrong), |_| true);
    let mut wedged = parent(|i| if i < 1 { fast(i) } else { Fate::Silent });
    wedged.alive = true;
    wedged.patience = Duration::from_secs(1);
    let mut p = entry(escalate(0.999), vec![wedged, parent(fast)], engine, 4);
    let t0 = p.now;
    assert!(matches!(p.run(), Outcome::Done("length")));
    check_positions(&p, 4);
    // Token 2 went to the wedged parent; after 1 s the second parent took the session over.
    assert!(
        p.tokens.iter().all(|t| !t.1 && t.0.tier == Role::Cloud),
        "{:?}",
        p.tokens
    );
    assert_eq!(p.failovers, 1);
    let waited = p.now.saturating_duration_since(t0);
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_millis(1200),
        "{waited:?}"
    );
}

#[test]
fn with_no_other_parent_the_rest_is_answered_degraded() {
    let engine = FakeEngine::new(script(wrong), |_| true);
    let dies = parent(|i| if i < 2 { fast(i) } else { Fate::Lost(5 * MS) });
    let mut p = entry(escalate(0.999), vec![dies], engine, 7);
    assert!(matches!(p.run(), Outcome::Done("length")));
    check_positions(&p, 7);
    assert!(p.tokens[..2]
        .iter()
        .all(|t| !t.1 && t.0.tier == Role::Cloud));
    assert!(p.tokens[2..]
        .iter()
        .all(|t| t.1 && t.0.tier == Role::Device));
    assert_eq!(p.sent.len(), 3, "no escalation after the loss");
    assert_eq!(p.degrades.len(), 5);
    assert_eq!(p.session.stats().failovers, 0);
}

#[test]
fn an_unreachable_parent_is_not_tried() {
    let engine = FakeEngine::new(script(wrong), |_| true);
    let mut down = parent(fast);
    down.down = true;
    let mut p = entry(escalate(0.999), vec![down], engine, 4);
    assert!(matches!(p.run(), Outcome::Done("length")));
    assert!(p.sent.is_empty());
    assert!(p.tokens.iter().all(|t| t.1));
    assert_eq!(p.timeouts, 0);
}

#[test]
fn an_error_reply_loses_the_parent_and_an_early_timeout_does_nothing() {
    let engine = FakeEngine::new(script(wrong), |_| true);
    let err = Message::error(ErrorCode::Internal, "boom", None);
    let bad = parent(move |_| Fate::Send(10 * MS, err.clone()));
    let mut p = entry(escalate(0.999), vec![bad], engine, 2);
    assert!(p.pump().is_none());
    let deadline = p.session.poll_timeout().expect("waiting for the parent");
    p.session.on_timeout(deadline - MS);
    assert!(p.session.poll_action().is_none());
    assert_eq!(p.session.poll_timeout(), Some(deadline));
    assert!(matches!(p.run(), Outcome::Done("length")));
    assert!(p.tokens.iter().all(|t| t.1), "{:?}", p.tokens);
    assert_eq!((p.sent.len(), p.timeouts), (1, 0));
}

// ----- upper tiers ------------------------------------------------------------------------

pub(super) const EDGE: Stage = Stage {
    a: 1,
    b: 3,
    exit: true,
};

/// The top tier: no parent, answers everything.
pub(super) const CLOUD: Stage = Stage {
    a: 1,
    b: 4,
    exit: true,
};

pub(super) fn child(
    policy: Policy,
    stage: Stage,
    parents: Vec<FakeParent>,
    engine: FakeEngine,
) -> Pair {
    let now = Instant::now();
    let cfg = config(policy, Role::Edge, stage, parents.len());
    Pair::new(Session::child(cfg, None, now), engine, parents, now)
}

fn continue_msg(
    start: usize,
    n: usize,
    backfill: Option<usize>,
    deadline_ms: Option<u32>,
) -> Continue {
    let enc = Encoding::F32;
    Continue {
        start: start as u32,
        hidden: to_wire(&rows(start, n), enc).unwrap(),
        backfill: backfill.map(|s| Backfill {
            start: s as u32,
            hidden: to_wire(&rows(s, start - s), enc).unwrap(),
        }),
        deadline_ms,
    }
}

fn tokens(o: Outcome) -> (flow_protocol::TokenOut, bool) {
    match o {
        Outcome::Reply(Message::Tokens(t)) => (t.tokens[0].clone(), t.degraded),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_upper_tier_forwards_its_own_and_its_childs_owed_rows_in_order() {
    // The edge is confident at odd positions: it answers those and owes their states.
    let engine = FakeEngine::new(script(reference), |p| p % 2 == 1);
    let mut p = child(escalate(0.5), EDGE, vec![parent(fast)], engine);
    let now = p.now;
    // Prefill 0..3 → answers 3 itself (owes 0..3).
    p.session
        .on_continue(continue_msg(0, 3, None, None), H, now);
    assert_eq!(tokens(p.run()).0.tier, Role::Edge);
    // The device answered 4 and 5 itself: they come as a backfill with step 6 → position 7
    // is answered here too.
    p.session
        .on_continue(continue_msg(6, 1, Some(3), None), H, now);
    assert_eq!(tokens(p.run()).0.position, 7);
    // Step 7 → position 8 is not confident: escalated with every owed row 0..7 in order.
    p.session
        .on_continue(continue_msg(7, 1, None, None), H, now);
    let (t, degraded) = tokens(p.run());
    assert_eq!(
        (t.position, t.tier, t.id, degraded),
        (8, Role::Cloud, reference(8), false)
    );
    let Message::Continue(c) = &p.sent[0].1 else {
        panic!()
    };
    let b = c.backfill.as_ref().unwrap();
    assert_eq!((b.start, b.rows()), (0, 7));
    assert_eq!(p.parents[0].kv, 8);
}

#[test]
fn out_of_order_backfill_and_positions_are_refused() {
    // (name, messages, what the last one's error names)
    let cases: Vec<(&str, Vec<Continue>, &str)> = vec![
        // A gap: the session holds 0..3, the backfill starts at 5.
        (
            "gap",
            vec![
                continue_msg(0, 3, None, None),
                continue_msg(7, 1, Some(5), None),
            ],
            "starts at position 5",
        ),
        // A replay of positions already held.
        (
            "replay",
            vec![
                continue_msg(0, 3, None, None),
                continue_msg(2, 1, None, None),
            ],
            "starts at position 2",
        ),
        // A backfill that does not end where the step starts.
        (
            "detached",
            vec![{
                let mut c = continue_msg(3, 1, Some(0), None);
                c.start = 4;
                c
            }],
            "do not end where the step starts (4)",
        ),
        // No rows.
        (
            "rows",
            vec![{
                let mut c = continue_msg(0, 3, None, None);
                c.hidden = WireTensor::encode(&[], &[0, H], Encoding::F32).unwrap();
                c
            }],
            "no rows",
        ),
        // Rows of another width.
        (
            "width",
            vec![{
                let mut c = continue_msg(0, 3, None, None);
                c.hidden = to_wire(&rows(0, 3).narrow(1, 0, 2).unwrap(), Encoding::F32).unwrap();
                c
            }],
            "expected [rows, 4]",
        ),
    ];
    for (name, msgs, why) in cases {
        let engine = FakeEngine::new(script(reference), |_| true);
        let mut p = child(escalate(0.5), CLOUD, vec![], engine);
        let n = msgs.len();
        for (i, c) in msgs.into_iter().enumerate() {
            let now = p.now;
            p.session.on_continue(c, H, now);
            let out = p.run();
            if i + 1 < n {
                assert!(matches!(out, Outcome::Reply(_)), "{name}: {out:?}");
            } else {
                let Outcome::Failed(e) = out else {
                    panic!("{name}: {out:?}")
                };
                assert_eq!(e.code(), ErrorCode::Malformed, "{name}: {e}");
                assert!(e.to_string().contains(why), "{name}: {e}");
            }
        }
    }
}

#[test]
fn a_deadline_the_parent_would_miss_is_answered_degraded_without_asking() {
    let engine = FakeEngine::new(script(wrong), |_| false);
    let mut up = parent(fast);
    up.rtt_ms = 50.0;
    let mut p = child(escalate(0.5), EDGE, vec![up], engine);
    let now = p.now;
    // 40 ms left, the round trip alone takes 50: degraded, nothing sent.
    p.session
        .on_continue(continue_msg(0, 3, None, Some(40)), H, now);
    let (t, degraded) = tokens(p.run());
    assert!(degraded && t.tier == Role::Edge, "{t:?}");
    assert!(p.sent.is_empty());
    assert!(matches!(
        p.degrades[..],
        [DegradeReason::DeadlineTooClose { .. }]
    ));
    // Enough time: escalated, with the rows the parent has not seen as a backfill.
    let now = p.now;
    p.session
        .on_continue(continue_msg(3, 1, None, Some(1000)), H, now);
    let (t, degraded) = tokens(p.run());
    assert!(!degraded && t.tier == Role::Cloud);
    let Message::Continue(c) = &p.sent[0].1 else {
        panic!()
    };
    let b = c.backfill.as_ref().unwrap();
    assert_eq!((b.start, b.rows()), (0, 3));
    // The parent's reply deadline is within the child's budget.
    assert!(c.deadline_ms.unwrap() <= 100);
}

#[test]
fn a_tier_without_an_exit_retries_the_step_on_the_next_parent_or_fails() {
    let relay = Stage {
        a: 1,
        b: 2,
        exit: false,
    };
    for parents in [1, 2] {
        let engine = FakeEngine::new(script(reference), |_| true);
        let mut ps = vec![parent(|_| Fate::Silent)];
        if parents == 2 {
            ps.push(parent(fast));
        }
        let mut p = child(escalate(0.5), relay, ps, engine);
        let now = p.now;
        p.session
            .on_continue(continue_msg(0, 3, None, None), H, now);
        let out = p.run();
        if parents == 2 {
            let (t, degraded) = tokens(out);
            assert_eq!((t.position, t.id, degraded), (3, reference(3), false));
            let Message::Continue(c) = &p.parents[1].received[0] else {
                panic!()
            };
            assert!(c.backfill.is_none(), "the step's own rows are its input");
        } else {
            assert!(
                matches!(out, Outcome::Failed(NodeError::Parent { .. })),
                "{out:?}"
            );
        }
    }
}

#[test]
fn route_past_a_lost_parent_answers_from_this_exit_with_its_kv_complete() {
    // Route to the cloud's exit; the parent answers two steps, then falls silent. No other
    // parent: the rest comes from the device's exit (the engine asserts its exit KV has no
    // hole), every such token degraded.
    let route = Policy {
        mode: InferMode::Route,
        answer_exit: Some(9),
        ..Policy::default()
    };
    let engine = FakeEngine::new(script(wrong), |_| true);
    let mut p = entry(route, vec![dies_after(2)], engine, 8);
    assert!(matches!(p.run(), Outcome::Done("length")));
    check_positions(&p, 8);
    assert!(p.tokens[..2]
        .iter()
        .all(|t| !t.1 && t.0.tier == Role::Cloud));
    for (t, degraded) in &p.tokens[2..] {
        assert!(*degraded && t.tier == Role::Device, "{t:?}");
        assert_eq!(
            t.id,
            wrong(t.position as usize),
            "the device exit's own token"
        );
    }
    assert_eq!(p.degrades.len(), 6, "{:?}", p.degrades);
    assert_eq!(
        p.engine.truncations.first(),
        Some(&(PROMPT + 1)),
        "the lost step (input: the token at PROMPT + 1) ran again from where it started"
    );
    assert_eq!(
        p.engine.exit_backfills, 1,
        "the skipped exit caught up once"
    );
}

#[test]
fn escalate_always_skips_the_exit_until_a_lost_parent_needs_it() {
    // Escalate-always never answers at the device: its exit block does not run while the
    // parent answers (the engine's exit KV stays empty). The parent is lost on the third
    // step; the exit then fills its KV from the kept states in one batch and answers the
    // rest, degraded, from a KV without holes (the engine asserts it).
    let engine = FakeEngine::new(script(wrong), |_| true);
    let mut p = entry(escalate(2.0), vec![dies_after(2)], engine, 6);
    assert!(matches!(p.run(), Outcome::Done("length")));
    check_positions(&p, 6);
    assert_eq!(&ids(&p)[..2], &want(2)[..]);
    assert!(p.tokens[2..]
        .iter()
        .all(|t| t.1 && t.0.tier == Role::Device));
    assert_eq!(
        p.engine.exit_backfills, 1,
        "one catch-up, then the exit runs each step"
    );
    assert_eq!(p.engine.exit_kv, p.engine.kv);
}

#[test]
fn escalate_always_without_a_failure_never_runs_the_exit() {
    let engine = FakeEngine::new(script(wrong), |_| true);
    let mut p = entry(escalate(2.0), vec![parent(fast)], engine, 5);
    assert!(matches!(p.run(), Outcome::Done("length")));
    assert_eq!(ids(&p), want(5));
    assert_eq!((p.engine.exit_kv, p.engine.exit_backfills), (0, 0));
}

#[test]
fn the_open_names_the_stage_and_what_is_left_of_the_request_budget() {
    let now = Instant::now();
    let cfg = config(escalate(0.5), Role::Edge, EDGE, 1);
    let s = Session::child(cfg, Some(500), now);
    let Message::Open(o) = s.open_message(now + 100 * MS) else {
        panic!("not an Open")
    };
    assert_eq!((o.layer, o.deadline_ms), (EDGE.b as u32, Some(400)));
    assert_eq!((o.policy, o.sampling), (escalate(0.5), Sampling::default()));
}

#[test]
fn the_request_budget_of_the_open_bounds_every_step() {
    let engine = FakeEngine::new(script(wrong), |_| false);
    let mut up = parent(fast);
    up.rtt_ms = 50.0;
    let now = Instant::now();
    let cfg = config(escalate(0.5), Role::Edge, EDGE, 1);
    let mut p = Pair::new(Session::child(cfg, Some(40), now), engine, vec![up], now);
    // The step allows a second, the request 40 ms; the round trip alone takes 50.
    p.session
        .on_continue(continue_msg(0, 3, None, Some(1000)), H, now);
    let (t, degraded) = tokens(p.run());
    assert!(degraded && t.tier == Role::Edge, "{t:?}");
    assert!(p.sent.is_empty());
}
