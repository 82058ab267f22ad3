//! The cost model: evaluates one candidate placement (see the crate docs for the formula).

use super::input::{BackfillMode, EncodingChoice, PlanInput, TierRole};
use super::plan::{ExitDecision, LinkPlan, Payload, TierPlan, Verdict};
use crate::profile::BlockCost;

/// One point of the search space.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Cand {
    /// `n + 1` boundaries: tier `i` hosts layers `bounds[i]..bounds[i + 1]`; `bounds[0] = 0`
    /// and `bounds[n]` is the depth of the exit the top tier answers with.
    pub bounds: Vec<usize>,
    /// Per tier: `(exit index, curve point index)` of its deciding exit.
    pub decisions: Vec<Option<(usize, usize)>>,
    /// Per link: index into the allowed encodings.
    pub encs: Vec<usize>,
}

/// The result of evaluating a candidate.
#[derive(Debug, Clone)]
pub(crate) struct Eval {
    pub latency: f64,
    pub agreement: f64,
    pub score: f64,
    pub energy_j: f64,
    pub cloud_ms: f64,
    /// Bytes over the limit, summed over tiers.
    pub overflow: u64,
    /// `None` when feasible.
    pub verdict: Option<Verdict>,
    /// Filled only when asked for detail.
    pub tiers: Vec<TierPlan>,
    pub links: Vec<LinkPlan>,
}

/// Precomputed prefix sums so that one evaluation is O(tiers).
pub(crate) struct Prepared<'a> {
    pub input: &'a PlanInput,
    pub n: usize,
    pub l: usize,
    pub encs: Vec<EncodingChoice>,
    ctx: f64,
    prompt: f64,
    gen: f64,
    kv_tokens: u64,
    /// Per tier, prefix sums over layers (length `l + 1`).
    dec: Vec<Vec<f64>>,
    bf: Vec<Vec<f64>>,
    pre: Vec<Vec<f64>>,
    mem: Vec<Vec<u64>>,
    /// By depth: index of the exit at that depth.
    pub exit_at: Vec<Option<usize>>,
}

impl<'a> Prepared<'a> {
    pub fn new(input: &'a PlanInput) -> Self {
        let w = &input.config.workload;
        let l = input.model.num_layers;
        let prompt = f64::from(w.prompt_tokens);
        let gen = f64::from(w.gen_tokens);
        let ctx = prompt + gen / 2.0;
        let kv_tokens = (u64::from(w.prompt_tokens) + u64::from(w.gen_tokens))
            .saturating_mul(u64::from(w.concurrent_sessions));
        let prefix_f = |f: &dyn Fn(&BlockCost) -> f64, layers: &[BlockCost]| {
            let mut v = Vec::with_capacity(layers.len() + 1);
            let mut acc = 0.0;
            v.push(acc);
            for c in layers {
                acc += f(c);
                v.push(acc);
            }
            v
        };
        let mut dec = Vec::new();
        let mut bf = Vec::new();
        let mut pre = Vec::new();
        let mut mem = Vec::new();
        for t in &input.tiers {
            let layers = &t.profile.layers;
            dec.push(prefix_f(&|c| c.decode.eval(ctx), layers));
            bf.push(prefix_f(&|c| c.prefill.b, layers));
            pre.push(prefix_f(&|c| c.prefill.eval(prompt), layers));
            let mut m = vec![0u64];
            let mut acc = 0u64;
            for c in layers {
                acc = acc.saturating_add(c.memory_bytes(kv_tokens));
                m.push(acc);
            }
            mem.push(m);
        }
        let mut exit_at = vec![None; l + 1];
        for (i, e) in input.model.exits.iter().enumerate() {
            exit_at[e.depth] = Some(i);
        }
        Self {
            input,
            n: input.tiers.len(),
            l,
            encs: input.allowed_encodings(),
            ctx,
            prompt,
            gen,
            kv_tokens,
            dec,
            bf,
            pre,
            mem,
            exit_at,
        }
    }

    /// Agreement when the top tier answers everything at exit depth `d`.
    fn answer_agreement(&self, d: usize) -> f64 {
        match self.exit_at[d] {
            Some(e) => self.input.model.exits[e]
                .accept_all_agreement(self.l)
                .unwrap_or(0.0),
            None => 0.0,
        }
    }

    /// Deepest exit with depth in `(a, b]`.
    fn deepest_exit_in(&self, a: usize, b: usize) -> Option<usize> {
        ((a + 1)..=b).rev().find_map(|d| self.exit_at[d])
    }

    /// Fraction of requests whose prompt prefill on a tier (or upload over a link) reached
    /// by a fraction `reach` of the tokens lies on the critical path. An upper tier
    /// prefills when the first token of a request reaches it: with `CriticalPath` backfill
    /// that is the request's first escalation, which happens in `1 − (1 − reach)^G` of the
    /// requests when tokens escalate independently (the prompt then travels as that
    /// escalation's backfill); with `Background` streaming the prompt's rows are sent and
    /// computed as they are produced, so only a first token that escalates itself
    /// (`reach`) waits for them.
    pub(crate) fn prefill_share(&self, reach: f64) -> f64 {
        let reach = reach.clamp(0.0, 1.0);
        match self.input.config.backfill {
            BackfillMode::Background { .. } => reach,
            BackfillMode::CriticalPath => 1.0 - (1.0 - reach).powf(self.gen),
        }
    }

    fn ser_ms(&self, link: usize, bytes: f64) -> f64 {
        self.input.links[link].serialisation_ms(bytes)
    }

    /// Evaluates a candidate; `detail` fills the per-tier and per-link breakdown.
    pub fn evaluate(&self, c: &Cand, detail: bool, enforce_accuracy: bool) -> Eval {
        let inp = self.input;
        let cfg = &inp.config;
        let n = self.n;
        let b = &c.bounds;
        let answer = b[n];
        let top = (0..n).rev().find(|&i| b[i] < b[i + 1]).unwrap_or(0);
        let critical = matches!(cfg.backfill, BackfillMode::CriticalPath);

        // Reach probabilities and errors.
        let mut reach = vec![0.0f64; n];
        let mut r = 1.0f64;
        let mut errors = 0.0f64;
        for (i, reach_i) in reach.iter_mut().enumerate().take(top + 1) {
            *reach_i = r;
            if i == top {
                errors += r * (1.0 - self.answer_agreement(answer));
            } else if let Some((e, p)) = c.decisions[i] {
                let pt = inp.model.exits[e].curve[p];
                let after = r.min(pt.escalation);
                errors += (r - after) * (1.0 - pt.agreement);
                r = after;
            }
        }

        // Links: payload, loss, latency.
        let mut link_ms = 0.0;
        let mut link_prefill = 0.0;
        let mut radio_ms_dev = 0.0;
        let mut row_ms = vec![0.0f64; n.saturating_sub(1)];
        let mut links = Vec::new();
        for j in 0..n.saturating_sub(1) {
            let est = &inp.links[j];
            if j >= top {
                if detail {
                    links.push(LinkPlan {
                        from: inp.tiers[j].role,
                        to: inp.tiers[j + 1].role,
                        payload: Payload::Unused,
                        row_bytes: 0.0,
                        reach: 0.0,
                        rtt_ms: est.rtt_ms,
                        goodput_bps: est.goodput_bps,
                        expected_ms: 0.0,
                        prefill_ms: 0.0,
                        utilisation: 0.0,
                    });
                }
                continue;
            }
            let rho = reach[j + 1];
            let e = self.encs[c.encs[j]];
            let row = inp.model.payload_bytes(b[j + 1], e.encoding, e.zstd_ratio);
            let payload = if b[j + 1] == 0 {
                Payload::TokenIds
            } else {
                errors += rho * e.agreement_loss;
                Payload::Hidden {
                    encoding: e.encoding,
                    zstd: e.zstd_ratio.is_some(),
                }
            };
            let ret = cfg.return_bytes_per_token as f64;
            let mut expected = 0.0;
            let mut prefill = 0.0;
            if rho > 0.0 {
                row_ms[j] = self.ser_ms(j, row);
                expected = rho * (est.rtt_ms + self.ser_ms(j, row + ret));
                if critical {
                    expected += (1.0 - rho) * row_ms[j];
                }
                let mut sent_prefill = 0.0;
                if cfg.include_prefill {
                    // The prompt's rows travel with the first escalation past this link, whose
                    // round trip is already one of the per-token RTTs above: only their
                    // serialisation is extra, and only in requests that cross the link.
                    let upload = self.ser_ms(j, self.prompt * row) / self.gen;
                    prefill = self.prefill_share(rho) * upload;
                    sent_prefill = match cfg.backfill {
                        BackfillMode::Background { .. } => upload,
                        BackfillMode::CriticalPath => prefill,
                    };
                }
                if inp.tiers[j].role == TierRole::Device {
                    radio_ms_dev += row_ms[j] + rho * self.ser_ms(j, ret) + sent_prefill;
                }
            }
            link_ms += expected;
            link_prefill += prefill;
            if detail {
                links.push(LinkPlan {
                    from: inp.tiers[j].role,
                    to: inp.tiers[j + 1].role,
                    payload,
                    row_bytes: row,
                    reach: rho,
                    rtt_ms: est.rtt_ms,
                    goodput_bps: est.goodput_bps,
                    expected_ms: expected,
                    prefill_ms: prefill,
                    utilisation: 0.0,
                });
            }
        }

        // Tiers: memory and compute.
        let mut tier_ms = 0.0;
        let mut tier_prefill = 0.0;
        let mut energy_j = 0.0;
        let mut cloud_ms = 0.0;
        let mut overflow = 0u64;
        let mut verdict = None;
        let mut tiers = Vec::new();
        for i in 0..n {
            let t = &inp.tiers[i];
            let (lo, hi) = (b[i], b[i + 1]);
            let active = lo < hi && i <= top;
            let head = if !active {
                None
            } else if i == top {
                self.exit_at[answer]
            } else {
                c.decisions[i].map(|(e, _)| e)
            };
            let mut hosted: Vec<usize> = Vec::new();
            if let Some(h) = head {
                hosted.push(h);
            }
            if active && cfg.host_fallback_exits {
                if let Some(f) = self.deepest_exit_in(lo, hi) {
                    if !hosted.contains(&f) {
                        hosted.push(f);
                    }
                }
            }
            let head_cost = head
                .and_then(|h| t.profile.exit(inp.model.exits[h].depth))
                .map(|e| e.cost);
            let mut memory = 0u64;
            let (mut decode, mut expected, mut prefill) = (0.0, 0.0, 0.0);
            if active {
                if lo == 0 {
                    memory = t.profile.overhead.memory_bytes(self.kv_tokens);
                }
                memory = memory.saturating_add(self.mem[i][hi] - self.mem[i][lo]);
                for &h in &hosted {
                    if let Some(e) = t.profile.exit(inp.model.exits[h].depth) {
                        memory = memory.saturating_add(e.cost.memory_bytes(self.kv_tokens));
                    }
                }
                let ov = &t.profile.overhead;
                decode = t.load_factor
                    * (ov.decode.eval(self.ctx) + self.dec[i][hi] - self.dec[i][lo]
                        + head_cost.map_or(0.0, |h| h.decode.eval(self.ctx)));
                let bf_row = t.load_factor
                    * (self.bf[i][hi] - self.bf[i][lo] + head_cost.map_or(0.0, |h| h.prefill.b));
                let ri = reach[i];
                if ri > 0.0 {
                    expected = ri * decode;
                    if critical && i > 0 {
                        expected += (1.0 - ri) * bf_row;
                    }
                    if cfg.include_prefill {
                        let share = if i == 0 { 1.0 } else { self.prefill_share(ri) };
                        prefill = share
                            * t.load_factor
                            * (ov.prefill.eval(self.prompt) + self.pre[i][hi] - self.pre[i][lo]
                                + head_cost.map_or(0.0, |h| h.prefill.eval(self.prompt)))
                            / self.gen;
                    }
                }
                let busy = expected
                    + prefill
                    + if !critical && i > 0 && ri > 0.0 {
                        (1.0 - ri) * bf_row
                    } else {
                        0.0
                    };
                match t.role {
                    TierRole::Device => energy_j += busy * t.compute_power_w / 1000.0,
                    TierRole::Cloud => cloud_ms += busy,
                    TierRole::Edge => {}
                }
                if memory > t.memory_limit_bytes {
                    overflow = overflow.saturating_add(memory - t.memory_limit_bytes);
                    if verdict.is_none() {
                        verdict = Some(Verdict::OverMemory {
                            role: t.role,
                            needed_bytes: memory,
                            limit_bytes: t.memory_limit_bytes,
                        });
                    }
                }
            }
            if t.role == TierRole::Device && i + 1 < n {
                energy_j += radio_ms_dev * t.radio_power_w / 1000.0;
            }
            tier_ms += expected;
            tier_prefill += prefill;
            if detail {
                let decision = if i < top && active {
                    c.decisions[i].map(|(e, p)| {
                        let pt = inp.model.exits[e].curve[p];
                        ExitDecision {
                            depth: inp.model.exits[e].depth,
                            threshold: pt.threshold,
                            agreement: pt.agreement,
                            escalation: pt.escalation,
                        }
                    })
                } else {
                    None
                };
                let mut exits: Vec<usize> =
                    hosted.iter().map(|&h| inp.model.exits[h].depth).collect();
                exits.sort_unstable();
                tiers.push(TierPlan {
                    role: t.role,
                    layer_start: lo,
                    layer_end: if active { hi } else { lo },
                    exits,
                    decision,
                    answers_with: (i == top).then_some(answer),
                    reach: reach.get(i).copied().unwrap_or(0.0),
                    decode_ms: decode,
                    expected_ms: expected,
                    prefill_ms: prefill,
                    memory_bytes: memory,
                    memory_limit_bytes: t.memory_limit_bytes,
                });
            }
        }

        let latency = tier_ms + tier_prefill + link_ms + link_prefill;
        let agreement = (1.0 - errors).clamp(0.0, 1.0);
        let o = &cfg.objective;
        let score = latency
            + o.device_energy_ms_per_joule * energy_j
            + o.cloud_cost_ms_per_compute_ms * cloud_ms;

        // Link utilisation: every token's row crosses each used link once.
        let sessions = f64::from(cfg.workload.concurrent_sessions);
        for j in 0..row_ms.len() {
            let u = if latency > 0.0 {
                sessions * row_ms[j] / latency
            } else {
                0.0
            };
            if detail {
                links[j].utilisation = u;
            }
            if let BackfillMode::Background {
                max_link_utilisation,
            } = cfg.backfill
            {
                if verdict.is_none() && u > max_link_utilisation {
                    verdict = Some(Verdict::LinkSaturated {
                        from: inp.tiers[j].role,
                        to: inp.tiers[j + 1].role,
                        utilisation: u,
                    });
                }
            }
        }
        if verdict.is_none() && enforce_accuracy && agreement < cfg.accuracy_target - 1e-12 {
            verdict = Some(Verdict::BelowAccuracy {
                agreement,
                target: cfg.accuracy_target,
            });
        }
        Eval {
            latency,
            agreement,
            score,
            energy_j,
            cloud_ms,
            overflow,
            verdict,
            tiers,
            links,
        }
    }
}
