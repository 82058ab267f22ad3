//! The edge's signal controller for a four-arm junction, as a pure state machine.
//!
//! Two conflicting signal groups: north–south ([`Group::NS`]) and east–west
//! ([`Group::EW`]); right and left turns run with their through movement (lefts yield).
//! Every change of right of way goes green → yellow → all-red → green of the other group,
//! with the yellow and all-red times of [`Timing`] always served in full.
//!
//! Modes ([`Mode`]):
//! - `Fixed`: each group gets `fixed_green` seconds, in turn (the baseline);
//! - `Adaptive`: at the start of each green its length is planned from the congestion
//!   indexes, `g = clamp(2·fixed_green · d_served / (d_served + d_other), min, max)` with
//!   `d` = the larger congestion index of a group's two approaches; a green gaps out
//!   early after `min_green` when its own approaches are empty and the other group waits;
//! - `Preempt`: adaptive plus emergency preemption. An emergency vehicle on a green
//!   approach holds that green (up to `max_green + max_hold`); one on a red approach ends
//!   the current green as soon as it has run `preempt_min_green`, then clearance, then
//!   its green. The vehicle's approach is green at most
//!   [`Timing::preemption_bound`] seconds after it is first reported.
//!
//! Drive it with [`Controller::step`] once per time step; it never reads a clock.

use crate::{Error, Result};

/// Approaches of the junction, indexable as `[N, E, S, W]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Approach {
    North,
    East,
    South,
    West,
}

impl Approach {
    pub const ALL: [Approach; 4] = [
        Approach::North,
        Approach::East,
        Approach::South,
        Approach::West,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn group(self) -> Group {
        match self {
            Approach::North | Approach::South => Group::NS,
            Approach::East | Approach::West => Group::EW,
        }
    }

    pub fn name(self) -> &'static str {
        ["north", "east", "south", "west"][self.index()]
    }
}

/// Signal groups; the two conflict with each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    NS,
    EW,
}

impl Group {
    pub fn other(self) -> Group {
        match self {
            Group::NS => Group::EW,
            Group::EW => Group::NS,
        }
    }

    pub fn approaches(self) -> [Approach; 2] {
        match self {
            Group::NS => [Approach::North, Approach::South],
            Group::EW => [Approach::East, Approach::West],
        }
    }
}

/// What the junction shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Green(Group),
    Yellow(Group),
    /// Everything red; `next` gets green when the clearance ends.
    AllRed {
        next: Group,
    },
}

/// The light one approach sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Light {
    Green,
    Yellow,
    Red,
}

impl Signal {
    /// Light per approach, indexed `[N, E, S, W]`.
    pub fn lights(self) -> [Light; 4] {
        let mut out = [Light::Red; 4];
        let (group, light) = match self {
            Signal::Green(g) => (g, Light::Green),
            Signal::Yellow(g) => (g, Light::Yellow),
            Signal::AllRed { .. } => return out,
        };
        for a in group.approaches() {
            out[a.index()] = light;
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Fixed,
    Adaptive,
    Preempt,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode> {
        match s {
            "fixed" => Ok(Mode::Fixed),
            "adaptive" => Ok(Mode::Adaptive),
            "preempt" => Ok(Mode::Preempt),
            o => Err(Error::Config(format!(
                "unknown controller {o:?}: use fixed, adaptive or preempt"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Fixed => "fixed",
            Mode::Adaptive => "adaptive",
            Mode::Preempt => "preempt",
        }
    }
}

/// Signal timing, seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    pub fixed_green: f64,
    pub min_green: f64,
    pub max_green: f64,
    pub yellow: f64,
    pub all_red: f64,
    /// Shortest green a preemption may cut the current green to.
    pub preempt_min_green: f64,
    /// Longest extension of a green held for an emergency vehicle beyond `max_green`.
    pub max_hold: f64,
    /// A group whose approaches' congestion index is below this is "empty".
    pub empty_below: f32,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            fixed_green: 30.0,
            min_green: 8.0,
            max_green: 50.0,
            yellow: 3.0,
            all_red: 2.0,
            preempt_min_green: 4.0,
            max_hold: 30.0,
            empty_below: 0.02,
        }
    }
}

impl Timing {
    pub fn validate(&self) -> Result<()> {
        let ok = self.yellow >= 3.0
            && self.all_red >= 1.0
            && self.min_green >= 4.0
            && self.preempt_min_green >= 2.0
            && self.preempt_min_green <= self.min_green
            && self.min_green <= self.fixed_green
            && self.fixed_green <= self.max_green
            && self.max_hold >= 0.0
            && self.max_green <= 300.0;
        if ok {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "timing {self:?}: need yellow ≥ 3 s, all-red ≥ 1 s, 2 ≤ preempt_min_green ≤ min_green (≥ 4) ≤ fixed_green ≤ max_green ≤ 300"
            )))
        }
    }

    /// Longest time from an emergency vehicle being reported on a red approach (and
    /// staying reported) to that approach showing green: finish the running clearance,
    /// serve the other group's shortest preempted green, clear again.
    pub fn preemption_bound(&self) -> f64 {
        2.0 * (self.yellow + self.all_red) + self.preempt_min_green
    }
}

/// What the cameras report each step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Inputs {
    /// Congestion index per approach `[N, E, S, W]`.
    pub congestion: [f32; 4],
    /// Emergency vehicle seen per approach.
    pub emergency: [bool; 4],
}

impl Inputs {
    fn demand(&self, g: Group) -> f32 {
        g.approaches()
            .iter()
            .map(|a| self.congestion[a.index()])
            .fold(0.0, f32::max)
    }

    fn emergency_on(&self, g: Group) -> bool {
        g.approaches().iter().any(|a| self.emergency[a.index()])
    }
}

/// The controller state machine.
#[derive(Debug, Clone)]
pub struct Controller {
    mode: Mode,
    timing: Timing,
    signal: Signal,
    /// Seconds in the current signal.
    elapsed: f64,
    /// Planned length of the current green.
    planned: f64,
}

impl Controller {
    /// Starts with north–south green.
    pub fn new(mode: Mode, timing: Timing) -> Result<Self> {
        timing.validate()?;
        Ok(Controller {
            mode,
            timing,
            signal: Signal::Green(Group::NS),
            elapsed: 0.0,
            planned: timing.fixed_green,
        })
    }

    pub fn signal(&self) -> Signal {
        self.signal
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    /// Seconds spent in the current signal.
    pub fn elapsed(&self) -> f64 {
        self.elapsed
    }

    /// Advance by `dt` seconds with the latest camera inputs; returns the signal to show
    /// for the next step.
    pub fn step(&mut self, dt: f64, inputs: &Inputs) -> Signal {
        self.elapsed += dt.max(0.0);
        let t = self.timing;
        match self.signal {
            Signal::Green(g) => {
                if self.green_should_end(g, inputs) {
                    self.enter(Signal::Yellow(g), inputs);
                }
            }
            Signal::Yellow(g) => {
                if self.elapsed >= t.yellow {
                    self.enter(Signal::AllRed { next: g.other() }, inputs);
                }
            }
            Signal::AllRed { next } => {
                if self.elapsed >= t.all_red {
                    self.enter(Signal::Green(next), inputs);
                }
            }
        }
        self.signal
    }

    fn enter(&mut self, signal: Signal, inputs: &Inputs) {
        self.signal = signal;
        self.elapsed = 0.0;
        if let Signal::Green(g) = signal {
            self.planned = match self.mode {
                Mode::Fixed => self.timing.fixed_green,
                Mode::Adaptive | Mode::Preempt => self.plan_green(g, inputs),
            };
        }
    }

    fn plan_green(&self, g: Group, inputs: &Inputs) -> f64 {
        let t = &self.timing;
        let (mine, other) = (inputs.demand(g), inputs.demand(g.other()));
        let share = if mine + other < 2.0 * t.empty_below {
            0.5
        } else {
            (mine / (mine + other)) as f64
        };
        (2.0 * t.fixed_green * share).clamp(t.min_green, t.max_green)
    }

    fn green_should_end(&self, g: Group, inputs: &Inputs) -> bool {
        let t = &self.timing;
        let e = self.elapsed;
        if self.mode == Mode::Preempt {
            if inputs.emergency_on(g) {
                // Hold for the emergency vehicle, but never starve the other group forever.
                return e >= t.max_green + t.max_hold;
            }
            if inputs.emergency_on(g.other()) {
                return e >= t.preempt_min_green;
            }
        }
        match self.mode {
            Mode::Fixed => e >= t.fixed_green,
            Mode::Adaptive | Mode::Preempt => {
                let gap_out = e >= t.min_green
                    && inputs.demand(g) < t.empty_below
                    && inputs.demand(g.other()) >= t.empty_below;
                e >= self.planned || gap_out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DT: f64 = 0.5;

    fn conflicting(lights: [Light; 4]) -> bool {
        let open = |a: Approach| lights[a.index()] != Light::Red;
        let ns = open(Approach::North) || open(Approach::South);
        let ew = open(Approach::East) || open(Approach::West);
        ns && ew
    }

    /// Inputs that change every few steps: random congestion, sometimes an emergency.
    fn inputs_strategy() -> impl Strategy<Value = Vec<(Inputs, u8)>> {
        let one = (
            prop::array::uniform4(0.0f32..0.6),
            prop::array::uniform4(prop::bool::weighted(0.08)),
            1u8..40,
        )
            .prop_map(|(c, e, hold)| {
                (
                    Inputs {
                        congestion: c,
                        emergency: e,
                    },
                    hold,
                )
            });
        prop::collection::vec(one, 1..60)
    }

    fn run(mode: Mode, script: &[(Inputs, u8)]) -> Vec<(Signal, Inputs)> {
        let mut c = Controller::new(mode, Timing::default()).unwrap();
        let mut out = vec![(c.signal(), Inputs::default())];
        for (inputs, hold) in script {
            for _ in 0..*hold {
                out.push((c.step(DT, inputs), *inputs));
            }
        }
        out
    }

    /// Durations of consecutive runs of the same signal (each trace entry is shown for DT).
    fn runs(trace: &[(Signal, Inputs)]) -> Vec<(Signal, f64)> {
        let mut out: Vec<(Signal, f64)> = Vec::new();
        for (s, _) in trace {
            match out.last_mut() {
                Some((last, d)) if last == s => *d += DT,
                _ => out.push((*s, DT)),
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn never_conflicting_greens_and_clearance_always_served(script in inputs_strategy(), m in 0usize..3) {
            let mode = [Mode::Fixed, Mode::Adaptive, Mode::Preempt][m];
            let t = Timing::default();
            let trace = run(mode, &script);
            for (s, _) in &trace {
                prop_assert!(!conflicting(s.lights()), "{s:?}");
            }
            let runs = runs(&trace);
            for w in runs.windows(2) {
                let ((a, da), (b, _)) = (w[0], w[1]);
                match (a, b) {
                    (Signal::Green(g), Signal::Yellow(h)) => prop_assert_eq!(g, h),
                    (Signal::Yellow(g), Signal::AllRed { next }) => {
                        prop_assert_eq!(next, g.other());
                        prop_assert!(da >= t.yellow, "yellow only {da} s");
                    }
                    (Signal::AllRed { next }, Signal::Green(g)) => {
                        prop_assert_eq!(next, g);
                        prop_assert!(da >= t.all_red, "all-red only {da} s");
                    }
                    other => prop_assert!(false, "illegal transition {other:?}"),
                }
            }
            // Greens that ended ran at least the preempt minimum (min_green without an
            // emergency vehicle in the preempt mode).
            let min = if mode == Mode::Preempt { t.preempt_min_green } else { t.min_green };
            for (s, d) in runs.iter().take(runs.len().saturating_sub(1)) {
                if matches!(s, Signal::Green(_)) {
                    prop_assert!(*d >= min, "green of {d} s");
                }
            }
        }

        #[test]
        fn preemption_serves_the_emergency_approach_in_bounded_time(
            script in inputs_strategy(),
            approach in 0usize..4,
            warmup in 0u32..200,
        ) {
            let t = Timing::default();
            let mut c = Controller::new(Mode::Preempt, t).unwrap();
            // Run some random traffic first (no emergency), to land anywhere in the cycle.
            let mut steps = 0;
            'warm: for (inputs, hold) in &script {
                let inputs = Inputs { emergency: [false; 4], ..*inputs };
                for _ in 0..*hold {
                    if steps >= warmup { break 'warm; }
                    c.step(DT, &inputs);
                    steps += 1;
                }
            }
            let a = Approach::ALL[approach];
            let mut inputs = Inputs { congestion: [0.3; 4], emergency: [false; 4] };
            inputs.emergency[a.index()] = true;
            let mut waited = 0.0;
            while c.signal() != Signal::Green(a.group()) {
                c.step(DT, &inputs);
                waited += DT;
                prop_assert!(waited <= t.preemption_bound() + DT, "waited {waited} s from {:?}", c.signal());
            }
        }
    }

    #[test]
    fn fixed_time_alternates_with_the_configured_cycle() {
        let t = Timing::default();
        let mut c = Controller::new(Mode::Fixed, t).unwrap();
        let mut greens = Vec::new();
        let mut last = c.signal();
        for _ in 0..(400.0 / DT) as usize {
            let s = c.step(DT, &Inputs::default());
            if s != last {
                if let Signal::Green(g) = s {
                    greens.push(g);
                }
                last = s;
            }
        }
        // A green starts every 30 + 3 + 2 = 35 s: 11 in 400 s after the first.
        assert_eq!(greens.len(), 11);
        assert!(greens.windows(2).all(|w| w[0] != w[1]));
    }

    #[test]
    fn adaptive_gives_the_busier_group_the_longer_green() {
        let t = Timing::default();
        let mut c = Controller::new(Mode::Adaptive, t).unwrap();
        let inputs = Inputs {
            congestion: [0.4, 0.1, 0.4, 0.1],
            emergency: [false; 4],
        };
        let trace: Vec<Signal> = (0..(600.0 / DT) as usize)
            .map(|_| c.step(DT, &inputs))
            .collect();
        let time_in = |s: Signal| trace.iter().filter(|x| **x == s).count() as f64 * DT;
        let (ns, ew) = (
            time_in(Signal::Green(Group::NS)),
            time_in(Signal::Green(Group::EW)),
        );
        assert!(ns > 2.5 * ew, "NS {ns} s vs EW {ew} s");
    }

    #[test]
    fn bad_timing_is_rejected() {
        let t = Timing {
            yellow: 1.0,
            ..Timing::default()
        };
        assert!(Controller::new(Mode::Fixed, t).is_err());
        assert!(Mode::parse("smart").is_err());
    }
}
