//! `flow-node model init | inspect | run`: create a seeded checkpoint, describe a
//! checkpoint's members, and generate text at one exit.
//!
//! A *family* is one transformer trunk with several early exits. Exit `e` reads the hidden
//! state after trunk layers `[0, e)`, runs its own block, norm and head, and so behaves like
//! a member model of `e + 1` blocks: shallow exits are small and fast, the deepest exit is
//! the full model.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::DType;
use flow_familial::confidence::Confidence;
use flow_familial::config::{ExitBlock, HeadRef, NormRef};
use flow_familial::init::Preset;
use flow_familial::init::{init_weights, member_parameters, preset_config, write_checkpoint};
use flow_familial::sample::{Sampler, SamplingParams};
use flow_familial::tokenizer::Tokenizer;
use flow_familial::weights::checkpoint_files;
use flow_familial::{FamilialModel, Layout, ModelSource, Part, Rows, Seg};
use serde::Serialize;

use super::OsInstant;

macro_rules! exit_help {
    () => {
        "\n\nWhat an exit is:
  A familial model is one trunk of decoder layers with several early exits. Exit E reads
  the hidden state after trunk layers [0, E), runs its own decoder block, norm and LM head,
  so it answers after E+1 blocks. Shallow exits are the small members (fast, on devices),
  the deepest exit is the full model (cloud). `flow-node model inspect DIR` lists them."
    };
}

/// Layout names accepted on the command line (HF `model_type`).
pub fn parse_layout(s: &str) -> Result<Layout, String> {
    Layout::from_model_type(s).map_err(|_| {
        format!("unknown layout `{s}` (use ruyi_qwen2, qwen2, llama, mixtral or qwen2_moe)")
    })
}

/// Preset names accepted on the command line.
pub fn parse_preset(s: &str) -> Result<Preset, String> {
    s.parse()
}

/// Weight dtype written to `model.safetensors`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl DtypeArg {
    pub(crate) fn dtype(self) -> DType {
        match self {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 => DType::F16,
            DtypeArg::Bf16 => DType::BF16,
        }
    }
}

#[derive(clap::Args, Debug)]
#[command(after_long_help = concat!("Examples:
  flow-node model init --preset tiny --layout ruyi_qwen2 --seed 1 --out /tmp/tiny
  flow-node model init --preset small --layout qwen2 --dtype f16 --out models/small-f16
  flow-node model init --preset moe-small --layout mixtral --out /tmp/moe

Then: `flow-node model inspect DIR` and `flow-node model run DIR --exit E --prompt TEXT`.", exit_help!()))]
pub struct InitArgs {
    /// Family size: `tiny` (tests, ~0.4M parameters, exits 1/3/5), `small` (demo, ~2.4M,
    /// exits 1/3/5/7), `moe-small` (layers 4-7 Mixture-of-Experts, 8 experts, top-2;
    /// layout qwen2_moe unless --layout mixtral) or `medium` (serving benchmarks: hidden
    /// 384, 6 layers, exits 1/3/5, 4096 positions, ~10M parameters; seeded weights give
    /// meaningless text but real compute costs, see `flow-node bench batching --preset`).
    #[arg(long, default_value = "tiny", value_parser = parse_preset)]
    pub preset: Preset,
    /// Tensor naming / architecture (HF `model_type`): ruyi_qwen2 (own exit blocks, norms and
    /// heads), qwen2, llama (exits reuse the final norm and head), mixtral, qwen2_moe.
    /// Default: ruyi_qwen2, or qwen2_moe for `--preset moe-small`.
    #[arg(long, value_parser = parse_layout)]
    pub layout: Option<Layout>,
    /// Seed of the weight initialisation: the same seed gives the same weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Directory to write config.json, model.safetensors and tokenizer.json into.
    #[arg(long)]
    pub out: PathBuf,
    /// dtype of the stored weights (compute is always f32).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Overwrite the checkpoint files of a non-empty --out directory.
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::Args, Debug)]
#[command(after_long_help = "\
Examples:
  flow-node model inspect /tmp/tiny
  flow-node model inspect /tmp/tiny --json | jq '.members[] | {exit, parameters}'

A member is what one exit runs: the embedding, trunk layers [0, E), the exit's block, norm
and head. Members share the trunk, so their sizes overlap; the totals count each tensor once.
The fingerprint is a SHA-256 over every tensor's name, dtype, shape and bytes (first 16 hex
digits shown): two nodes with the same fingerprint hold the same weights.")]
pub struct InspectArgs {
    /// The model: an HF checkpoint directory (config.json + safetensors), a GGUF file, or a
    /// pulled name.
    #[arg(value_parser = super::model_arg)]
    pub dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
#[command(after_long_help = concat!("Examples:
  flow-node model run /tmp/tiny --exit 1 --prompt '12+34=' --max-tokens 8
  flow-node model run /tmp/tiny --exit 5 --prompt 'hello' --json
  flow-node model run /tmp/tiny --exit 5 --prompt 'hello' --temperature 0.8 --top-p 0.9 --seed 3

Generation uses a KV cache: the prompt is prefilled once, then each new token runs trunk
layers [0, E) and exit E's block, norm and head on that one position.", exit_help!()))]
pub struct RunArgs {
    /// The model: an HF checkpoint directory, a GGUF file, or a pulled name
    /// (`flow-node model pull smollm2-135m-instruct`).
    #[arg(value_parser = super::model_arg)]
    pub dir: PathBuf,
    /// Exit point to generate at (default: the deepest; see `flow-node model inspect`).
    #[arg(long)]
    pub exit: Option<usize>,
    /// Prompt text (tokenized with the model's tokenizer).
    #[arg(long)]
    pub prompt: String,
    /// Treat --prompt as a user message and render it with the model's chat template
    /// (what instruction-tuned models such as SmolLM2-Instruct expect; the built-in
    /// families' `<|q|>…<|a|>` when the model has none, as the HTTP API does).
    #[arg(long)]
    pub chat: bool,
    /// Stop after this many new tokens (or earlier at an end-of-sequence token).
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Print one JSON object (tokens, text, top logits and confidence at the last position)
    /// instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Sampling temperature; 0 (the default) is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampler (only used with --temperature > 0).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Do not prepend the beginning-of-sequence token (prepended when the model asks for
    /// it: `add_bos_token`, or a BOS declared in an HF config).
    #[arg(long)]
    pub no_bos: bool,
    /// Compute threads (default: $RAYON_NUM_THREADS, else 1; one is fastest for small
    /// families on few cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

// ---------------------------------------------------------------------------------------
// init

pub fn init(a: InitArgs) -> anyhow::Result<()> {
    if a.out.exists() {
        if !a.out.is_dir() {
            bail!(
                "--out {} exists and is not a directory; choose another path",
                a.out.display()
            );
        }
        let non_empty = std::fs::read_dir(&a.out)
            .with_context(|| format!("reading {}", a.out.display()))?
            .next()
            .is_some();
        if non_empty && !a.force {
            bail!(
                "--out {} is not empty; pass --force to overwrite the checkpoint files in it, \
                 or choose an empty directory",
                a.out.display()
            );
        }
        // A stale shard index would shadow the new model.safetensors.
        let index = a.out.join("model.safetensors.index.json");
        if index.exists() {
            std::fs::remove_file(&index)
                .with_context(|| format!("removing the stale {}", index.display()))?;
        }
    }
    let layout = a.layout.unwrap_or(match a.preset {
        Preset::MoeSmall => Layout::Qwen2Moe,
        _ => Layout::RuyiQwen2,
    });
    let cfg = preset_config(a.preset, layout).context("choosing the configuration")?;
    let t0 = OsInstant::now();
    let weights = init_weights(&cfg, a.seed).context("initialising weights")?;
    write_checkpoint(&cfg, &weights, a.dtype.dtype(), &a.out)
        .with_context(|| format!("writing the checkpoint to {}", a.out.display()))?;
    let params: usize = weights.values().map(|t| t.elem_count()).sum();
    let st = a.out.join("model.safetensors");
    let bytes = std::fs::metadata(&st)
        .with_context(|| format!("reading {}", st.display()))?
        .len();
    println!(
        "wrote {} ({}, {}, seed {}, {} weights) in {:.2}s",
        a.out.display(),
        preset_name(a.preset),
        cfg.layout.model_type(),
        a.seed,
        format!("{:?}", a.dtype).to_lowercase(),
        t0.elapsed().as_secs_f64()
    );
    println!(
        "  config.json, model.safetensors ({}), tokenizer.json",
        human_bytes(bytes)
    );
    println!(
        "  {} parameters, hidden {}, {} layers, {} heads / {} kv heads, vocab {}",
        group(params as u64),
        cfg.hidden_size,
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.vocab_size
    );
    println!("  exits (member parameters):");
    for e in &cfg.exits {
        println!(
            "    exit {:>2}: {:>2} blocks, {} parameters",
            e.point,
            e.depth(),
            group(member_parameters(&cfg, e.point)? as u64)
        );
    }
    Ok(())
}

fn preset_name(p: Preset) -> &'static str {
    match p {
        Preset::Tiny => "tiny",
        Preset::Small => "small",
        Preset::MoeSmall => "moe-small",
        Preset::Medium => "medium",
    }
}

// ---------------------------------------------------------------------------------------
// inspect

/// One member (exit) of a family, as `inspect` reports it.
#[derive(Debug, Serialize)]
pub struct MemberInfo {
    pub exit: usize,
    /// Decoder blocks on this exit's path.
    pub depth: usize,
    /// `own` (Ruyi exit block `model.eelayers.i`) or `trunk` (reuses a trunk layer).
    pub block: String,
    pub norm: String,
    pub head: String,
    pub parameters: u64,
    pub bytes: u64,
}

/// What `inspect --json` prints.
#[derive(Debug, Serialize)]
pub struct InspectReport {
    pub dir: String,
    pub layout: String,
    pub hidden_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub moe_layers: usize,
    pub dtype_on_disk: Vec<String>,
    pub files: Vec<FileInfo>,
    pub exits: Vec<usize>,
    pub members: Vec<MemberInfo>,
    pub total_parameters: u64,
    pub total_bytes: u64,
    pub tensors: usize,
    pub fingerprint: String,
}

/// One safetensors file (shard) of a checkpoint.
#[derive(Debug, Serialize)]
pub struct FileInfo {
    pub name: String,
    pub bytes: u64,
}

fn check_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        bail!(
            "model directory {} does not exist; create one with \
             `flow-node model init --preset tiny --out {}`",
            dir.display(),
            dir.display()
        );
    }
    if !dir.is_dir() {
        bail!(
            "{} is not a directory; pass the checkpoint directory (the one holding config.json)",
            dir.display()
        );
    }
    let cfg = dir.join("config.json");
    if !cfg.exists() {
        bail!(
            "{} has no config.json; is it an HF checkpoint directory?",
            dir.display()
        );
    }
    Ok(())
}

fn open_source(dir: &Path) -> anyhow::Result<ModelSource> {
    if !flow_familial::source::is_gguf(dir) && !flow_familial::family::is_family_dir(dir) {
        check_dir(dir)?;
    }
    ModelSource::open(dir).map_err(anyhow::Error::from)
}

/// Describe the checkpoint in `dir` (an HF directory or a GGUF file).
pub fn inspect_report(dir: &Path) -> anyhow::Result<InspectReport> {
    let ck = open_source(dir)?;
    let cfg = ck.config()?;
    let infos = ck.tensor_infos();
    let params_of = |name: &str| -> anyhow::Result<(u64, u64)> {
        let (_, shape) = infos.get(name).with_context(|| {
            format!(
                "tensor `{name}` is missing from the checkpoint in {}; is it complete?",
                dir.display()
            )
        })?;
        let n: usize = shape.iter().product();
        let b = ck.stored_bytes(name).unwrap_or(0);
        Ok((n as u64, b as u64))
    };
    let mut members = Vec::new();
    for e in &cfg.exits {
        let part = Part {
            embed: true,
            trunk: 0..e.point,
            exits: vec![e.point],
        };
        let mut parameters = 0;
        let mut bytes = 0;
        for name in FamilialModel::tensor_names(&cfg, &part)? {
            let (n, b) = params_of(&name)?;
            parameters += n;
            bytes += b;
        }
        members.push(MemberInfo {
            exit: e.point,
            depth: e.depth(),
            block: match e.block {
                ExitBlock::Own(i) => format!("own (model.eelayers.{i})"),
                ExitBlock::Trunk(l) => format!("trunk layer {l}"),
            },
            norm: match e.norm {
                NormRef::Own(i) => format!("model.norms.{i}"),
                NormRef::Final => "model.norm".into(),
            },
            head: match e.head {
                HeadRef::Own(i) => format!("lm_head.{i}"),
                HeadRef::Shared => "lm_head".into(),
                HeadRef::TiedEmbedding => "tied to model.embed_tokens".into(),
            },
            parameters,
            bytes,
        });
    }
    let mut total_parameters = 0u64;
    let mut total_bytes = 0u64;
    let mut dtypes = BTreeSet::new();
    for (name, (dt, shape)) in &infos {
        total_parameters += shape.iter().product::<usize>() as u64;
        total_bytes += ck.stored_bytes(name).unwrap_or(0) as u64;
        dtypes.insert(dt.to_lowercase());
    }
    let fp = ck.fingerprint(infos.keys().map(String::as_str))?;
    let files = match &ck {
        ModelSource::Hf(_) => checkpoint_files(dir)?,
        ModelSource::Gguf(_) => vec![dir.to_path_buf()],
        ModelSource::Family(f) => {
            let mut v = vec![
                dir.join(flow_familial::family::MANIFEST_FILE),
                dir.join("model.safetensors"),
            ];
            v.push(f.base().path());
            v
        }
    };
    let files = files
        .iter()
        .map(|p| -> anyhow::Result<FileInfo> {
            Ok(FileInfo {
                name: p
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                bytes: std::fs::metadata(p)
                    .with_context(|| format!("reading {}", p.display()))?
                    .len(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(InspectReport {
        dir: dir.display().to_string(),
        layout: cfg.layout.model_type().to_string(),
        hidden_size: cfg.hidden_size,
        layers: cfg.num_layers,
        heads: cfg.num_heads,
        kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        vocab_size: cfg.vocab_size,
        moe_layers: cfg
            .ffn
            .iter()
            .filter(|f| matches!(f, flow_familial::config::Ffn::Moe(_)))
            .count(),
        dtype_on_disk: dtypes.into_iter().collect(),
        files,
        exits: cfg.exit_points(),
        members,
        total_parameters,
        total_bytes,
        tensors: infos.len(),
        fingerprint: hex::encode(&fp[..8]),
    })
}

pub fn inspect(a: InspectArgs) -> anyhow::Result<()> {
    let r = inspect_report(&a.dir)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("checkpoint   {}", r.dir);
    println!("layout       {}", r.layout);
    println!(
        "shape        hidden {}, {} layers{}, {} heads / {} kv heads (head dim {}), vocab {}",
        r.hidden_size,
        r.layers,
        if r.moe_layers > 0 {
            format!(" ({} MoE)", r.moe_layers)
        } else {
            String::new()
        },
        r.heads,
        r.kv_heads,
        r.head_dim,
        r.vocab_size
    );
    println!(
        "dtype        {} on disk (f32 compute)",
        r.dtype_on_disk.join(", ")
    );
    let files: Vec<String> = r
        .files
        .iter()
        .map(|f| format!("{} ({})", f.name, human_bytes(f.bytes)))
        .collect();
    println!("files        {}", files.join(", "));
    println!("exits        {:?}", r.exits);
    println!();
    println!(
        "{:>5} {:>6} {:<24} {:<14} {:<28} {:>12} {:>10}",
        "exit", "blocks", "exit block", "norm", "head", "parameters", "bytes"
    );
    for m in &r.members {
        println!(
            "{:>5} {:>6} {:<24} {:<14} {:<28} {:>12} {:>10}",
            m.exit,
            m.depth,
            m.block,
            m.norm,
            m.head,
            group(m.parameters),
            human_bytes(m.bytes)
        );
    }
    println!(
        "{:>5} {:>6} {:<24} {:<14} {:<28} {:>12} {:>10}",
        "all",
        r.layers,
        format!("{} tensors", r.tensors),
        "",
        "",
        group(r.total_parameters),
        human_bytes(r.total_bytes)
    );
    println!();
    println!("fingerprint  {}", r.fingerprint);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// run

/// What `run --json` prints.
#[derive(Debug, Serialize, PartialEq)]
pub struct RunReport {
    pub exit: usize,
    pub prompt_tokens: usize,
    pub tokens: Vec<u32>,
    pub text: String,
    /// Why generation stopped: `eos`, `max_tokens` or `context`.
    pub stop: String,
    /// Top 10 `[token, logit, text]` at the last position computed.
    pub top_logits: Vec<(u32, f32, String)>,
    pub confidence: ConfidenceReport,
}

/// Confidence of the last position's logits.
#[derive(Debug, Serialize, PartialEq)]
pub struct ConfidenceReport {
    pub max_prob: f32,
    pub margin: f32,
    pub entropy: f32,
}

fn token_text(tok: &Tokenizer, id: u32) -> String {
    let t = tok.decode(&[id]).unwrap_or_default();
    if !t.is_empty() {
        return t;
    }
    match tok {
        Tokenizer::Hf(h) => h.id_to_token(id).unwrap_or_default(),
        Tokenizer::Bytes => String::new(),
    }
}

pub fn run(a: RunArgs) -> anyhow::Result<()> {
    // Run inside a pool of compute workers: candle's parallel kernels (norms, softmax,
    // rope, elementwise) then run inline on the worker instead of being handed from the
    // main thread to rayon's global pool op by op (`flow-node bench model --in-pool`
    // measures the difference: ~1.5x decode tokens/s on the small family).
    super::calibrate::in_pool(a.threads, || generate(a))
}

fn generate(a: RunArgs) -> anyhow::Result<()> {
    let source = open_source(&a.dir)?;
    let cfg = source.config()?;
    let exits = cfg.exit_points();
    let exit = a.exit.unwrap_or(cfg.last_exit().point);
    if !exits.contains(&exit) {
        bail!(
            "exit {} is not an exit of this family (exits: {:?}); see `flow-node model inspect {}`",
            exit,
            exits,
            a.dir.display()
        );
    }
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!("--temperature must be 0 (greedy) or a positive number");
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    let t_load = OsInstant::now();
    let part = Part {
        embed: true,
        trunk: 0..exit,
        exits: vec![exit],
    };
    let model = source.load_part(cfg.clone(), part)?;
    let tok = source.tokenizer()?;
    let load_s = t_load.elapsed().as_secs_f64();

    let text = if a.chat {
        // the model's own template, else the built-in families' one: what the HTTP API uses
        match source.chat()? {
            Some(template) => template.render(
                &[flow_familial::chat::ChatMessage {
                    role: "user".into(),
                    content: a.prompt.clone(),
                }],
                true,
            )?,
            None => flow_node::http::chat_prompt(&[("user".into(), a.prompt.clone())]),
        }
    } else {
        a.prompt.clone()
    };
    // the one BOS rule the HTTP API uses too (`Agent::encode_prompt`)
    let bos = cfg
        .bos_token_id
        .filter(|_| source.add_bos_token() && !a.no_bos);
    let prompt = tok.encode_prompt(&text, bos)?;
    if prompt.is_empty() {
        bail!("the prompt is empty (and --no-bos was given); pass some --prompt text");
    }
    let max_pos = cfg.max_position_embeddings;
    if prompt.len() >= max_pos {
        bail!(
            "the prompt has {} tokens but the model holds at most {max_pos} positions; \
             shorten it",
            prompt.len()
        );
    }

    let mut sampler = Sampler::new(SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: 0,
        seed: a.seed,
    });
    let mut cache = model.new_cache();
    let mut pos = 0usize;
    let mut input = prompt.clone();
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = String::new();
    let mut stdout = std::io::stdout().lock();
    let stop: &str;
    let mut last_row: Vec<f32>;
    let t_gen = OsInstant::now();
    let mut t_first = None;
    loop {
        let segs = [Seg::new(pos, input.len())];
        let h = model.embed(&input)?;
        let h = model.run_layers(&h, 0..exit, &segs, &mut [&mut cache])?;
        let logits = model.exit(&h, exit, &segs, &mut [&mut cache], Rows::Last)?;
        pos += input.len();
        let row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        if t_first.is_none() {
            t_first = Some(t_gen.elapsed());
        }
        if a.max_tokens == 0 {
            last_row = row;
            stop = "max_tokens";
            break;
        }
        let next = sampler.sample(&row);
        last_row = row;
        if cfg.eos_token_ids.contains(&next) {
            stop = "eos";
            break;
        }
        generated.push(next);
        if !a.json {
            let text = tok.decode(&generated)?;
            // Hold back an incomplete UTF-8 sequence until its last byte arrives.
            if !text.ends_with('\u{FFFD}') && text.starts_with(&printed) {
                stdout.write_all(&text.as_bytes()[printed.len()..])?;
                stdout.flush()?;
                printed = text;
            }
        }
        if generated.len() >= a.max_tokens {
            stop = "max_tokens";
            break;
        }
        if pos + 1 >= max_pos {
            stop = "context";
            break;
        }
        input = vec![next];
    }
    let gen_s = t_gen.elapsed().as_secs_f64();
    let text = tok.decode(&generated)?;
    let conf = Confidence::of_row(&last_row);
    let mut order: Vec<u32> = (0..last_row.len() as u32).collect();
    order.sort_by(|&x, &y| {
        last_row[y as usize]
            .total_cmp(&last_row[x as usize])
            .then(x.cmp(&y))
    });
    let top_logits: Vec<(u32, f32, String)> = order
        .iter()
        .take(10)
        .map(|&t| (t, last_row[t as usize], token_text(&tok, t)))
        .collect();
    if a.json {
        let r = RunReport {
            exit,
            prompt_tokens: prompt.len(),
            tokens: generated,
            text,
            stop: stop.into(),
            top_logits,
            confidence: ConfidenceReport {
                max_prob: conf.max_prob,
                margin: conf.margin,
                entropy: conf.entropy,
            },
        };
        writeln!(stdout, "{}", serde_json::to_string(&r)?)?;
    } else {
        if text.len() > printed.len() && text.starts_with(&printed) {
            stdout.write_all(&text.as_bytes()[printed.len()..])?;
        }
        writeln!(stdout)?;
        let decode_steps = generated.len().saturating_sub(1).max(1) as f64;
        let first = t_first.map(|d| d.as_secs_f64()).unwrap_or(0.0);
        eprintln!(
            "exit {}: {} prompt + {} new tokens, stop: {stop}; load {:.1} ms, prefill {:.1} ms, \
             decode {:.0} tokens/s; last-position confidence max_prob {:.3}, margin {:.3}, \
             entropy {:.3}",
            exit,
            prompt.len(),
            generated.len(),
            load_s * 1e3,
            first * 1e3,
            decode_steps / (gen_s - first).max(1e-9),
            conf.max_prob,
            conf.margin,
            conf.entropy
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// formatting

/// `1234567` → `1,234,567`.
pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes in B / KiB / MiB / GiB.
pub fn human_bytes(b: u64) -> String {
    const K: f64 = 1024.0;
    let f = b as f64;
    if f < K {
        format!("{b} B")
    } else if f < K * K {
        format!("{:.1} KiB", f / K)
    } else if f < K * K * K {
        format!("{:.2} MiB", f / (K * K))
    } else {
        format!("{:.2} GiB", f / (K * K * K))
    }
}
