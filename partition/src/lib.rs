//! flow_partition (docs written at the end)
pub mod calibrate;
pub mod degrade;
pub mod error;
pub mod link;
pub mod planner;
pub mod profile;
pub mod replan;
pub use error::{Error, Result};
