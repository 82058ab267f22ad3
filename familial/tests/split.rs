//! Invariant I1 (split equivalence) and exact KV backfill on seeded checkpoints, with every
//! tier loaded separately as its own model part, the way nodes load them.

use std::path::Path;

use candle_core::Tensor;
use flow_familial::init::{init_checkpoint, Preset};
use flow_familial::{FamilialModel, Layout, ModelConfig, Part, Rows, Seg, SeqCache};

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn part(
    dir: &Path,
    embed: bool,
    trunk: std::ops::Range<usize>,
    exits: Vec<usize>,
) -> FamilialModel {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    FamilialModel::load_part(
        dir,
        cfg,
        Part {
            embed,
            trunk,
            exits,
        },
    )
    .unwrap()
}

const PROMPT: [u32; 9] = [256, 49, 50, 43, 51, 52, 61, 10, 200];

/// I1: for every split point k, layers [0,k) on one part and [k,P) on another give the
/// logits of a single-process forward — for prefill and for five decode steps with KV.
fn split_equivalence(layout: Layout) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = init_checkpoint(Preset::Tiny, layout, 7, dir.path()).unwrap();
    let full = FamilialModel::load(dir.path()).unwrap();
    let p = cfg.last_exit().point;
    let decode: [u32; 5] = [3, 77, 128, 257, 9];
    for exit in cfg.exit_points() {
        // Reference: one process, prefill + decode.
        let mut c = full.new_cache();
        let mut want = vec![full.forward_exit(&PROMPT, exit, &mut c).unwrap()];
        for &t in &decode {
            want.push(full.forward_exit(&[t], exit, &mut c).unwrap());
        }
        for k in 0..=exit {
            let lower = part(dir.path(), true, 0..k, vec![]);
            let upper = part(dir.path(), false, k..exit, vec![exit]);
            let (mut cl, mut cu) = (lower.new_cache(), upper.new_cache());
            let mut pos = 0;
            for (step, toks) in std::iter::once(&PROMPT[..])
                .chain(decode.chunks(1))
                .enumerate()
            {
                let seg = [Seg::new(pos, toks.len())];
                let h = lower.embed(toks).unwrap();
                let h = lower.run_layers(&h, 0..k, &seg, &mut [&mut cl]).unwrap();
                // The hidden state crosses to the other part as plain f32 values.
                let shipped = Tensor::from_vec(
                    h.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    h.dims(),
                    &candle_core::Device::Cpu,
                )
                .unwrap();
                let h = upper
                    .run_layers(&shipped, k..exit, &seg, &mut [&mut cu])
                    .unwrap();
                let got = upper
                    .exit(&h, exit, &seg, &mut [&mut cu], Rows::All)
                    .unwrap();
                let d = max_rel_diff(&got, &want[step]);
                assert!(
                    d <= 1e-4,
                    "{layout:?} exit {exit} split {k} step {step}: {d}"
                );
                pos += toks.len();
            }
        }
    }
    // run_layers(0..k) then (k..L) equals run_layers(0..L) on the same part.
    for k in 0..=cfg.num_layers {
        let (mut a, mut b) = (full.new_cache(), full.new_cache());
        let seg = [Seg::new(0, PROMPT.len())];
        let h = full.embed(&PROMPT).unwrap();
        let one = full
            .run_layers(&h, 0..cfg.num_layers, &seg, &mut [&mut a])
            .unwrap();
        let two = full.run_layers(&h, 0..k, &seg, &mut [&mut b]).unwrap();
        let two = full
            .run_layers(&two, k..cfg.num_layers, &seg, &mut [&mut b])
            .unwrap();
        assert!(max_rel_diff(&two, &one) <= 1e-6, "split {k} of the trunk");
    }
    let _ = p;
}

#[test]
fn i1_split_equivalence_ruyi() {
    split_equivalence(Layout::RuyiQwen2);
}

#[test]
fn i1_split_equivalence_plain_llama_family() {
    split_equivalence(Layout::Llama);
}

/// A token sequence whose positions exited at device (1), edge (3) or cloud (5) exits.
/// Each tier backfills the positions it missed from the hidden states the tier below kept,
/// and afterwards every tier's next-token logits equal a full forward of the whole
/// sequence at that tier's exit.
#[test]
fn backfill_after_mixed_depth_exits_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = init_checkpoint(Preset::Tiny, Layout::RuyiQwen2, 11, dir.path()).unwrap();
    assert_eq!(cfg.exit_points(), vec![1, 3, 5]);
    let device = part(dir.path(), true, 0..1, vec![1]);
    let edge = part(dir.path(), false, 1..3, vec![3]);
    let cloud = part(dir.path(), false, 3..5, vec![5]);
    let full = FamilialModel::load(dir.path()).unwrap();

    let tokens: Vec<u32> = vec![256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100];
    // Depth each position exits at (0 = device, 1 = edge, 2 = cloud).
    let depth = [0usize, 0, 2, 0, 1, 1, 0, 0, 2, 0, 1, 0, 2];
    let (mut cd, mut ce, mut cc) = (device.new_cache(), edge.new_cache(), cloud.new_cache());
    // Hidden states each tier still owes its parent (positions the parent has not seen).
    let mut owed_edge: Vec<Tensor> = Vec::new(); // layer-1 states
    let mut owed_cloud: Vec<Tensor> = Vec::new(); // layer-3 states
    let mut edge_pos = 0;
    let mut cloud_pos = 0;
    for (p, &t) in tokens.iter().enumerate() {
        let seg = [Seg::new(p, 1)];
        let h1 = device
            .run_layers(&device.embed(&[t]).unwrap(), 0..1, &seg, &mut [&mut cd])
            .unwrap();
        device
            .exit(&h1, 1, &seg, &mut [&mut cd], Rows::Last)
            .unwrap();
        owed_edge.push(h1.clone());
        if depth[p] == 0 {
            continue;
        }
        // Escalate to the edge: backfill the positions it missed, then this one.
        let missed = owed_edge.len() - 1;
        if missed > 0 {
            let hs = Tensor::cat(&owed_edge[..missed], 0).unwrap();
            let h3 = edge
                .backfill(
                    &hs,
                    1..3,
                    &[3],
                    &[Seg::new(edge_pos, missed)],
                    &mut [&mut ce],
                )
                .unwrap();
            owed_cloud.push(h3);
        }
        let h3 = edge.run_layers(&h1, 1..3, &seg, &mut [&mut ce]).unwrap();
        edge.exit(&h3, 3, &seg, &mut [&mut ce], Rows::Last).unwrap();
        owed_edge.clear();
        edge_pos = p + 1;
        owed_cloud.push(h3.clone());
        if depth[p] == 1 {
            continue;
        }
        let missed: usize = owed_cloud[..owed_cloud.len() - 1]
            .iter()
            .map(|t| t.dim(0).unwrap())
            .sum();
        if missed > 0 {
            let hs = Tensor::cat(&owed_cloud[..owed_cloud.len() - 1], 0).unwrap();
            cloud
                .backfill(
                    &hs,
                    3..5,
                    &[5],
                    &[Seg::new(cloud_pos, missed)],
                    &mut [&mut cc],
                )
                .unwrap();
        }
        let h5 = cloud.run_layers(&h3, 3..5, &seg, &mut [&mut cc]).unwrap();
        cloud
            .exit(&h5, 5, &seg, &mut [&mut cc], Rows::Last)
            .unwrap();
        owed_cloud.clear();
        cloud_pos = p + 1;
    }
    // The next position: everyone catches up, then compare with a full forward.
    let next = 42u32;
    let all: Vec<u32> = tokens.iter().copied().chain([next]).collect();
    let p = tokens.len();
    let seg = [Seg::new(p, 1)];
    let h1 = device
        .run_layers(&device.embed(&[next]).unwrap(), 0..1, &seg, &mut [&mut cd])
        .unwrap();
    let dev_logits = device
        .exit(&h1, 1, &seg, &mut [&mut cd], Rows::Last)
        .unwrap();
    if !owed_edge.is_empty() {
        let n = owed_edge.len();
        let hs = Tensor::cat(&owed_edge, 0).unwrap();
        let h3 = edge
            .backfill(&hs, 1..3, &[3], &[Seg::new(edge_pos, n)], &mut [&mut ce])
            .unwrap();
        owed_cloud.push(h3);
    }
    let h3 = edge.run_layers(&h1, 1..3, &seg, &mut [&mut ce]).unwrap();
    let edge_logits = edge.exit(&h3, 3, &seg, &mut [&mut ce], Rows::Last).unwrap();
    if !owed_cloud.is_empty() {
        let n: usize = owed_cloud.iter().map(|t| t.dim(0).unwrap()).sum();
        let hs = Tensor::cat(&owed_cloud, 0).unwrap();
        cloud
            .backfill(&hs, 3..5, &[5], &[Seg::new(cloud_pos, n)], &mut [&mut cc])
            .unwrap();
    }
    let h5 = cloud.run_layers(&h3, 3..5, &seg, &mut [&mut cc]).unwrap();
    let cloud_logits = cloud
        .exit(&h5, 5, &seg, &mut [&mut cc], Rows::Last)
        .unwrap();

    for (exit, got) in [(1, dev_logits), (3, edge_logits), (5, cloud_logits)] {
        let mut c = full.new_cache();
        let want = full.forward_exit(&all, exit, &mut c).unwrap();
        let want = want.narrow(0, p, 1).unwrap();
        let d = max_rel_diff(&got, &want);
        assert!(d <= 1e-4, "exit {exit}: {d}");
    }
}

/// Skipping the backfill is an error, not a silently wrong answer.
#[test]
fn missing_backfill_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    init_checkpoint(Preset::Tiny, Layout::RuyiQwen2, 1, dir.path()).unwrap();
    let edge = part(dir.path(), false, 1..3, vec![3]);
    let mut c: SeqCache = edge.new_cache();
    let h = Tensor::zeros((1, 64), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let err = edge
        .run_layers(&h, 1..3, &[Seg::new(4, 1)], &mut [&mut c])
        .unwrap_err();
    assert!(err.to_string().contains("backfill"), "{err}");
    let err = edge
        .run_layers(&h, 3..4, &[Seg::new(0, 1)], &mut [&mut c])
        .unwrap_err();
    assert!(err.to_string().contains("not hosted"), "{err}");
    assert!(edge.embed(&[1]).is_err());
}

/// Speculative rollback: truncating the cache and recomputing gives the same logits.
#[test]
fn truncate_then_recompute_matches() {
    let dir = tempfile::tempdir().unwrap();
    init_checkpoint(Preset::Tiny, Layout::Qwen2, 3, dir.path()).unwrap();
    let m = FamilialModel::load(dir.path()).unwrap();
    let exit = m.config().last_exit().point;
    let mut c = m.new_cache();
    m.forward_exit(&PROMPT, exit, &mut c).unwrap();
    let a = m.forward_exit(&[1, 2, 3], exit, &mut c).unwrap();
    c.truncate(PROMPT.len());
    let b = m.forward_exit(&[1, 2, 3], exit, &mut c).unwrap();
    assert!(max_rel_diff(&a, &b) == 0.0);
    let mut fork = c.fork().unwrap();
    let x = m.forward_exit(&[9], exit, &mut fork).unwrap();
    let y = m.forward_exit(&[9], exit, &mut c).unwrap();
    assert!(max_rel_diff(&x, &y) == 0.0);
}
