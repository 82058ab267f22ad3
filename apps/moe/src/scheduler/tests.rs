use std::collections::HashMap;

use proptest::prelude::*;

use super::*;

fn sched(budget: usize, kv: usize, policy: Policy) -> Scheduler {
    Scheduler::new(SchedulerConfig {
        token_budget: budget,
        kv_capacity: kv,
        policy,
    })
    .unwrap()
}

/// Replays `reqs` (arrival iteration, prompt, max_new) and checks the invariants every
/// iteration. Returns (iterations, stats, emitted tokens per id, admission order).
fn replay(
    s: &mut Scheduler,
    reqs: &[(u64, usize, usize)],
    max_iters: u64,
) -> (u64, SchedulerStats, HashMap<u64, usize>, Vec<u64>) {
    let mut emitted: HashMap<u64, usize> = HashMap::new();
    let mut next_pos: HashMap<u64, usize> = HashMap::new();
    let mut admitted: Vec<u64> = Vec::new();
    let mut decoding: Vec<u64> = Vec::new();
    let mut it = 0u64;
    let mut next = 0usize;
    let budget = s.config().token_budget;
    loop {
        while next < reqs.len() && reqs[next].0 <= it {
            let (_, p, m) = reqs[next];
            s.add(Request {
                id: next as u64,
                prompt_len: p,
                max_new: m,
            })
            .unwrap();
            next += 1;
        }
        if next == reqs.len() && s.is_idle() {
            break;
        }
        assert!(
            it < max_iters,
            "not finished after {max_iters} iterations (starvation?)"
        );
        let b = s.schedule();
        // Budget never exceeded (chunked); KV never over capacity.
        if s.config().policy == Policy::Chunked {
            assert!(
                b.tokens() <= budget,
                "batch of {} > budget {budget}",
                b.tokens()
            );
        }
        assert!(s.kv_used() <= s.config().kv_capacity);
        // Decodes first, then prefills.
        let first_prefill = b
            .work
            .iter()
            .position(|w| matches!(w, Work::Prefill { .. }))
            .unwrap_or(b.work.len());
        assert!(b.work[first_prefill..]
            .iter()
            .all(|w| matches!(w, Work::Prefill { .. })));
        for p in &b.preempted {
            decoding.retain(|d| d != p);
            next_pos.insert(*p, 0);
        }
        // Every decoding request that was not preempted decodes (chunked: always).
        if s.config().policy == Policy::Chunked {
            for d in &decoding {
                assert!(
                    b.work.contains(&Work::Decode { id: *d }),
                    "decode of {d} not scheduled in iteration {it}"
                );
            }
        }
        // One piece of work per request; prefill chunks are contiguous.
        let mut ids: Vec<u64> = b.work.iter().map(Work::id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), b.work.len());
        for w in &b.work {
            if let Work::Prefill {
                id,
                start,
                len,
                last,
            } = *w
            {
                assert!(len > 0);
                let pos = next_pos.entry(id).or_insert(0);
                assert_eq!(start, *pos, "chunk of {id} not contiguous");
                *pos += len;
                if start == 0 && !admitted.contains(&id) {
                    admitted.push(id);
                }
                if last {
                    decoding.push(id);
                }
            }
            if w.emits() {
                *emitted.entry(w.id()).or_insert(0) += 1;
            }
        }
        for f in &b.finished {
            decoding.retain(|d| d != f);
        }
        it += 1;
    }
    (it, s.stats(), emitted, admitted)
}

#[test]
fn long_prompt_is_chunked_and_decodes_keep_running() {
    let mut s = sched(8, 1000, Policy::Chunked);
    s.add(Request {
        id: 0,
        prompt_len: 3,
        max_new: 10,
    })
    .unwrap();
    let b = s.schedule();
    assert_eq!(
        b.work,
        vec![Work::Prefill {
            id: 0,
            start: 0,
            len: 3,
            last: true
        }]
    );
    s.add(Request {
        id: 1,
        prompt_len: 20,
        max_new: 2,
    })
    .unwrap();
    let b = s.schedule();
    assert_eq!(
        b.work,
        vec![
            Work::Decode { id: 0 },
            Work::Prefill {
                id: 1,
                start: 0,
                len: 7,
                last: false
            }
        ]
    );
    let b = s.schedule();
    assert_eq!(
        b.work,
        vec![
            Work::Decode { id: 0 },
            Work::Prefill {
                id: 1,
                start: 7,
                len: 7,
                last: false
            }
        ]
    );
    let b = s.schedule();
    assert_eq!(
        b.work,
        vec![
            Work::Decode { id: 0 },
            Work::Prefill {
                id: 1,
                start: 14,
                len: 6,
                last: true
            }
        ]
    );
    assert_eq!(s.stats().stalled_iterations, 0);
}

#[test]
fn prefill_first_stalls_decodes() {
    let mut s = sched(64, 1000, Policy::PrefillFirst);
    s.add(Request {
        id: 0,
        prompt_len: 3,
        max_new: 10,
    })
    .unwrap();
    s.schedule();
    s.add(Request {
        id: 1,
        prompt_len: 40,
        max_new: 2,
    })
    .unwrap();
    let b = s.schedule();
    assert_eq!(
        b.work,
        vec![Work::Prefill {
            id: 1,
            start: 0,
            len: 40,
            last: true
        }]
    );
    assert_eq!(s.stats().stalled_iterations, 1);
    let b = s.schedule();
    assert_eq!(b.work, vec![Work::Decode { id: 0 }, Work::Decode { id: 1 }]);
    assert_eq!(b.finished, vec![1]);
}

#[test]
fn kv_pressure_preempts_the_newest_and_counts_it() {
    // Capacity 12: both prompts (4 + 1 reserved each) fit; decodes then run out of room.
    let mut s = sched(16, 12, Policy::Chunked);
    s.add(Request {
        id: 0,
        prompt_len: 4,
        max_new: 6,
    })
    .unwrap();
    s.add(Request {
        id: 1,
        prompt_len: 4,
        max_new: 6,
    })
    .unwrap();
    let reqs = [];
    let (_, stats, emitted, _) = replay(&mut s, &reqs, 200);
    assert!(stats.preemptions >= 1, "{stats:?}");
    assert_eq!(emitted[&0], 6);
    assert_eq!(emitted[&1], 6);
    assert_eq!(stats.finished, 2);
}

#[test]
fn rejects_what_can_never_run() {
    assert!(Scheduler::new(SchedulerConfig {
        token_budget: 0,
        kv_capacity: 10,
        policy: Policy::Chunked
    })
    .is_err());
    let mut s = sched(8, 10, Policy::Chunked);
    assert!(s
        .add(Request {
            id: 0,
            prompt_len: 8,
            max_new: 3
        })
        .is_err());
    assert!(s
        .add(Request {
            id: 0,
            prompt_len: 0,
            max_new: 3
        })
        .is_err());
    s.add(Request {
        id: 0,
        prompt_len: 2,
        max_new: 3,
    })
    .unwrap();
    assert!(s
        .add(Request {
            id: 0,
            prompt_len: 2,
            max_new: 3
        })
        .is_err());
}

#[test]
fn plan_chunks_orders_decodes_then_started_then_new() {
    let p = |rows, logit_rows, started| Pending {
        rows,
        logit_rows,
        started,
    };
    // new prefill (arrived first), decode, started prefill, draft verification (4 rows).
    let pending = [
        p(30, 1, false),
        p(1, 1, true),
        p(12, 1, true),
        p(4, 4, true),
    ];
    assert_eq!(plan_chunks(&pending, 16), vec![0, 1, 11, 4]);
    assert_eq!(plan_chunks(&pending, 64), vec![30, 1, 12, 4]);
    // A chunk never leaves fewer than logit_rows rows behind.
    assert_eq!(plan_chunks(&[p(10, 4, false)], 8), vec![6]);
    // Nothing fits: the oldest runs anyway.
    assert_eq!(plan_chunks(&[p(8, 8, true)], 4), vec![8]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn chunked_invariants(
        budget in 4usize..48,
        kv in 64usize..400,
        reqs in prop::collection::vec((0u64..30, 1usize..60, 1usize..12), 1..24),
    ) {
        let mut reqs = reqs;
        reqs.sort_by_key(|r| r.0);
        reqs.retain(|r| r.1 + r.2 <= kv);
        let mut s = sched(budget, kv, Policy::Chunked);
        let (_, stats, emitted, admitted) = replay(&mut s, &reqs, 20_000);
        prop_assert_eq!(stats.finished as usize, reqs.len());
        prop_assert_eq!(stats.stalled_iterations, 0);
        for (i, r) in reqs.iter().enumerate() {
            // Preempted requests recompute; every request still yields exactly max_new.
            prop_assert_eq!(emitted.get(&(i as u64)).copied().unwrap_or(0), r.2);
        }
        // FCFS among new requests: first admissions happen in arrival order.
        let mut sorted = admitted.clone();
        sorted.sort_unstable();
        prop_assert_eq!(admitted, sorted);
    }

    #[test]
    fn prefill_first_finishes_everything(
        kv in 64usize..400,
        reqs in prop::collection::vec((0u64..30, 1usize..60, 1usize..12), 1..24),
    ) {
        let mut reqs = reqs;
        reqs.sort_by_key(|r| r.0);
        reqs.retain(|r| r.1 + r.2 <= kv);
        let mut s = sched(64, kv, Policy::PrefillFirst);
        let (_, stats, emitted, _) = replay(&mut s, &reqs, 20_000);
        prop_assert_eq!(stats.finished as usize, reqs.len());
        for (i, r) in reqs.iter().enumerate() {
            prop_assert_eq!(emitted.get(&(i as u64)).copied().unwrap_or(0), r.2);
        }
    }

    #[test]
    fn plan_chunks_respects_budget(
        budget in 1usize..64,
        pending in prop::collection::vec((1usize..40, 1usize..4, any::<bool>()), 1..16),
    ) {
        let pending: Vec<Pending> = pending
            .into_iter()
            .map(|(rows, l, started)| Pending { rows: rows.max(l), logit_rows: l, started })
            .collect();
        let plan = plan_chunks(&pending, budget);
        let total: usize = plan.iter().sum();
        let forced = plan.iter().filter(|&&r| r > 0).count() == 1 && total > budget;
        prop_assert!(total <= budget || forced);
        prop_assert!(total > 0);
        for (p, &r) in pending.iter().zip(&plan) {
            prop_assert!(r <= p.rows);
            if r > 0 && r < p.rows {
                prop_assert!(p.rows - r >= p.logit_rows);
            }
            // Decodes are never split.
            if p.rows <= p.logit_rows {
                prop_assert!(r == 0 || r == p.rows);
            }
        }
        // Every decode runs when all decodes fit the budget.
        let dec: usize = pending.iter().filter(|p| p.rows <= p.logit_rows).map(|p| p.rows).sum();
        if dec <= budget {
            for (p, &r) in pending.iter().zip(&plan) {
                if p.rows <= p.logit_rows {
                    prop_assert_eq!(r, p.rows);
                }
            }
        }
    }
}

#[test]
fn iteration_cost_fit_recovers_a_line_and_picks_the_slo_budget() {
    // 2 ms fixed + 0.1 ms per token, exactly.
    let samples: Vec<(usize, f64)> = [1, 16, 64, 256]
        .iter()
        .map(|&n| (n, 2e-3 + 1e-4 * n as f64))
        .collect();
    let c = IterationCost::fit(&samples).unwrap();
    assert!((c.fixed_s - 2e-3).abs() < 1e-9, "{c:?}");
    assert!((c.per_token_s - 1e-4).abs() < 1e-12, "{c:?}");
    // 10 ms SLO: (10 - 2) / 0.1 = 80 tokens; an 80-token iteration fits, 81 does not.
    let b = c.budget_for(10e-3).unwrap();
    assert_eq!(b, 80);
    assert!(c.seconds(b) <= 10e-3 + 1e-12 && c.seconds(b + 1) > 10e-3);
    // A tighter SLO gives a smaller budget; one below a single-token iteration errors.
    assert!(c.budget_for(5e-3).unwrap() < b);
    assert!(c.budget_for(2.05e-3).is_err());
    assert!(c.budget_for(0.0).is_err());
    assert!(c.budget_for(f64::NAN).is_err());
}

#[test]
fn iteration_cost_fit_rejects_what_cannot_be_fitted() {
    // One size only: no slope.
    assert!(IterationCost::fit(&[(64, 1e-3), (64, 2e-3)]).is_err());
    assert!(IterationCost::fit(&[]).is_err());
    // Cost falling with size (noise on tiny iterations).
    assert!(IterationCost::fit(&[(1, 2e-3), (64, 1e-3)]).is_err());
    assert!(IterationCost::fit(&[(1, f64::INFINITY), (64, 1e-3)]).is_err());
    // Noise below the line: the intercept is clamped to 0, never negative.
    let c = IterationCost::fit(&[(10, 0.0), (20, 2e-3), (30, 4e-3)]).unwrap();
    assert_eq!(c.fixed_s, 0.0);
    assert!(c.per_token_s > 0.0);
}
