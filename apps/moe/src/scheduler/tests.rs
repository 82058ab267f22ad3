use std::collections::HashMap;

use proptest::prelude::*;

use super::*;

fn sched(budget: usize, kv: usize, policy: Policy) -> Scheduler {
    timed(budget, kv, policy, None)
}

fn timed(budget: usize, kv: usize, policy: Policy, time_limit: Option<TimeLimit>) -> Scheduler {
    Scheduler::new(SchedulerConfig {
        token_budget: budget,
        kv_capacity: kv,
        policy,
        time_limit,
    })
    .unwrap()
}

/// 1 ms per iteration + 0.1 ms per token + 1 µs per attended pair.
const COST: IterationCost = IterationCost {
    fixed_s: 1e-3,
    per_token_s: 1e-4,
    per_attended_s: 1e-6,
};

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
    // Positions in each request's KV cache (for the predicted iteration time).
    let mut ctx: HashMap<u64, usize> = HashMap::new();
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
            ctx.insert(*p, 0);
        }
        // With a time limit, the predicted iteration time fits the SLO, except for the one
        // token a prefill is guaranteed when the decodes alone fill it (and for decodes
        // alone, which are never cut).
        if let (Policy::Chunked, Some(l)) = (s.config().policy, s.config().time_limit) {
            let mut attended = 0;
            for w in &b.work {
                let c = ctx.entry(w.id()).or_insert(0);
                let (start, len) = match *w {
                    Work::Decode { .. } => (*c, 1),
                    Work::Prefill { start, len, .. } => (start, len),
                };
                attended += attended_pairs(start, len);
                *c = start + len;
            }
            let chunks: Vec<usize> = b
                .work
                .iter()
                .filter_map(|w| match *w {
                    Work::Prefill { len, .. } => Some(len),
                    Work::Decode { .. } => None,
                })
                .collect();
            let predicted = l.cost.seconds(b.tokens(), attended);
            assert!(
                predicted <= l.slo_s + 1e-12 || chunks.is_empty() || chunks == [1],
                "iteration {it}: predicted {predicted} s > SLO {} s with chunks {chunks:?}",
                l.slo_s
            );
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
        policy: Policy::Chunked,
        time_limit: None,
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
        slo_ms in prop::option::of(1.5f64..8.0),
    ) {
        let mut reqs = reqs;
        reqs.sort_by_key(|r| r.0);
        reqs.retain(|r| r.1 + r.2 <= kv);
        let limit = slo_ms.map(|ms| TimeLimit { cost: COST, slo_s: ms / 1e3 });
        let mut s = timed(budget, kv, Policy::Chunked, limit);
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

fn samples(cost: IterationCost, contexts: &[usize], sizes: &[usize]) -> Vec<CostSample> {
    let mut out = Vec::new();
    for &c in contexts {
        for &n in sizes {
            let attended = attended_pairs(c, n);
            out.push(CostSample {
                tokens: n,
                attended,
                seconds: cost.seconds(n, attended),
            });
        }
    }
    out
}

#[test]
fn iteration_cost_fit_recovers_the_model_and_picks_the_slo_budget() {
    // Chunks at three context depths: all three terms are recovered.
    let c = IterationCost::fit(&samples(COST, &[0, 500, 2000], &[1, 8, 32, 64])).unwrap();
    assert!((c.fixed_s - 1e-3).abs() < 1e-9, "{c:?}");
    assert!((c.per_token_s - 1e-4).abs() < 1e-10, "{c:?}");
    assert!((c.per_attended_s - 1e-6).abs() < 1e-11, "{c:?}");
    // 10 ms SLO at context 0: 1 + 0.1 n + 0.001 n(n+1)/2 <= 10 -> n = 50 (9.275 ms; 51: 9.426;
    // ... the largest n that fits), and a chunk deep into a prompt gets fewer tokens.
    let b = c.budget_for(10e-3, 0).unwrap();
    let fits = |ctx: usize, n: usize| c.seconds(n, attended_pairs(ctx, n)) <= 10e-3;
    assert!(fits(0, b) && !fits(0, b + 1), "{b}");
    let deep = c.budget_for(10e-3, 2000).unwrap();
    assert!(fits(2000, deep) && !fits(2000, deep + 1), "{deep}");
    assert!(deep < b / 2, "{deep} vs {b}");
    // A tighter SLO gives a smaller budget; one below a single-token iteration errors.
    assert!(c.budget_for(5e-3, 0).unwrap() < b);
    assert!(c.budget_for(1.05e-3, 0).is_err());
    assert!(c.budget_for(0.0, 0).is_err());
    assert!(c.budget_for(f64::NAN, 0).is_err());
}

#[test]
fn iteration_cost_fit_without_depths_is_a_line() {
    // All chunks at context 0 but one size: 2 ms + 0.1 ms/token exactly, no attention term.
    let line = IterationCost {
        fixed_s: 2e-3,
        per_token_s: 1e-4,
        per_attended_s: 0.0,
    };
    let s: Vec<CostSample> = [1usize, 16, 64, 256]
        .iter()
        .map(|&n| CostSample {
            tokens: n,
            attended: 0,
            seconds: line.seconds(n, 0),
        })
        .collect();
    let c = IterationCost::fit(&s).unwrap();
    assert!((c.fixed_s - 2e-3).abs() < 1e-9 && (c.per_token_s - 1e-4).abs() < 1e-12);
    assert_eq!(c.per_attended_s, 0.0);
    assert_eq!(c.budget_for(10e-3, 0).unwrap(), 80);
}

#[test]
fn iteration_cost_fit_rejects_what_cannot_be_fitted() {
    let s = |v: &[(usize, f64)]| -> Vec<CostSample> {
        v.iter()
            .map(|&(tokens, seconds)| CostSample {
                tokens,
                attended: 0,
                seconds,
            })
            .collect()
    };
    // One size only: no slope.
    assert!(IterationCost::fit(&s(&[(64, 1e-3), (64, 2e-3)])).is_err());
    assert!(IterationCost::fit(&[]).is_err());
    // Cost falling with size (noise on tiny iterations).
    assert!(IterationCost::fit(&s(&[(1, 2e-3), (64, 1e-3)])).is_err());
    assert!(IterationCost::fit(&s(&[(1, f64::INFINITY), (64, 1e-3)])).is_err());
    // Noise below the line: the intercept is clamped to 0, never negative.
    let c = IterationCost::fit(&s(&[(10, 0.0), (20, 2e-3), (30, 4e-3)])).unwrap();
    assert_eq!(c.fixed_s, 0.0);
    assert!(c.per_token_s > 0.0);
    // A negative attention slope (noise) is dropped, not used.
    let mut noisy = samples(COST, &[0, 1000], &[1, 16, 64]);
    noisy[5].seconds *= 0.5; // the deepest, largest chunk measured implausibly fast
    let c = IterationCost::fit(&noisy).unwrap();
    assert!(
        c.per_attended_s >= 0.0 && c.fixed_s >= 0.0 && c.per_token_s > 0.0,
        "{c:?}"
    );
}

#[test]
fn time_limit_gives_deep_chunks_fewer_tokens() {
    // 8 ms SLO: at the start of a prompt 1 + 0.1 n + 0.001 n(n+1)/2 <= 8 -> n = 46; a
    // decode at context 10 rides along in every iteration.
    let limit = TimeLimit {
        cost: COST,
        slo_s: 8e-3,
    };
    let mut s = timed(512, 10_000, Policy::Chunked, Some(limit));
    s.add(Request {
        id: 0,
        prompt_len: 10,
        max_new: 4000,
    })
    .unwrap();
    s.schedule();
    s.add(Request {
        id: 1,
        prompt_len: 3000,
        max_new: 2,
    })
    .unwrap();
    let mut chunks = Vec::new();
    loop {
        let b = s.schedule();
        assert_eq!(b.work[0], Work::Decode { id: 0 });
        match b.work.get(1) {
            Some(&Work::Prefill { len, last, .. }) => {
                chunks.push(len);
                if last {
                    break;
                }
            }
            other => panic!("no prefill chunk: {other:?}"),
        }
    }
    assert_eq!(chunks.iter().sum::<usize>(), 3000);
    // Chunks shrink as the prompt's context grows: ~45 at the start, ~3 at 2900 tokens.
    assert!(chunks[0] >= 40, "{chunks:?}");
    assert!(chunks[chunks.len() - 2] <= 5, "{chunks:?}");
    assert!(chunks.windows(2).all(|w| w[1] <= w[0] + 1), "{chunks:?}");
}

#[test]
fn decodes_that_fill_the_slo_still_let_prefills_advance() {
    // 2 ms SLO: 8 decodes alone predict 1 + 0.8 + attention > 2 ms; the oldest prefill
    // still gets one token per iteration, so a 30-token prompt finishes long before the
    // 1000-token decodes do, and everything finishes.
    let limit = TimeLimit {
        cost: COST,
        slo_s: 2e-3,
    };
    let mut s = timed(64, 100_000, Policy::Chunked, Some(limit));
    for id in 0..8 {
        s.add(Request {
            id,
            prompt_len: 50,
            max_new: 1000,
        })
        .unwrap();
    }
    let decodes = |b: &Batch| {
        b.work
            .iter()
            .filter(|w| matches!(w, Work::Decode { .. }))
            .count()
    };
    let mut warm = 0;
    while decodes(&s.schedule()) < 8 {
        warm += 1;
        assert!(warm < 1000, "the long requests never all decode");
    }
    s.add(Request {
        id: 8,
        prompt_len: 30,
        max_new: 3,
    })
    .unwrap();
    let mut iters = 0;
    while !s.schedule().finished.contains(&8) {
        iters += 1;
        assert!(iters < 100, "the short request starved behind the decodes");
    }
    // One prompt token per iteration, then two decodes.
    assert!((30..=33).contains(&iters), "{iters}");
    let (_, stats, emitted, _) = replay(&mut s, &[], 20_000);
    assert_eq!(stats.finished, 9);
    assert!(emitted.values().all(|&n| n > 0));
}
