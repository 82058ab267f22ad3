//! What a camera sees: the road it was set up on ([`Camera`]), the vehicles on it
//! ([`Vehicle`]) and the weather and light ([`Condition`]).
//!
//! Coordinates: one camera watches one approach of a junction from above. `along_m` is a
//! vehicle front's distance to the stop line (metres, ≥ 0 while approaching); lanes are
//! numbered from the kerb (lane 0) outwards, as in SUMO.

use crate::{Error, Result};

/// Per-camera set-up, entered once when the camera is installed (as in the seed paper):
/// how many lanes it watches, their width, and how much road it sees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Camera {
    pub lanes: usize,
    /// Width of one lane, metres.
    pub lane_width_m: f32,
    /// Visible length of road before the stop line, metres.
    pub visible_length_m: f32,
    /// Image scale, pixels per metre.
    pub px_per_m: f32,
    /// Verge (grass) on each side of the road, pixels.
    pub margin_px: usize,
}

impl Default for Camera {
    /// Two lanes of 3.2 m, 51.2 m visible, 2.5 px/m: a 32 × 128 frame.
    fn default() -> Self {
        Camera {
            lanes: 2,
            lane_width_m: 3.2,
            visible_length_m: 51.2,
            px_per_m: 2.5,
            margin_px: 8,
        }
    }
}

impl Camera {
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::Config(format!("camera: {what}")));
        if self.lanes == 0 || self.lanes > 8 {
            return bad("lanes must be 1..=8");
        }
        if !(self.lane_width_m > 1.0 && self.lane_width_m < 10.0) {
            return bad("lane_width_m must be in (1, 10)");
        }
        if !(self.visible_length_m >= 5.0 && self.visible_length_m <= 500.0) {
            return bad("visible_length_m must be in [5, 500]");
        }
        if !(self.px_per_m >= 0.5 && self.px_per_m <= 20.0) {
            return bad("px_per_m must be in [0.5, 20]");
        }
        if self.width() * self.height() > 4096 * 4096 {
            return bad("frame larger than 4096x4096");
        }
        Ok(())
    }

    /// Road width, metres (all watched lanes).
    pub fn road_width_m(&self) -> f32 {
        self.lanes as f32 * self.lane_width_m
    }

    /// Width of the road in pixels.
    pub fn road_px(&self) -> usize {
        (self.road_width_m() * self.px_per_m).round() as usize
    }

    pub fn lane_px(&self) -> f32 {
        self.lane_width_m * self.px_per_m
    }

    /// Frame width, pixels.
    pub fn width(&self) -> usize {
        self.road_px() + 2 * self.margin_px
    }

    /// Frame height, pixels.
    pub fn height(&self) -> usize {
        (self.visible_length_m * self.px_per_m).round() as usize
    }

    /// Pixel column range `[x0, x1)` of lane `lane`. Lane 0 (kerb) is on the left of the
    /// image: the camera looks down the road with traffic moving towards the bottom.
    pub fn lane_columns(&self, lane: usize) -> (usize, usize) {
        let x0 = self.margin_px as f32 + lane as f32 * self.lane_px();
        let x1 = x0 + self.lane_px();
        (
            x0.round() as usize,
            (x1.round() as usize).min(self.margin_px + self.road_px()),
        )
    }

    /// Image row of a point `along_m` metres before the stop line (bottom row = stop line).
    pub fn row_of(&self, along_m: f32) -> f32 {
        self.height() as f32 - along_m * self.px_per_m
    }
}

/// Vehicle classes the renderer draws and the detector reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VehicleKind {
    Car,
    Bus,
    Truck,
    Emergency,
}

impl VehicleKind {
    pub const ALL: [VehicleKind; 4] = [
        VehicleKind::Car,
        VehicleKind::Bus,
        VehicleKind::Truck,
        VehicleKind::Emergency,
    ];

    /// Default (length, width) in metres; the shipped SUMO vTypes use the same numbers.
    pub fn size_m(self) -> (f32, f32) {
        match self {
            VehicleKind::Car => (4.5, 1.8),
            VehicleKind::Bus => (12.0, 2.5),
            VehicleKind::Truck => (9.0, 2.4),
            VehicleKind::Emergency => (6.0, 2.1),
        }
    }

    /// Map a SUMO vClass to a kind (`passenger`, `bus`, `truck`, `emergency`, ...).
    pub fn from_vclass(vclass: &str) -> VehicleKind {
        match vclass {
            "bus" | "coach" | "tram" => VehicleKind::Bus,
            "truck" | "trailer" | "delivery" => VehicleKind::Truck,
            "emergency" | "authority" | "army" => VehicleKind::Emergency,
            _ => VehicleKind::Car,
        }
    }
}

/// One vehicle as the camera sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Vehicle {
    pub kind: VehicleKind,
    /// Lane position in lanes from the kerb lane's centre line (0.0 = centre of lane 0;
    /// fractional while changing lanes).
    pub lane: f32,
    /// Distance of the vehicle's front to the stop line, metres.
    pub along_m: f32,
    pub length_m: f32,
    pub width_m: f32,
    /// Body colour index into the renderer's palette (cars only).
    pub colour: u8,
}

impl Vehicle {
    pub fn new(kind: VehicleKind, lane: f32, along_m: f32, colour: u8) -> Self {
        let (length_m, width_m) = kind.size_m();
        Vehicle {
            kind,
            lane,
            along_m,
            length_m,
            width_m,
            colour,
        }
    }

    /// Lane index the vehicle is counted in (nearest lane centre).
    pub fn lane_index(&self) -> isize {
        self.lane.round() as isize
    }
}

/// Weather and light at capture time. All fields 0 = clear day.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Condition {
    /// Ambient light, 1.0 = day, ~0.12 = night.
    pub light: f32,
    /// Extinction coefficient of haze/fog per metre of distance from the camera
    /// (0.005 light haze, 0.03+ thick fog).
    pub fog: f32,
    /// Rain streak density, 0..1.
    pub rain: f32,
    /// Glare strength (sun or oncoming headlights), 0..1.
    pub glare: f32,
}

impl Default for Condition {
    fn default() -> Self {
        Condition::CLEAR
    }
}

impl Condition {
    pub const CLEAR: Condition = Condition {
        light: 1.0,
        fog: 0.0,
        rain: 0.0,
        glare: 0.0,
    };

    /// Named presets: `clear`, `haze`, `fog`, `rain`, `night`, `glare`, `night-fog`.
    pub fn preset(name: &str) -> Result<Condition> {
        let c = Condition::CLEAR;
        Ok(match name {
            "clear" => c,
            "haze" => Condition { fog: 0.008, ..c },
            "fog" => Condition { fog: 0.035, ..c },
            "rain" => Condition {
                rain: 0.6,
                light: 0.7,
                fog: 0.004,
                ..c
            },
            "night" => Condition { light: 0.12, ..c },
            "glare" => Condition { glare: 0.8, ..c },
            "night-fog" => Condition {
                light: 0.12,
                fog: 0.025,
                ..c
            },
            other => {
                return Err(Error::Config(format!(
                    "unknown condition {other:?}: use one of {}",
                    Condition::PRESETS.join(", ")
                )))
            }
        })
    }

    pub const PRESETS: [&'static str; 7] = [
        "clear",
        "haze",
        "fog",
        "rain",
        "night",
        "glare",
        "night-fog",
    ];
}

/// Everything needed to render one frame, deterministically.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub camera: Camera,
    pub vehicles: Vec<Vehicle>,
    pub condition: Condition,
    /// Seed for sensor noise, rain and glare placement.
    pub seed: u64,
    /// Frame counter: drives the emergency light bar's flashing.
    pub frame: u64,
}
