//! # aiflow
//!
//! Device-edge-cloud collaborative inference with familial (early-exit) models.
//! This facade re-exports the workspace crates.

pub use flow_familial as familial;
pub use flow_node as node;
pub use flow_partition as partition;
pub use flow_protocol as protocol;
