//! The deterministic scene renderer: a top-down camera frame of one approach, from lane
//! geometry and vehicle positions, under weather and light ([`render`]).
//!
//! Pipeline (all per pixel, all deterministic in `Scene::seed` and `Scene::frame`):
//! 1. reflectance: grass verges, asphalt, lane and stop lines, vehicles (cars in a
//!    palette, buses, trucks, emergency vehicles with a red/blue light bar);
//! 2. light: everything × ambient light, plus emitted light (headlight pools at night,
//!    the light bar's glow, flashing with the frame counter);
//! 3. atmosphere: `I = J·t + A·(1−t)` with transmission `t = exp(−fog·d)` and `d` the
//!    distance from the camera (mounted over the stop line, looking up the road);
//! 4. rain streaks, glare (a bright bloom and a veil), sensor noise (stronger at night);
//! 5. quantise to 8-bit RGB.

use crate::noise::unit;
use crate::scene::{Camera, Scene, Vehicle, VehicleKind};

/// Asphalt reflectance (RGB, 0..1).
pub const ROAD: [f32; 3] = [0.33, 0.33, 0.35];
/// Grass verge reflectance.
pub const GRASS: [f32; 3] = [0.22, 0.42, 0.16];
/// Lane and stop line paint.
pub const PAINT: [f32; 3] = [0.85, 0.85, 0.82];
/// Light bar colours.
pub const BAR_RED: [f32; 3] = [1.0, 0.05, 0.05];
pub const BAR_BLUE: [f32; 3] = [0.05, 0.25, 1.0];
/// Car body palette (no colour close to asphalt).
pub const PALETTE: [[f32; 3]; 8] = [
    [0.70, 0.08, 0.08],
    [0.10, 0.18, 0.55],
    [0.92, 0.92, 0.92],
    [0.05, 0.05, 0.06],
    [0.72, 0.74, 0.78],
    [0.85, 0.72, 0.10],
    [0.10, 0.40, 0.22],
    [0.55, 0.25, 0.10],
];
/// Airlight of haze/fog at full daylight.
pub const AIRLIGHT: [f32; 3] = [0.80, 0.82, 0.84];
/// Distance from the camera to the stop line along the road, metres.
pub const CAMERA_OFFSET_M: f32 = 10.0;

/// An 8-bit RGB frame, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Frame {
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }

    /// Pixel as floats in 0..1.
    pub fn pixel_f32(&self, x: usize, y: usize) -> [f32; 3] {
        let p = self.pixel(x, y);
        [
            p[0] as f32 / 255.0,
            p[1] as f32 / 255.0,
            p[2] as f32 / 255.0,
        ]
    }

    /// Binary PPM (P6), viewable everywhere.
    pub fn to_ppm(&self) -> Vec<u8> {
        let mut out = format!("P6\n{} {}\n255\n", self.width, self.height).into_bytes();
        out.extend_from_slice(&self.rgb);
        out
    }
}

/// Float image used while rendering.
struct Canvas {
    w: usize,
    h: usize,
    px: Vec<[f32; 3]>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Canvas {
            w,
            h,
            px: vec![[0.0; 3]; w * h],
        }
    }

    /// Blend `colour` into the axis-aligned rectangle `[x0,x1) × [y0,y1)` (fractional
    /// pixel coverage, so sub-pixel positions render exactly and deterministically).
    fn fill(&mut self, x0: f32, y0: f32, x1: f32, y1: f32, colour: [f32; 3]) {
        let (x0, x1) = (x0.max(0.0), x1.min(self.w as f32));
        let (y0, y1) = (y0.max(0.0), y1.min(self.h as f32));
        if x1 <= x0 || y1 <= y0 {
            return;
        }
        for y in y0.floor() as usize..(y1.ceil() as usize).min(self.h) {
            let cy = (y1.min(y as f32 + 1.0) - y0.max(y as f32)).max(0.0);
            for x in x0.floor() as usize..(x1.ceil() as usize).min(self.w) {
                let cx = (x1.min(x as f32 + 1.0) - x0.max(x as f32)).max(0.0);
                let a = cx * cy;
                let p = &mut self.px[y * self.w + x];
                for c in 0..3 {
                    p[c] = p[c] * (1.0 - a) + colour[c] * a;
                }
            }
        }
    }
}

/// Render one camera frame.
pub fn render(scene: &Scene) -> Frame {
    let cam = &scene.camera;
    let (w, h) = (cam.width(), cam.height());
    let mut cv = Canvas::new(w, h);
    let seed = scene.seed;

    // 1. reflectance: verges and asphalt with a little texture.
    let road_x0 = cam.margin_px;
    let road_x1 = cam.margin_px + cam.road_px();
    for y in 0..h {
        for x in 0..w {
            let base = if (road_x0..road_x1).contains(&x) {
                ROAD
            } else {
                GRASS
            };
            // Texture is fixed per camera (seed 0): it is the place, not the moment.
            let t = 0.94 + 0.12 * unit(0x7e47, x as u64, y as u64, 0);
            cv.px[y * w + x] = [base[0] * t, base[1] * t, base[2] * t];
        }
    }
    draw_markings(&mut cv, cam);
    for v in &scene.vehicles {
        draw_vehicle(&mut cv, cam, v, scene.frame);
    }

    // 2. light.
    let light = scene.condition.light.clamp(0.02, 1.5);
    for p in cv.px.iter_mut() {
        for c in p.iter_mut() {
            *c *= light;
        }
    }
    let dark = (1.0 - light).clamp(0.0, 1.0);
    for v in &scene.vehicles {
        emit_lights(&mut cv, cam, v, scene.frame, dark);
    }

    // 3. atmosphere.
    let fog = scene.condition.fog.max(0.0);
    if fog > 0.0 {
        let air_level = 0.3 + 0.7 * light.min(1.0);
        for y in 0..h {
            let d = CAMERA_OFFSET_M + (h - y) as f32 / cam.px_per_m;
            let t = (-fog * d).exp();
            for x in 0..w {
                let p = &mut cv.px[y * w + x];
                for c in 0..3 {
                    p[c] = p[c] * t + AIRLIGHT[c] * air_level * (1.0 - t);
                }
            }
        }
    }

    // 4. rain, glare, noise.
    let rain = scene.condition.rain.clamp(0.0, 1.0);
    if rain > 0.0 {
        let streaks = (rain * (w * h) as f32 / 40.0) as u64;
        for s in 0..streaks {
            let sx = unit(seed, scene.frame, s, 1) * w as f32;
            let sy = unit(seed, scene.frame, s, 2) * h as f32;
            let len = 4.0 + 5.0 * unit(seed, scene.frame, s, 3);
            for k in 0..len as usize {
                let x = (sx + 0.35 * k as f32) as usize;
                let y = (sy + k as f32) as usize;
                if x < w && y < h {
                    let p = &mut cv.px[y * w + x];
                    for c in p.iter_mut() {
                        *c = *c * 0.6 + 0.75 * light.clamp(0.3, 1.0) * 0.4;
                    }
                }
            }
        }
    }
    let glare = scene.condition.glare.clamp(0.0, 1.0);
    if glare > 0.0 {
        let gx = unit(seed, scene.frame / 64, 0, 4) * w as f32;
        let gy = unit(seed, scene.frame / 64, 0, 5) * h as f32 * 0.5;
        let sigma = 0.25 * h as f32;
        for y in 0..h {
            for x in 0..w {
                let r2 = (x as f32 - gx).powi(2) + (y as f32 - gy).powi(2);
                let g = glare * (1.3 * (-r2 / (2.0 * sigma * sigma)).exp() + 0.12);
                let p = &mut cv.px[y * w + x];
                p[0] += g;
                p[1] += g * 0.97;
                p[2] += g * 0.9;
            }
        }
    }
    let sigma = 0.008 + 0.02 * dark + 0.01 * rain;
    let mut rgb = Vec::with_capacity(w * h * 3);
    for (i, p) in cv.px.iter().enumerate() {
        for (c, v) in p.iter().enumerate() {
            let n = unit(seed, scene.frame, i as u64, c as u64)
                + unit(seed ^ 0x55, scene.frame, i as u64, c as u64)
                - 1.0;
            let v = v + n * sigma * 2.45; // sum of two uniforms: sd 0.408
            rgb.push((v.clamp(0.0, 1.0) * 255.0).round() as u8);
        }
    }
    Frame {
        width: w,
        height: h,
        rgb,
    }
}

fn draw_markings(cv: &mut Canvas, cam: &Camera) {
    let ppm = cam.px_per_m;
    let h = cv.h as f32;
    let line = (0.2 * ppm).max(0.6);
    let x0 = cam.margin_px as f32;
    let x1 = x0 + cam.road_px() as f32;
    // Solid edge lines.
    cv.fill(x0, 0.0, x0 + line, h, PAINT);
    cv.fill(x1 - line, 0.0, x1, h, PAINT);
    // Dashed lane lines: 3 m paint, 6 m gap, phased from the stop line.
    for lane in 1..cam.lanes {
        let x = x0 + lane as f32 * cam.lane_px() - line / 2.0;
        let mut d = 2.0;
        while d < cam.visible_length_m {
            let (ya, yb) = (cam.row_of(d + 3.0), cam.row_of(d));
            cv.fill(x, ya, x + line, yb, PAINT);
            d += 9.0;
        }
    }
    // Stop line.
    cv.fill(x0, h - 0.5 * ppm, x1, h, PAINT);
}

/// Pixel rectangle of a vehicle: (x0, y_rear, x1, y_front).
pub fn vehicle_rect(cam: &Camera, v: &Vehicle) -> (f32, f32, f32, f32) {
    let cx = cam.margin_px as f32 + (v.lane + 0.5) * cam.lane_px();
    let hw = v.width_m * cam.px_per_m / 2.0;
    (
        cx - hw,
        cam.row_of(v.along_m + v.length_m),
        cx + hw,
        cam.row_of(v.along_m),
    )
}

fn draw_vehicle(cv: &mut Canvas, cam: &Camera, v: &Vehicle, frame: u64) {
    let (x0, yr, x1, yf) = vehicle_rect(cam, v);
    let ppm = cam.px_per_m;
    // `at(m)`: row `m` metres behind the front.
    let at = |m: f32| yf - m * ppm;
    match v.kind {
        VehicleKind::Car => {
            let body = PALETTE[v.colour as usize % PALETTE.len()];
            cv.fill(x0, yr, x1, yf, body);
            cv.fill(
                x0 + 0.2 * ppm,
                at(1.8),
                x1 - 0.2 * ppm,
                at(1.1),
                [0.08, 0.1, 0.13],
            );
            cv.fill(
                x0 + 0.25 * ppm,
                at(4.1),
                x1 - 0.25 * ppm,
                at(3.6),
                [0.08, 0.1, 0.13],
            );
        }
        VehicleKind::Bus => {
            cv.fill(x0, yr, x1, yf, [0.88, 0.55, 0.08]);
            cv.fill(
                x0 + 0.3 * ppm,
                at(v.length_m - 0.5),
                x1 - 0.3 * ppm,
                at(0.5),
                [0.8, 0.8, 0.78],
            );
            cv.fill(
                x0 + 0.6 * ppm,
                at(6.5),
                x1 - 0.6 * ppm,
                at(4.5),
                [0.35, 0.35, 0.38],
            );
        }
        VehicleKind::Truck => {
            cv.fill(x0, at(2.2), x1, yf, [0.15, 0.25, 0.55]);
            cv.fill(
                x0 + 0.2 * ppm,
                at(1.2),
                x1 - 0.2 * ppm,
                at(0.6),
                [0.08, 0.1, 0.13],
            );
            cv.fill(x0, yr, x1, at(2.5), [0.62, 0.5, 0.36]);
        }
        VehicleKind::Emergency => {
            cv.fill(x0, yr, x1, yf, [0.95, 0.95, 0.93]);
            cv.fill(x0, at(4.5), x1, at(4.0), [0.9, 0.1, 0.1]);
            cv.fill(
                x0 + 0.2 * ppm,
                at(1.6),
                x1 - 0.2 * ppm,
                at(1.0),
                [0.08, 0.1, 0.13],
            );
            draw_light_bar(cv, cam, v, frame);
        }
    }
}

/// The light bar across the roof, 1.8–2.6 m behind the front: red half on the left
/// (kerb side), blue half on the right.
fn draw_light_bar(cv: &mut Canvas, cam: &Camera, v: &Vehicle, frame: u64) {
    let (x0, _, x1, yf) = vehicle_rect(cam, v);
    let ppm = cam.px_per_m;
    let at = |m: f32| yf - m * ppm;
    let (red, blue) = bar_levels(frame);
    let xm = (x0 + x1) / 2.0;
    let scale = |c: [f32; 3], k: f32| [c[0] * k, c[1] * k, c[2] * k];
    cv.fill(x0 + 0.15 * ppm, at(2.6), xm, at(1.8), scale(BAR_RED, red));
    cv.fill(xm, at(2.6), x1 - 0.15 * ppm, at(1.8), scale(BAR_BLUE, blue));
}

/// Light bar intensities (red, blue): they alternate every frame.
fn bar_levels(frame: u64) -> (f32, f32) {
    if frame % 2 == 0 {
        (1.0, 0.6)
    } else {
        (0.6, 1.0)
    }
}

/// Emitted light, added after ambient light scaling: headlight pools ahead of each
/// vehicle and the light bar's glow, both stronger the darker it is.
fn emit_lights(cv: &mut Canvas, cam: &Camera, v: &Vehicle, frame: u64, dark: f32) {
    let (x0, _, x1, yf) = vehicle_rect(cam, v);
    let ppm = cam.px_per_m;
    if dark > 0.3 {
        // Headlight pool: 8 m ahead, fading.
        let len = 8.0 * ppm;
        let ystart = yf.max(0.0) as usize;
        let yend = ((yf + len).min(cv.h as f32)).max(0.0) as usize;
        for y in ystart..yend {
            let k = 1.0 - (y as f32 - yf) / len;
            let a = 0.35 * dark * k * k;
            let xa = x0.max(0.0) as usize;
            let xb = (x1.ceil() as usize).min(cv.w);
            for x in xa..xb {
                let p = &mut cv.px[y * cv.w + x];
                p[0] += a;
                p[1] += a * 0.95;
                p[2] += a * 0.8;
            }
        }
    }
    if v.kind == VehicleKind::Emergency {
        let (red, blue) = bar_levels(frame);
        // The bar is a light source: its own pixels do not dim with the ambient light.
        draw_light_bar(cv, cam, v, frame);
        let cy = yf - 2.2 * ppm;
        let cxr = x0 + (x1 - x0) * 0.3;
        let cxb = x0 + (x1 - x0) * 0.7;
        let r = 1.2 * ppm;
        let y_lo = (cy - r).max(0.0) as usize;
        let y_hi = ((cy + r).max(0.0) as usize).min(cv.h);
        let x_lo = (x0 - r).max(0.0) as usize;
        let x_hi = ((x1 + r).max(0.0) as usize).min(cv.w);
        for y in y_lo..y_hi {
            for x in x_lo..x_hi {
                let fy = y as f32 + 0.5 - cy;
                let dr = ((x as f32 + 0.5 - cxr).powi(2) + fy * fy).sqrt() / r;
                let db = ((x as f32 + 0.5 - cxb).powi(2) + fy * fy).sqrt() / r;
                let gr = 0.35 * dark * red * (1.0 - dr).max(0.0);
                let gb = 0.35 * dark * blue * (1.0 - db).max(0.0);
                let p = &mut cv.px[y * cv.w + x];
                for c in 0..3 {
                    p[c] += gr * BAR_RED[c] + gb * BAR_BLUE[c];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scene::Condition;

    fn scene(condition: Condition, seed: u64) -> Scene {
        Scene {
            camera: Camera::default(),
            vehicles: vec![
                Vehicle::new(VehicleKind::Car, 0.0, 3.0, 1),
                Vehicle::new(VehicleKind::Bus, 1.0, 10.0, 0),
                Vehicle::new(VehicleKind::Emergency, 0.0, 20.0, 0),
                Vehicle::new(VehicleKind::Truck, 1.0, 40.0, 0),
            ],
            condition,
            seed,
            frame: 3,
        }
    }

    #[test]
    fn rendering_is_deterministic() {
        for name in Condition::PRESETS {
            let c = Condition::preset(name).unwrap();
            let a = render(&scene(c, 11));
            let b = render(&scene(c, 11));
            assert_eq!(a, b, "{name}");
            assert_eq!(a.rgb.len(), 32 * 128 * 3);
        }
        // Another seed changes the noise but not the picture much.
        let a = render(&scene(Condition::CLEAR, 1));
        let b = render(&scene(Condition::CLEAR, 2));
        assert_ne!(a, b);
        let diff: f32 = a
            .rgb
            .iter()
            .zip(&b.rgb)
            .map(|(x, y)| (*x as f32 - *y as f32).abs())
            .sum::<f32>()
            / a.rgb.len() as f32;
        assert!(diff < 6.0, "mean abs diff {diff}");
    }

    #[test]
    fn vehicles_appear_where_placed() {
        let cam = Camera::default();
        let empty = render(&Scene {
            vehicles: vec![],
            ..scene(Condition::CLEAR, 5)
        });
        let full = render(&scene(Condition::CLEAR, 5));
        // Centre of the car in lane 0, 3 m from the stop line, 2 m behind its front.
        let x = (cam.margin_px as f32 + 0.5 * cam.lane_px()) as usize;
        let y = cam.row_of(3.0 + 3.0) as usize;
        let (e, f) = (empty.pixel_f32(x, y), full.pixel_f32(x, y));
        let car = PALETTE[1];
        assert!((f[2] - car[2]).abs() < 0.06, "car blue {f:?}");
        assert!((e[2] - ROAD[2]).abs() < 0.08, "road {e:?}");
    }

    #[test]
    fn fog_and_night_reduce_contrast() {
        let contrast = |f: &Frame| {
            let v: Vec<f32> = f.rgb.iter().map(|&b| b as f32).collect();
            let m = v.iter().sum::<f32>() / v.len() as f32;
            (v.iter().map(|x| (x - m).powi(2)).sum::<f32>() / v.len() as f32).sqrt()
        };
        let clear = contrast(&render(&scene(Condition::CLEAR, 3)));
        let fog = contrast(&render(&scene(Condition::preset("fog").unwrap(), 3)));
        let night = contrast(&render(&scene(Condition::preset("night").unwrap(), 3)));
        assert!(fog < clear * 0.8, "fog {fog} clear {clear}");
        assert!(night < clear * 0.5, "night {night} clear {clear}");
    }
}
