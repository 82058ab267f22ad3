//! A user-space link shaper for UDP (QUIC) traffic.
//!
//! `tc netem` is missing on many kernels, so the testbed carries its own shaper: a UDP relay
//! between a client and an upstream that emulates, per direction, delay, jitter, bandwidth
//! (token bucket), random loss and a bounded queue, with changes over time from a schedule.
//!
//! - [`LinkModel`]: the sans-IO core; given a packet arrival time it returns the departure
//!   time or a drop. Deterministic (seeded), tested with virtual time.
//! - [`LinkSchedule`] / [`ScheduledLink`]: parameter changes over time (TOML file).
//! - [`ShaperHandle::spawn`]: the tokio relay; works on loopback without Docker.
//! - [`bench`](mod@bench): accuracy probes of the real relay (delay, rate, loss).
//!
//! ```no_run
//! # async fn demo() -> flow_testbed::Result<()> {
//! use flow_testbed::shaper::{LinkParams, ShaperConfig, ShaperHandle};
//! use std::time::Duration;
//! let mut cfg = ShaperConfig::loopback("127.0.0.1:4433".parse().unwrap());
//! cfg.up = LinkParams { delay: Duration::from_millis(20), rate_bps: Some(10_000_000), ..Default::default() };
//! cfg.down = cfg.up.clone();
//! let shaper = ShaperHandle::spawn(cfg).await?;
//! println!("point the QUIC client at {}", shaper.local_addr());
//! # Ok(()) }
//! ```

pub mod bench;
mod model;
mod relay;
mod schedule;

pub use model::{DropReason, JitterDist, LinkModel, LinkParams, Verdict};
pub use relay::{DirectionStats, ShaperConfig, ShaperHandle, ShaperStats};
pub use schedule::{Direction, LinkChange, LinkSchedule, ScheduleStep, ScheduledLink};
