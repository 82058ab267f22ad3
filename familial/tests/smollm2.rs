//! SmolLM2-135M-Instruct (GGUF Q4_1) against llama.cpp on the same file
//! (`tests/fixtures/gguf/smollm2_reference.json`, written by `make_smollm2_reference.py`
//! with llama-cpp-python): logits at the last prompt position and the next 8 positions of 8
//! chat prompts, and free-running greedy continuations. Both sides keep an f32 KV cache and
//! quantize activations per 32-block (Q8_1 for Q4_1 weights, Q8_0 for the Q8_0 head), so
//! the remaining differences come from f32 summation order and rounding of those blocks.

mod common;

use flow_familial::{ModelSource, Part, Rows, Seg};
use serde::Deserialize;

#[derive(Deserialize)]
struct Record {
    top: Vec<(u32, f32)>,
    max: f32,
    argmax: u32,
}

#[derive(Deserialize)]
struct Prompt {
    tag: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    logits_kv_f32: Vec<Record>,
    greedy_ids_kv_f32: Vec<u32>,
}

#[derive(Deserialize)]
struct Reference {
    prompts: Vec<Prompt>,
}

/// Largest |Δlogit| allowed over llama.cpp's top-20 ids at any checked position. Both sides
/// round activations to 8-bit blocks after every matmul, so a last-bit difference upstream
/// can move a rounding step and a few logits by far more than float noise: llama.cpp's own
/// runs with an f16 and an f32 KV cache differ by up to 1.30 at these positions, and an
/// exact f32 forward (numpy over gguf-py-dequantized weights) is up to 0.94 (mean 0.15) away
/// from llama.cpp. Measured here: max 1.44 (one token, translation position 5), mean 0.19.
const LOGIT_TOL: f32 = 1.5;
/// Largest mean |Δlogit| over all checked logits.
const MEAN_TOL: f32 = 0.25;
/// Where greedy continuations part, the two tokens must be this close in our logits.
const TIE_TOL: f32 = 0.25;

fn reference() -> Reference {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf/smollm2_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

struct Runner {
    model: flow_familial::FamilialModel,
    exit: usize,
}

impl Runner {
    fn open() -> Option<Self> {
        let path = common::smollm2_gguf()?;
        let src = ModelSource::open(&path).unwrap();
        let cfg = src.config().unwrap();
        let exit = cfg.last_exit().point;
        let model = src.load_part(cfg.clone(), Part::full(&cfg)).unwrap();
        Some(Self { model, exit })
    }

    /// Logits of the last position after feeding `ids` at `pos`.
    fn step(&self, ids: &[u32], pos: usize, cache: &mut flow_familial::SeqCache) -> Vec<f32> {
        let seg = [Seg::new(pos, ids.len())];
        let h = self.model.embed(ids).unwrap();
        let h = self
            .model
            .run_layers(&h, 0..self.exit, &seg, &mut [&mut *cache])
            .unwrap();
        let l = self
            .model
            .exit(&h, self.exit, &seg, &mut [cache], Rows::Last)
            .unwrap();
        l.squeeze(0).unwrap().to_vec1().unwrap()
    }
}

fn argmax(v: &[f32]) -> u32 {
    flow_familial::sample::argmax(v)
}

#[test]
fn logits_match_llama_cpp() {
    let Some(r) = Runner::open() else { return };
    let refs = reference();
    let mut worst = (0f32, String::new());
    let (mut sum, mut count) = (0f64, 0usize);
    let mut argmax_agree = (0, 0);
    for p in &refs.prompts {
        let mut cache = r.model.new_cache();
        let mut logits = r.step(&p.prompt_ids, 0, &mut cache);
        for (pos, (k, rec)) in (p.prompt_ids.len()..).zip(p.logits_kv_f32.iter().enumerate()) {
            for &(id, want) in &rec.top {
                let d = (logits[id as usize] - want).abs();
                sum += d as f64;
                count += 1;
                if d > worst.0 {
                    worst = (d, format!("{} position {k} token {id}", p.tag));
                }
            }
            let ours_max = logits.iter().fold(f32::MIN, |m, &x| m.max(x));
            let d = (ours_max - rec.max).abs();
            if d > worst.0 {
                worst = (d, format!("{} position {k} max logit", p.tag));
            }
            argmax_agree.1 += 1;
            if argmax(&logits) == rec.argmax {
                argmax_agree.0 += 1;
            } else {
                // Explained only by a near tie in our own logits.
                let ours = argmax(&logits);
                let margin = logits[ours as usize] - logits[rec.argmax as usize];
                assert!(
                    margin <= TIE_TOL,
                    "{} position {k}: argmax {} vs llama.cpp {} with our margin {margin}",
                    p.tag,
                    argmax(&logits),
                    rec.argmax
                );
            }
            // Force llama.cpp's (f16-KV) greedy token, as the reference did.
            let Some(&next) = p.greedy_ids.get(k) else {
                break;
            };
            logits = r.step(&[next], pos, &mut cache);
        }
    }
    let mean = (sum / count.max(1) as f64) as f32;
    eprintln!(
        "|Δlogit| over llama.cpp's top-20: max {:.4} ({}), mean {mean:.4}; argmax agrees at {}/{} positions",
        worst.0, worst.1, argmax_agree.0, argmax_agree.1
    );
    assert!(mean <= MEAN_TOL, "mean |Δlogit| {mean}");
    assert!(
        worst.0 <= LOGIT_TOL,
        "max |Δlogit| {} at {}",
        worst.0,
        worst.1
    );
}

/// Free-running greedy continuations (32 tokens or EOS) equal llama.cpp's (f32 KV), or part
/// only where our own logits of the two candidate tokens are within [`TIE_TOL`].
#[test]
fn greedy_continuations_match_llama_cpp() {
    let Some(r) = Runner::open() else { return };
    let refs = reference();
    let mut equal = 0;
    for p in &refs.prompts {
        let want = &p.greedy_ids_kv_f32;
        let mut cache = r.model.new_cache();
        let mut logits = r.step(&p.prompt_ids, 0, &mut cache);
        let mut pos = p.prompt_ids.len();
        let mut got = Vec::new();
        while got.len() < want.len() {
            let t = argmax(&logits);
            got.push(t);
            if t == 2 {
                break;
            }
            logits = r.step(&[t], pos, &mut cache);
            pos += 1;
        }
        if &got == want {
            equal += 1;
            continue;
        }
        // Where the two disagree, our own logits must show a near tie between the two
        // tokens: a difference of activation rounding, not of the model.
        let at = got.iter().zip(want).take_while(|(a, b)| a == b).count();
        let (Some(&ours), Some(&theirs)) = (got.get(at), want.get(at)) else {
            panic!("{}: lengths differ without a token difference", p.tag)
        };
        let mut cache = r.model.new_cache();
        let mut l = r.step(&p.prompt_ids, 0, &mut cache);
        for (i, &t) in got[..at].iter().enumerate() {
            l = r.step(&[t], p.prompt_ids.len() + i, &mut cache);
        }
        let gap = l[ours as usize] - l[theirs as usize];
        eprintln!(
            "{}: diverges at generated token {at}: ours {ours}, llama.cpp {theirs}, our logit gap {gap:.3}",
            p.tag
        );
        assert!(
            gap <= TIE_TOL,
            "{}: divergence at token {at} with a gap of {gap}",
            p.tag
        );
    }
    eprintln!(
        "greedy continuations equal on {equal}/{} prompts; every other one parts at a near tie",
        refs.prompts.len()
    );
}
