//! What the traffic loop needs from a SUMO `.net.xml`: for one traffic light, each
//! approach's camera pose (from the kerb lane's shape) and, per signal link, which
//! approach it leaves from and where it turns. A small attribute scanner, not a full XML
//! parser: `.net.xml` files are machine-written by netconvert, one element per line.

use crate::controller::{Approach, Light, Signal};
use crate::{Error, Result};

/// Start of every `<tag ...>` element in `xml`, as the text up to its closing `>`.
pub fn elements<'a>(xml: &'a str, tag: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    let open = format!("<{tag} ");
    xml.match_indices(open.clone().as_str())
        .map(|(i, _)| i)
        .collect::<Vec<_>>()
        .into_iter()
        .filter_map(move |i| {
            let rest = &xml[i..];
            rest.find('>').map(|j| &rest[..j])
        })
}

/// Value of attribute `name` in an element's text.
pub fn attr<'a>(element: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let i = element.find(&key)? + key.len();
    let j = element[i..].find('"')?;
    Some(&element[i..i + j])
}

/// Camera pose of one approach: the stop point of its kerb lane, the travel direction,
/// and the direction towards the next lane (left in right-hand traffic).
#[derive(Debug, Clone, PartialEq)]
pub struct ApproachGeom {
    pub edge: String,
    pub lanes: usize,
    pub stop: (f64, f64),
    pub dir: (f64, f64),
    pub left: (f64, f64),
    pub lane_width: f64,
}

impl ApproachGeom {
    /// (distance of a point before the stop line, lane coordinate) for a world point.
    pub fn project(&self, x: f64, y: f64) -> (f64, f64) {
        let (dx, dy) = (x - self.stop.0, y - self.stop.1);
        let along = -(dx * self.dir.0 + dy * self.dir.1);
        let lateral = dx * self.left.0 + dy * self.left.1;
        (along, lateral / self.lane_width)
    }
}

/// One signal link of the traffic light.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    pub index: usize,
    pub approach: Approach,
    /// SUMO direction: `s`, `r`, `l`, `t`, ...
    pub dir: String,
}

/// A traffic light and its four approaches.
#[derive(Debug, Clone)]
pub struct Junction {
    pub tls: String,
    /// Indexed `[N, E, S, W]` (the arm vehicles come from).
    pub approaches: [ApproachGeom; 4],
    pub links: Vec<Link>,
}

fn parse_shape(s: &str) -> Result<Vec<(f64, f64)>> {
    s.split_whitespace()
        .map(|p| {
            let mut it = p.split(',');
            let x = it.next().and_then(|v| v.parse().ok());
            let y = it.next().and_then(|v| v.parse().ok());
            match (x, y) {
                (Some(x), Some(y)) => Ok((x, y)),
                _ => Err(Error::Config(format!("bad lane shape point {p:?}"))),
            }
        })
        .collect()
}

impl Junction {
    /// Read traffic light `tls` from a `.net.xml` text.
    pub fn parse(xml: &str, tls: &str) -> Result<Junction> {
        let bad = |m: String| Error::Config(format!("network, traffic light {tls:?}: {m}"));
        // Incoming edges and link directions from the light's connections.
        let mut links = Vec::new();
        let mut edges: Vec<String> = Vec::new();
        for c in elements(xml, "connection") {
            if attr(c, "tl") != Some(tls) {
                continue;
            }
            let from = attr(c, "from").ok_or_else(|| bad("connection without from".into()))?;
            let index: usize = attr(c, "linkIndex")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(format!("connection from {from} without linkIndex")))?;
            let dir = attr(c, "dir").unwrap_or("s").to_string();
            if !edges.iter().any(|e| e == from) {
                edges.push(from.to_string());
            }
            links.push((index, from.to_string(), dir));
        }
        if edges.len() != 4 {
            return Err(bad(format!(
                "expected 4 incoming edges, found {} ({edges:?})",
                edges.len()
            )));
        }
        let mut geoms: [Option<ApproachGeom>; 4] = Default::default();
        for edge in &edges {
            let mut lanes: Vec<(usize, Vec<(f64, f64)>)> = Vec::new();
            for l in elements(xml, "lane") {
                let id = attr(l, "id").unwrap_or("");
                if id.rsplit_once('_').map(|(e, _)| e) != Some(edge.as_str()) {
                    continue;
                }
                let index = attr(l, "index").and_then(|v| v.parse().ok()).unwrap_or(0);
                let shape = parse_shape(attr(l, "shape").unwrap_or(""))?;
                if shape.len() < 2 {
                    return Err(bad(format!(
                        "lane {id} has a shape of {} points",
                        shape.len()
                    )));
                }
                lanes.push((index, shape));
            }
            lanes.sort_by_key(|(i, _)| *i);
            let Some((_, kerb)) = lanes.first() else {
                return Err(bad(format!("edge {edge} has no lanes")));
            };
            let (a, b) = (kerb[kerb.len() - 2], kerb[kerb.len() - 1]);
            let n = ((b.0 - a.0).powi(2) + (b.1 - a.1).powi(2)).sqrt().max(1e-9);
            let dir = ((b.0 - a.0) / n, (b.1 - a.1) / n);
            let left = (-dir.1, dir.0);
            let lane_width = match lanes.get(1) {
                Some((_, s)) => {
                    let p = s[s.len() - 1];
                    ((p.0 - b.0) * left.0 + (p.1 - b.1) * left.1).abs()
                }
                None => 3.2,
            };
            // Heading south means the vehicles come from the north arm, and so on.
            let approach = if dir.1.abs() > dir.0.abs() {
                if dir.1 < 0.0 {
                    Approach::North
                } else {
                    Approach::South
                }
            } else if dir.0 < 0.0 {
                Approach::East
            } else {
                Approach::West
            };
            if geoms[approach.index()].is_some() {
                return Err(bad(format!(
                    "two incoming edges from the {} arm",
                    approach.name()
                )));
            }
            geoms[approach.index()] = Some(ApproachGeom {
                edge: edge.clone(),
                lanes: lanes.len(),
                stop: b,
                dir,
                left,
                lane_width,
            });
        }
        let approaches = geoms.map(|g| g.expect("four distinct arms checked above"));
        let mut out: Vec<Link> = links
            .into_iter()
            .map(|(index, from, dir)| Link {
                index,
                approach: Approach::ALL
                    .into_iter()
                    .find(|a| approaches[a.index()].edge == from)
                    .unwrap_or(Approach::North),
                dir,
            })
            .collect();
        out.sort_by_key(|l| l.index);
        for (i, l) in out.iter().enumerate() {
            if l.index != i {
                return Err(bad(format!("link indexes are not 0..{}", out.len())));
            }
        }
        Ok(Junction {
            tls: tls.to_string(),
            approaches,
            links: out,
        })
    }

    /// The light's state string for a controller signal: one character per link,
    /// `G` (priority green), `g` (green, yield: left turns), `y`, `r`.
    pub fn state_string(&self, signal: Signal) -> String {
        let lights = signal.lights();
        self.links
            .iter()
            .map(|l| match lights[l.approach.index()] {
                Light::Green if l.dir == "l" || l.dir == "L" => 'g',
                Light::Green => 'G',
                Light::Yellow => 'y',
                Light::Red => 'r',
            })
            .collect()
    }

    /// Which approach an incoming lane id (`<edge>_<index>`) belongs to, and its index.
    pub fn approach_of_lane(&self, lane_id: &str) -> Option<(Approach, usize)> {
        let (edge, idx) = lane_id.rsplit_once('_')?;
        let a = Approach::ALL
            .into_iter()
            .find(|a| self.approaches[a.index()].edge == edge)?;
        Some((a, idx.parse().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::Group;

    fn shipped() -> Junction {
        let xml = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../testbed/traffic/peak-hour/junction.net.xml"
        ))
        .unwrap();
        Junction::parse(&xml, "C").unwrap()
    }

    #[test]
    fn reads_the_shipped_junction() {
        let j = shipped();
        assert_eq!(j.links.len(), 16);
        for a in Approach::ALL {
            let g = &j.approaches[a.index()];
            assert_eq!(g.edge, format!("{}_in", &a.name()[..1].to_uppercase()));
            assert_eq!(g.lanes, 2);
            assert!((g.lane_width - 3.2).abs() < 1e-6);
        }
        // A point 20 m up the north arm, in the middle of lane 1.
        let n = &j.approaches[Approach::North.index()];
        let (along, lane) = n.project(n.stop.0 + 3.2, n.stop.1 + 20.0);
        assert!((along - 20.0).abs() < 1e-9 && (lane - 1.0).abs() < 1e-9);
    }

    #[test]
    fn state_strings_follow_the_signal() {
        let j = shipped();
        let ns = j.state_string(Signal::Green(Group::NS));
        // netconvert's own first phase gives NS green with lefts yielding.
        assert_eq!(ns, "GGGgrrrrGGGgrrrr");
        assert_eq!(
            j.state_string(Signal::Yellow(Group::EW)),
            "rrrryyyyrrrryyyy"
        );
        assert_eq!(
            j.state_string(Signal::AllRed { next: Group::NS }),
            "r".repeat(16)
        );
    }

    #[test]
    fn rejects_a_network_without_the_light() {
        assert!(Junction::parse("<net></net>", "C").is_err());
    }
}
