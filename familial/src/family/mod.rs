//! Families built on a pretrained trunk: Ruyi-style exits attached to a plain checkpoint
//! (e.g. SmolLM2 from GGUF), stored as a small **overlay** beside a reference to the base.
//!
//! An overlay directory holds
//! - `family.json` ([`FamilyManifest`]): the base by name, file sha256 and size, the exit
//!   points (the last is the base's last layer), provenance of the training run;
//! - `model.safetensors`: for every exit but the last, its own decoder block
//!   `model.eelayers.{i}.*` and norm `model.norms.{i}.weight` (the head is the base's tied
//!   embedding), in f16/f32.
//!
//! [`Family::open`] finds and verifies the base (a mismatched base is refused, naming both
//! hashes) and serves the union as one [`crate::weights::TensorSource`]; through
//! [`crate::ModelSource::Family`] every loader, the agent and the CLI use it like any model.
//! [`distill`] trains the exits against the frozen trunk (KL to the deepest exit);
//! [`data`] answers them with the full model (self-distillation data); [`prompts`] generates the offline chat prompts that training, calibration and evaluation
//! draw from, in disjoint splits.

pub mod data;
pub mod distill;
mod manifest;
mod overlay;
pub mod prompts;

pub use manifest::{BaseRef, FamilyManifest, MANIFEST_FILE, OVERLAY_FORMAT};
pub use overlay::{
    base_digest, default_model_cache, exit_tensor_names, is_family_dir, select_exits, Family,
};
