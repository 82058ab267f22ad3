//! flow-traffic: the edge traffic-management app of aiflow.
//!
//! Cameras at a junction watch each approach; the edge estimates each road's congestion
//! and spots emergency vehicles, then sets the signal phases, clearing the way for an
//! emergency vehicle. This crate holds everything but the learned model:
//!
//! - [`scene`] + [`render`]: a deterministic renderer of top-down camera frames from lane
//!   geometry and vehicle positions, under haze, fog, rain, night and glare
//!   ([`render::render`]);
//! - [`dataset`]: labelled datasets of rendered frames ([`dataset::generate`]);
//! - [`congestion`]: the congestion index formula ([`congestion::congestion_index`]) and a
//!   classical frame analyser ([`congestion::analyse`]);
//! - [`controller`]: the pure signal controller (fixed-time, adaptive, emergency
//!   preemption with yellow and all-red clearance always kept) ([`controller::Controller`]);
//! - [`traci`], [`net`], [`sumo`]: a minimal TraCI client, the junction read from a SUMO
//!   network, and the closed loop that runs `sumo` headless on a scenario with cameras,
//!   detection and the controller ([`sumo::run`]);
//! - [`vision`]: the familial ViT (device exit on the camera, deeper exit on the edge),
//!   its training and the escalating [`vision::ModelDetector`];
//! - [`edge`]: the same split over the real protocol: cameras ship low-confidence frames'
//!   hidden states over QUIC to an [`edge::EdgeService`] ([`edge::RemoteDetector`]).
//!
//! Everything here is deterministic: the same inputs give the same bytes.

pub mod calibration;
pub mod congestion;
pub mod controller;
pub mod dataset;
pub mod edge;
pub mod net;
pub mod noise;
pub mod render;
pub mod scene;
pub mod sumo;
pub mod traci;
pub mod vision;

use std::path::{Path, PathBuf};

/// Errors of flow-traffic.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range or unknown.
    #[error("bad configuration: {0}")]
    Config(String),
    /// Talking to SUMO over TraCI failed, or SUMO refused a command.
    #[error("TraCI: {0}")]
    Traci(String),
    /// Starting or running SUMO failed.
    #[error("SUMO: {0}")]
    Sumo(String),
    /// The vision model failed (shapes, weights, candle).
    #[error("vision model: {0}")]
    Model(String),
    /// The camera ↔ edge link failed or the edge refused a frame (protocol, QUIC, TLS).
    #[error("camera-edge link: {0}")]
    Link(String),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
