//! Speculative decoding with sampling (temperature > 0) keeps the target distribution
//! exactly, on three real agents (device drafts from its exit, the cloud verifies) over
//! loopback QUIC with mutual TLS.
//!
//! How: tokens are sampled by the Gumbel-max trick with noise keyed by (seed, position,
//! token id) (`session::wire::choose`, `flow_familial::sample`), so drafter and verifier
//! share every token's noise. The verifier emits its *own* sample at the first position
//! where the draft differs, so every emitted token is the target model's sample — the same
//! token a single node with the same seed would pick — and drafts are accepted when the two
//! samples coincide (likely when the exit's and the model's distributions are close). No
//! draft probabilities travel.
//!
//! Checked: (1) over many seeds the first generated token's frequencies match the cloud's
//! distribution p (softmax of the full model's logits at the temperature, computed here
//! from the checkpoint) within a chi-square bound (α = 0.001); (2) for every seed the
//! speculative answer equals the single node's with the same seed, token for token.

mod common;

use common::{ids, policy};
use flow_familial::FamilialModel;
use flow_node::GenerateRequest;
use flow_protocol::{InferMode, Policy, Sampling};

const PROMPT: &[u32] = &[256, 49, 50, 43, 51, 52, 61];
const SEEDS: u64 = 400;
const NEW: usize = 3;
/// Low enough that a few tokens hold most of the tiny family's mass (bins of ≥ 5 expected).
const TEMPERATURE: f32 = 0.25;

fn sampled(seed: u64, p: Policy) -> GenerateRequest {
    GenerateRequest {
        prompt: PROMPT.to_vec(),
        max_new_tokens: NEW,
        sampling: Sampling {
            temperature: TEMPERATURE,
            seed,
            ..Sampling::default()
        },
        policy: Some(p),
        stop_tokens: vec![],
    }
}

/// Softmax of the last row of `exit`'s logits over `PROMPT` at `TEMPERATURE`.
fn distribution(model: &FamilialModel, exit: usize) -> Vec<f64> {
    let logits = model
        .forward_exit(PROMPT, exit, &mut model.new_cache())
        .unwrap();
    let row: Vec<f32> = logits.get(PROMPT.len() - 1).unwrap().to_vec1().unwrap();
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let w: Vec<f64> = row
        .iter()
        .map(|&x| f64::from((x - max) / TEMPERATURE).exp())
        .collect();
    let total: f64 = w.iter().sum();
    w.iter().map(|x| x / total).collect()
}

/// Upper `alpha = 0.001` point of chi-square with `df` degrees of freedom
/// (Wilson–Hilferty; within ~1 % for df ≥ 3).
fn chi2_critical(df: usize) -> f64 {
    let k = df as f64;
    let z = 3.090_232; // standard normal upper 0.001 point
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculative_sampling_keeps_the_target_distribution() {
    let (dir, certs) = (
        common::tiny_family_without_eos(),
        tempfile::tempdir().unwrap(),
    );
    let model = FamilialModel::load(dir.path()).unwrap();
    let p = distribution(&model, 5);
    let q = distribution(&model, 1);
    let c = common::tiny_cluster(dir.path(), certs.path()).await;
    let single = common::single_reference(dir.path()).await;
    let spec = Policy {
        draft_len: 2,
        ..policy(InferMode::Speculate)
    };
    let mut counts = vec![0usize; p.len()];
    let (mut proposed, mut accepted) = (0usize, 0usize);
    for seed in 0..SEEDS {
        let (got, stats) = c
            .device
            .generate_collect(sampled(seed, spec.clone()))
            .await
            .unwrap();
        let (want, _) = single
            .generate_collect(sampled(seed, policy(InferMode::Local)))
            .await
            .unwrap();
        assert_eq!(
            ids(&got),
            ids(&want),
            "seed {seed}: speculate vs single node"
        );
        counts[got[0].id as usize] += 1;
        proposed += stats.drafts_proposed;
        accepted += stats.drafts_accepted;
    }

    // Bins: every token expected ≥ 5 times on its own, the rest pooled (into the
    // smallest bin when the pool is too small).
    let n = SEEDS as f64;
    let mut bins: Vec<(f64, usize)> = Vec::new();
    let (mut rest_e, mut rest_o) = (0.0, 0usize);
    for (t, &pt) in p.iter().enumerate() {
        if pt * n >= 5.0 {
            bins.push((pt * n, counts[t]));
        } else {
            rest_e += pt * n;
            rest_o += counts[t];
        }
    }
    if rest_e >= 5.0 {
        bins.push((rest_e, rest_o));
    } else if let Some(last) = bins.last_mut() {
        last.0 += rest_e;
        last.1 += rest_o;
    }
    assert!(bins.len() >= 3, "too few bins for a test: {bins:?}");
    let chi2: f64 = bins.iter().map(|&(e, o)| (o as f64 - e).powi(2) / e).sum();
    let crit = chi2_critical(bins.len() - 1);
    // what the accept/reject rule would accept per draft at the first position (Σ min(p, q))
    let overlap: f64 = p.iter().zip(&q).map(|(a, b)| a.min(*b)).sum();
    eprintln!(
        "first token over {SEEDS} seeds: {} bins, chi2 {chi2:.1} (critical {crit:.1}); drafts accepted \
         {accepted}/{proposed} = {:.2} (coupled; the rule's first-position rate Σmin(p,q) = {overlap:.2})",
        bins.len(),
        accepted as f64 / proposed.max(1) as f64
    );
    assert!(
        chi2 < crit,
        "first-token frequencies differ from the model's distribution: chi2 {chi2:.1} ≥ {crit:.1}; bins (expected, observed) {bins:?}"
    );
    assert!(proposed > 0, "no drafts were proposed");
    single.shutdown().await;
    c.shutdown().await;
}
