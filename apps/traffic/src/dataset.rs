//! Labelled datasets of rendered frames: random scenes under random conditions, with the
//! ground truth the renderer knows exactly (vehicle count and occupancy per lane,
//! emergency vehicle present and in which lane).

use std::io::Write;
use std::path::Path;

use crate::noise::Rng;
use crate::render::{render, Frame};
use crate::scene::{Camera, Condition, Scene, Vehicle, VehicleKind};
use crate::{Error, Result};

/// Minimum visible length (metres) for a vehicle to count as "in the frame".
pub const MIN_VISIBLE_M: f32 = 1.0;

/// Ground truth of one frame.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Labels {
    /// Vehicles in each lane (at least [`MIN_VISIBLE_M`] of them visible).
    pub count: Vec<u32>,
    /// Per lane: visible vehicle area / (lane width × visible length), dimensionless.
    pub occupancy: Vec<f32>,
    /// Occupied area / (road width × visible length) over all lanes: the congestion
    /// index the estimator should recover.
    pub congestion: f32,
    pub emergency: bool,
    /// Lane of the (first) emergency vehicle, if one is in view.
    pub emergency_lane: Option<u32>,
    /// Condition preset the frame was drawn under.
    pub condition: String,
}

/// Visible length of a vehicle in the camera's view, metres.
pub fn visible_length(cam: &Camera, v: &Vehicle) -> f32 {
    let l = cam.visible_length_m;
    (v.along_m + v.length_m).clamp(0.0, l) - v.along_m.clamp(0.0, l)
}

fn in_view(cam: &Camera, v: &Vehicle) -> Option<usize> {
    let lane = v.lane_index();
    let vis = visible_length(cam, v);
    (lane >= 0 && (lane as usize) < cam.lanes && vis >= MIN_VISIBLE_M.min(v.length_m / 2.0))
        .then_some(lane as usize)
}

/// Exact labels of a scene.
pub fn labels(scene: &Scene, condition: &str) -> Labels {
    let cam = &scene.camera;
    let mut count = vec![0u32; cam.lanes];
    let mut area = vec![0f32; cam.lanes];
    let mut emergency_lane = None;
    for v in &scene.vehicles {
        let lane = v.lane_index();
        if lane >= 0 && (lane as usize) < cam.lanes {
            area[lane as usize] += visible_length(cam, v) * v.width_m.min(cam.lane_width_m);
        }
        if let Some(lane) = in_view(cam, v) {
            count[lane] += 1;
            if v.kind == VehicleKind::Emergency && emergency_lane.is_none() {
                emergency_lane = Some(lane as u32);
            }
        }
    }
    let lane_area = cam.lane_width_m * cam.visible_length_m;
    let total: f32 = area.iter().sum();
    Labels {
        count,
        occupancy: area.iter().map(|a| a / lane_area).collect(),
        congestion: crate::congestion::congestion_index(
            total,
            cam.road_width_m(),
            cam.visible_length_m,
        ),
        emergency: emergency_lane.is_some(),
        emergency_lane,
        condition: condition.to_string(),
    }
}

/// One labelled example.
#[derive(Debug, Clone)]
pub struct Sample {
    pub scene: Scene,
    pub frame: Frame,
    pub labels: Labels,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct DatasetSpec {
    pub camera: Camera,
    pub samples: usize,
    pub seed: u64,
    /// Condition presets to draw from uniformly (intensities jittered ±30%).
    pub conditions: Vec<String>,
    /// Probability that a frame holds an emergency vehicle.
    pub emergency_rate: f32,
}

impl Default for DatasetSpec {
    fn default() -> Self {
        DatasetSpec {
            camera: Camera::default(),
            samples: 1000,
            seed: 1,
            conditions: Condition::PRESETS.iter().map(|s| s.to_string()).collect(),
            emergency_rate: 0.4,
        }
    }
}

/// Random traffic on one approach: per lane a queue from the stop line with gaps that
/// shrink as the scene's density grows.
pub fn random_vehicles(cam: &Camera, rng: &mut Rng, emergency: bool) -> Vec<Vehicle> {
    let density = rng.f32();
    let mut out = Vec::new();
    for lane in 0..cam.lanes {
        let lane_density = (density + rng.range(-0.25, 0.25)).clamp(0.0, 1.0);
        let mut along = rng.range(0.0, 2.0 + 25.0 * (1.0 - lane_density));
        while along < cam.visible_length_m + 5.0 {
            let r = rng.f32();
            let kind = if r < 0.08 {
                VehicleKind::Bus
            } else if r < 0.17 {
                VehicleKind::Truck
            } else {
                VehicleKind::Car
            };
            let v = Vehicle::new(kind, lane as f32, along, rng.below(8) as u8);
            along += v.length_m + 1.5 + (1.0 - lane_density) * rng.range(0.0, 30.0);
            out.push(v);
        }
    }
    if emergency {
        // Put it in view, replacing whatever overlaps its place.
        let lane = rng.below(cam.lanes);
        let ev = Vehicle::new(
            VehicleKind::Emergency,
            lane as f32,
            rng.range(0.0, cam.visible_length_m - 6.0),
            0,
        );
        out.retain(|v| {
            v.lane_index() != lane as isize
                || v.along_m > ev.along_m + ev.length_m + 1.0
                || v.along_m + v.length_m + 1.0 < ev.along_m
        });
        out.push(ev);
    }
    out
}

fn jitter(c: Condition, rng: &mut Rng) -> Condition {
    let j = |rng: &mut Rng| rng.range(0.7, 1.3);
    Condition {
        light: if c.light < 1.0 {
            (c.light * j(rng)).min(1.0)
        } else {
            1.0
        },
        fog: c.fog * j(rng),
        rain: (c.rain * j(rng)).min(1.0),
        glare: (c.glare * j(rng)).min(1.0),
    }
}

/// Generate a labelled dataset in memory; the same spec always gives the same samples.
pub fn generate(spec: &DatasetSpec) -> Result<Vec<Sample>> {
    spec.camera.validate()?;
    if spec.conditions.is_empty() {
        return Err(Error::Config("dataset: no conditions given".into()));
    }
    let presets = spec
        .conditions
        .iter()
        .map(|n| Condition::preset(n).map(|c| (n.clone(), c)))
        .collect::<Result<Vec<_>>>()?;
    let mut rng = Rng::new(spec.seed);
    let mut out = Vec::with_capacity(spec.samples);
    for i in 0..spec.samples {
        let (name, base) = &presets[rng.below(presets.len())];
        let condition = jitter(*base, &mut rng);
        let ev = rng.chance(spec.emergency_rate);
        let scene = Scene {
            camera: spec.camera,
            vehicles: random_vehicles(&spec.camera, &mut rng, ev),
            condition,
            seed: spec.seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
            frame: rng.next_u64() % 1024,
        };
        out.push(labelled(scene, name));
    }
    Ok(out)
}

/// `samples` labelled frames drawn (without replacement, as far as there are scenes) from
/// scenes captured in SUMO runs ([`crate::sumo::RunOptions::capture_scenes_every`]), each
/// re-rendered under a condition preset drawn uniformly from `conditions` (intensities
/// jittered ±30%, sensor noise reseeded): the deployment's own traffic (queues, platoons,
/// empty cross streets) under every condition. The same inputs always give the same samples.
pub fn from_scenes(
    scenes: &[Scene],
    samples: usize,
    seed: u64,
    conditions: &[String],
) -> Result<Vec<Sample>> {
    if conditions.is_empty() {
        return Err(Error::Config("dataset: no conditions given".into()));
    }
    if scenes.is_empty() {
        return Err(Error::Config(
            "dataset: no captured scenes to draw from".into(),
        ));
    }
    let presets = conditions
        .iter()
        .map(|n| Condition::preset(n).map(|c| (n.clone(), c)))
        .collect::<Result<Vec<_>>>()?;
    let mut rng = Rng::new(seed);
    let mut order: Vec<usize> = (0..scenes.len()).collect();
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples {
        // Partial Fisher-Yates: a fresh permutation each time the scenes run out.
        let k = i % scenes.len();
        let j = k + rng.below(scenes.len() - k);
        order.swap(k, j);
        let base_scene = &scenes[order[k]];
        base_scene.camera.validate()?;
        let (name, base) = &presets[rng.below(presets.len())];
        let scene = Scene {
            condition: jitter(*base, &mut rng),
            seed: seed.wrapping_mul(2_000_003).wrapping_add(i as u64),
            ..base_scene.clone()
        };
        out.push(labelled(scene, name));
    }
    Ok(out)
}

/// `scene` rendered and labelled under the condition preset `name`.
fn labelled(scene: Scene, name: &str) -> Sample {
    let frame = render(&scene);
    let labels = labels(&scene, name);
    Sample {
        scene,
        frame,
        labels,
    }
}

/// Write samples as `NNNNNN.ppm` frames plus `labels.jsonl` (one JSON object per frame,
/// with its file name) into `dir`.
pub fn write(dir: &Path, samples: &[Sample]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let labels_path = dir.join("labels.jsonl");
    let mut labels = std::io::BufWriter::new(
        std::fs::File::create(&labels_path).map_err(|e| Error::io(&labels_path, e))?,
    );
    for (i, s) in samples.iter().enumerate() {
        let name = format!("{i:06}.ppm");
        let p = dir.join(&name);
        std::fs::write(&p, s.frame.to_ppm()).map_err(|e| Error::io(&p, e))?;
        let mut v = serde_json::to_value(&s.labels).map_err(|e| Error::Config(e.to_string()))?;
        v["file"] = serde_json::Value::String(name);
        writeln!(labels, "{v}").map_err(|e| Error::io(&labels_path, e))?;
    }
    labels.flush().map_err(|e| Error::io(&labels_path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_spec_same_dataset() {
        let spec = DatasetSpec {
            samples: 12,
            ..DatasetSpec::default()
        };
        let a = generate(&spec).unwrap();
        let b = generate(&spec).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.frame, y.frame);
            assert_eq!(x.labels, y.labels);
        }
        let c = generate(&DatasetSpec { seed: 2, ..spec }).unwrap();
        assert_ne!(a[0].frame, c[0].frame);
    }

    #[test]
    fn labels_are_consistent() {
        let spec = DatasetSpec {
            samples: 200,
            ..DatasetSpec::default()
        };
        let cam = spec.camera;
        let mut with_ev = 0;
        for s in generate(&spec).unwrap() {
            let l = &s.labels;
            assert_eq!(l.count.len(), cam.lanes);
            assert_eq!(l.emergency, l.emergency_lane.is_some());
            let evs: Vec<_> = s
                .scene
                .vehicles
                .iter()
                .filter(|v| v.kind == VehicleKind::Emergency)
                .collect();
            assert_eq!(l.emergency, !evs.is_empty());
            if let Some(lane) = l.emergency_lane {
                with_ev += 1;
                assert_eq!(evs[0].lane_index(), lane as isize);
            }
            for lane in 0..cam.lanes {
                let occ = l.occupancy[lane];
                assert!((0.0..=1.0).contains(&occ), "occupancy {occ}");
                if l.count[lane] > 0 {
                    assert!(
                        occ > 0.0,
                        "lane {lane} counts vehicles but has no occupancy"
                    );
                }
            }
            // Congestion index = mean of lane occupancies for equal-width lanes.
            let mean = l.occupancy.iter().sum::<f32>() / cam.lanes as f32;
            assert!((l.congestion - mean).abs() < 1e-5);
            // No two vehicles overlap in one lane.
            for a in &s.scene.vehicles {
                for b in &s.scene.vehicles {
                    if std::ptr::eq(a, b) || a.lane_index() != b.lane_index() {
                        continue;
                    }
                    let overlap =
                        a.along_m < b.along_m + b.length_m && b.along_m < a.along_m + a.length_m;
                    assert!(!overlap, "{a:?} overlaps {b:?}");
                }
            }
        }
        assert!((50..=120).contains(&with_ev), "emergency frames {with_ev}");
    }

    #[test]
    fn from_scenes_keeps_traffic_and_draws_conditions() {
        let base = generate(&DatasetSpec {
            samples: 10,
            conditions: vec!["clear".into()],
            ..DatasetSpec::default()
        })
        .unwrap();
        let scenes: Vec<Scene> = base.iter().map(|s| s.scene.clone()).collect();
        let conds = vec!["fog".to_string(), "night".to_string()];
        let a = from_scenes(&scenes, 25, 3, &conds).unwrap();
        assert_eq!(a.len(), 25);
        // The first 10 draw every scene once; labels other than the condition are the
        // scene's own.
        let mut used = vec![0; scenes.len()];
        for s in &a[..10] {
            let i = scenes
                .iter()
                .position(|x| x.vehicles == s.scene.vehicles)
                .unwrap();
            used[i] += 1;
            let l = labels(&scenes[i], &s.labels.condition);
            assert_eq!(l, s.labels);
        }
        assert!(used.iter().all(|&u| u == 1), "{used:?}");
        assert!(a.iter().all(|s| conds.contains(&s.labels.condition)));
        assert!(a.iter().any(|s| s.labels.condition == "fog"));
        assert!(a.iter().any(|s| s.labels.condition == "night"));
        let b = from_scenes(&scenes, 25, 3, &conds).unwrap();
        assert!(a.iter().zip(&b).all(|(x, y)| x.frame == y.frame));
        assert!(from_scenes(&[], 5, 3, &conds).is_err());
    }

    #[test]
    fn writes_frames_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let samples = generate(&DatasetSpec {
            samples: 3,
            ..DatasetSpec::default()
        })
        .unwrap();
        write(dir.path(), &samples).unwrap();
        let text = std::fs::read_to_string(dir.path().join("labels.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 3);
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["file"], "000000.ppm");
        let ppm = std::fs::read(dir.path().join("000000.ppm")).unwrap();
        assert!(ppm.starts_with(b"P6\n32 128\n255\n"));
    }
}
