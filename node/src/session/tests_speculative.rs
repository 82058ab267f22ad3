//! Speculation on virtual time: drafts rejected anywhere, fail-over, verifier and relay.

use flow_protocol::{Draft, Encoding, InferMode, Message, Policy, Role, Verdict};

use super::pair::{rows, FakeEngine, Fate, Outcome, H};
use super::tests::{
    check_positions, child, dies_after, entry, fast, ids, parent, reference, script, want, wrong,
    CLOUD, EDGE, MS,
};
use super::to_wire;
use crate::error::NodeError;

fn speculate(n: u32) -> Policy {
    Policy {
        mode: InferMode::Speculate,
        draft_len: n,
        ..Policy::default()
    }
}

#[test]
fn drafts_rejected_at_every_position_stay_exact() {
    const N: usize = 13;
    // The drafter is wrong where `k` says (k = 4: never; 5: always).
    let drafters: [fn(usize) -> u32; 6] = [
        |p| if p % 4 == 0 { wrong(p) } else { reference(p) },
        |p| if p % 4 == 1 { wrong(p) } else { reference(p) },
        |p| if p % 4 == 2 { wrong(p) } else { reference(p) },
        |p| if p % 4 == 3 { wrong(p) } else { reference(p) },
        reference,
        wrong,
    ];
    for (k, drafter) in drafters.into_iter().enumerate() {
        let engine = FakeEngine::new(script(drafter), |_| true);
        let mut p = entry(speculate(3), vec![parent(fast)], engine, N);
        assert!(matches!(p.run(), Outcome::Done("length")), "drafter {k}");
        check_positions(&p, N);
        assert_eq!(ids(&p), want(N), "drafter {k}");
        let s = p.session.stats();
        assert!(s.drafts_accepted <= s.drafts_proposed);
        if k == 4 {
            assert_eq!(s.drafts_accepted, s.drafts_proposed);
        }
        if k == 5 {
            assert_eq!(s.drafts_accepted, 0);
        }
        // Every truncation kept exactly what the verifier holds.
        assert_eq!(
            p.engine.truncations.last(),
            Some(&p.parents[0].kv),
            "drafter {k}"
        );
        assert!(p.tokens.iter().all(|t| !t.1));
    }
}

#[test]
fn speculation_fails_over_with_the_accepted_rows_resent() {
    let engine = FakeEngine::new(
        script(|p| if p % 3 == 0 { wrong(p) } else { reference(p) }),
        |_| true,
    );
    let dies = dies_after(2);
    let mut p = entry(speculate(2), vec![dies, parent(fast)], engine, 12);
    assert!(matches!(p.run(), Outcome::Done("length")));
    check_positions(&p, 12);
    assert_eq!(ids(&p), want(12));
    assert!(
        p.tokens.iter().all(|t| !t.1),
        "speculation never answers degraded"
    );
    assert_eq!(p.session.stats().failovers, 1);
    let Message::Draft(d) = &p.parents[1].received[0] else {
        panic!()
    };
    assert_eq!(
        d.start, 0,
        "the new parent rebuilds the session from position 0"
    );
    p.drain();
}

#[test]
fn speculation_without_another_parent_degrades_to_the_entry_exit() {
    // The drafter is wrong at every third position, so the verified and the degraded
    // parts are told apart by their tokens too.
    let drafter = |p: usize| if p % 3 == 0 { wrong(p) } else { reference(p) };
    let engine = FakeEngine::new(script(drafter), |_| true);
    let dies = dies_after(1);
    let mut p = entry(speculate(2), vec![dies], engine, 12);
    assert!(matches!(p.run(), Outcome::Done("length")));
    check_positions(&p, 12);
    let first_degraded = p
        .tokens
        .iter()
        .position(|t| t.1)
        .expect("tokens after the loss are marked degraded");
    assert!(first_degraded > 0, "the verified round stays undegraded");
    assert!(
        p.tokens[first_degraded..].iter().all(|t| t.1),
        "every later token is degraded"
    );
    let got = ids(&p);
    assert_eq!(got[..first_degraded], want(12)[..first_degraded]);
    // From the loss on, the tokens are the entry exit's own choices at their positions.
    for (i, &t) in got.iter().enumerate().skip(first_degraded) {
        let pos = p.tokens[i].0.position as usize;
        assert_eq!(t, drafter(pos), "position {pos}");
    }
    assert_eq!(p.session.stats().failovers, 0);
}

fn draft_msg(start: usize, r: usize, tokens: Vec<u32>) -> Draft {
    let n = r + tokens.len();
    Draft {
        start: start as u32,
        tokens,
        hidden: to_wire(&rows(start, n), Encoding::F32).unwrap(),
        deadline_ms: None,
    }
}

#[test]
fn a_verifier_accepts_the_matching_prefix_and_keeps_its_kv() {
    let engine = FakeEngine::new(script(reference), |_| true);
    let mut p = child(speculate(3), CLOUD, vec![], engine);
    let now = p.now;
    // Rows 0..3 pending, drafts for 3, 4, 5: the third is wrong.
    p.session.on_draft(
        draft_msg(0, 3, vec![reference(3), reference(4), wrong(5)]),
        H,
        now,
    );
    let Outcome::Reply(Message::Verdict(v)) = p.run() else {
        panic!()
    };
    assert_eq!((v.accepted, v.next_token), (2, reference(5)));
    assert_eq!(p.engine.truncations, vec![5]);
    // The next draft must start where the kept KV ends.
    p.session
        .on_draft(draft_msg(4, 1, vec![reference(5)]), H, now);
    assert!(matches!(p.run(), Outcome::Failed(NodeError::Protocol(_))));
}

#[test]
fn a_relay_refuses_a_verdict_accepting_more_than_drafted() {
    let engine = FakeEngine::new(script(reference), |_| true);
    let liar = Verdict {
        request_id: 1,
        session_id: 5,
        accepted: 3,
        next_token: 0,
        tier: Role::Cloud,
        exit: 9,
    };
    let up = parent(move |_| Fate::Send(10 * MS, Message::Verdict(liar.clone())));
    let mut p = child(speculate(2), EDGE, vec![up], engine);
    let now = p.now;
    p.session.on_draft(draft_msg(0, 2, vec![1, 2]), H, now);
    assert!(matches!(p.run(), Outcome::Failed(NodeError::Protocol(_))));
    assert!(p.engine.truncations.is_empty());
}

#[test]
fn a_relay_moves_the_session_to_the_next_parent_with_its_accepted_rows() {
    let engine = FakeEngine::new(script(reference), |_| true);
    let mut p = child(
        speculate(2),
        EDGE,
        vec![dies_after(1), parent(fast)],
        engine,
    );
    let now = p.now;
    // Rows 0..3 pending, two right drafts: the first parent verifies them.
    p.session
        .on_draft(draft_msg(0, 3, vec![reference(3), reference(4)]), H, now);
    let Outcome::Reply(Message::Verdict(v)) = p.run() else {
        panic!()
    };
    assert_eq!(v.accepted, 2);
    // The next draft's parent falls silent: the second parent gets positions 0..8 (this
    // tier's accepted rows, then the draft's) and verifies the draft.
    let now = p.now;
    p.session
        .on_draft(draft_msg(5, 1, vec![reference(6), wrong(7)]), H, now);
    let Outcome::Reply(Message::Verdict(v)) = p.run() else {
        panic!()
    };
    assert_eq!((v.accepted, v.next_token), (1, reference(7)));
    let Message::Draft(d) = &p.parents[1].received[0] else {
        panic!("not a Draft")
    };
    assert_eq!((d.start, d.rows()), (0, 8));
    assert_eq!(p.parents[1].kv, 7);
    assert_eq!(p.engine.truncations.last(), Some(&7));
    assert_eq!(p.session.stats().failovers, 1);
}

#[test]
fn a_relay_with_no_other_parent_fails_the_childs_draft() {
    let engine = FakeEngine::new(script(reference), |_| true);
    let mut p = child(speculate(2), EDGE, vec![dies_after(0)], engine);
    let now = p.now;
    p.session
        .on_draft(draft_msg(0, 3, vec![reference(3), reference(4)]), H, now);
    assert!(matches!(p.run(), Outcome::Failed(NodeError::Parent { .. })));
}
