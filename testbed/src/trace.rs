//! BurstGPT traces: parsing, time scaling, windowing, filtering, and a synthetic generator.
//!
//! The BurstGPT CSV layout (HPMLL/BurstGPT): `Timestamp` (seconds from the trace start),
//! `Model`, `Request tokens`, `Response tokens`, `Total tokens`, `Log Type`; newer files add
//! `Session ID` and `Elapsed time`. Columns are found by header name in any order (case,
//! spaces and underscores ignored; unknown columns are skipped). Failed requests have
//! `Response tokens` = 0: they are kept and flagged by [`TraceRecord::failed`]. A malformed
//! row is an [`Error::TraceRow`] naming its line and column.
//!
//! Entry points: [`Trace::load`] / [`Trace::parse`], [`Trace::speed_up`], [`Trace::window`],
//! [`Trace::filter_model`], [`SyntheticConfig::generate`], [`Trace::write_csv`].

use std::io::{Read, Write};
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Gamma, Zipf};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceRecord {
    /// Line of the CSV file it came from (0 for synthetic records not yet written).
    pub line: u64,
    /// Arrival time in seconds since the trace start.
    pub timestamp: f64,
    /// Model name as in the trace (`ChatGPT`, `GPT-4`, ...).
    pub model: String,
    /// Prompt length in tokens.
    pub request_tokens: u32,
    /// Answer length in tokens; 0 marks a failed request.
    pub response_tokens: u32,
    /// Total tokens as recorded.
    pub total_tokens: u32,
    /// `Conversation log` or `API log` as recorded.
    pub log_type: String,
    /// Session id (newer files), `None` when absent or empty.
    pub session_id: Option<String>,
    /// Elapsed time in seconds (newer files), `None` when absent or empty.
    pub elapsed: Option<f64>,
}

impl TraceRecord {
    /// The request failed in the original trace (`Response tokens` = 0).
    pub fn failed(&self) -> bool {
        self.response_tokens == 0
    }
}

/// A parsed trace: records in file order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// The records.
    pub records: Vec<TraceRecord>,
}

/// Column indices found in the header.
struct Columns {
    timestamp: usize,
    model: usize,
    request: usize,
    response: usize,
    total: usize,
    log_type: usize,
    session: Option<usize>,
    elapsed: Option<usize>,
    count: usize,
}

fn norm(h: &str) -> String {
    h.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

impl Columns {
    fn from_header(header: &csv::StringRecord) -> Result<Self> {
        let names: Vec<String> = header.iter().map(norm).collect();
        let find = |n: &str| names.iter().position(|h| h == n);
        let need = |n: &str, column: &'static str| find(n).ok_or(Error::TraceHeader { column });
        Ok(Self {
            timestamp: need("timestamp", "Timestamp")?,
            model: need("model", "Model")?,
            request: need("requesttokens", "Request tokens")?,
            response: need("responsetokens", "Response tokens")?,
            total: need("totaltokens", "Total tokens")?,
            log_type: need("logtype", "Log Type")?,
            session: find("sessionid"),
            elapsed: find("elapsedtime"),
            count: names.len(),
        })
    }
}

fn row_err(line: u64, column: &str, reason: impl Into<String>) -> Error {
    Error::TraceRow {
        line,
        column: column.to_string(),
        reason: reason.into(),
    }
}

fn parse_tokens(v: &str, line: u64, column: &str) -> Result<u32> {
    if let Ok(n) = v.parse::<u32>() {
        return Ok(n);
    }
    // some exports write integers as floats ("472.0")
    match v.parse::<f64>() {
        Ok(f) if f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f <= u32::MAX as f64 => {
            Ok(f as u32)
        }
        _ => Err(row_err(
            line,
            column,
            format!("`{v}` is not a non-negative integer token count"),
        )),
    }
}

fn parse_seconds(v: &str, line: u64, column: &str) -> Result<f64> {
    match v.parse::<f64>() {
        Ok(f) if f.is_finite() && f >= 0.0 => Ok(f),
        _ => Err(row_err(
            line,
            column,
            format!("`{v}` is not a non-negative number of seconds"),
        )),
    }
}

impl Trace {
    /// Parse BurstGPT CSV from a reader.
    pub fn parse<R: Read>(reader: R) -> Result<Self> {
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .trim(csv::Trim::All)
            .from_reader(reader);
        let header = rdr
            .headers()
            .map_err(|e| row_err(1, "*", format!("unreadable header: {e}")))?
            .clone();
        let cols = Columns::from_header(&header)?;
        let mut records = Vec::new();
        let mut row = csv::StringRecord::new();
        loop {
            match rdr.read_record(&mut row) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    let line = e.position().map(|p| p.line()).unwrap_or(0);
                    return Err(row_err(line, "*", format!("unreadable row: {e}")));
                }
            }
            let line = row.position().map(|p| p.line()).unwrap_or(0);
            if row.len() != cols.count {
                return Err(row_err(
                    line,
                    "*",
                    format!(
                        "expected {} fields like the header, found {}",
                        cols.count,
                        row.len()
                    ),
                ));
            }
            let field = |i: usize| row.get(i).unwrap_or("");
            let model = field(cols.model);
            if model.is_empty() {
                return Err(row_err(line, "Model", "empty model name"));
            }
            let optional = |i: Option<usize>| i.map(field).filter(|v| !v.is_empty());
            records.push(TraceRecord {
                line,
                timestamp: parse_seconds(field(cols.timestamp), line, "Timestamp")?,
                model: model.to_string(),
                request_tokens: parse_tokens(field(cols.request), line, "Request tokens")?,
                response_tokens: parse_tokens(field(cols.response), line, "Response tokens")?,
                total_tokens: parse_tokens(field(cols.total), line, "Total tokens")?,
                log_type: field(cols.log_type).to_string(),
                session_id: optional(cols.session).map(str::to_string),
                elapsed: optional(cols.elapsed)
                    .map(|v| parse_seconds(v, line, "Elapsed time"))
                    .transpose()?,
            });
        }
        Ok(Self { records })
    }

    /// Parse BurstGPT CSV text.
    pub fn parse_str(text: &str) -> Result<Self> {
        Self::parse(text.as_bytes())
    }

    /// Load a trace file (used as given: real BurstGPT files work directly).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::file("reading", path, e))?;
        Self::parse(std::io::BufReader::new(file))
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// No records.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Time span from the first to the last arrival, in seconds.
    pub fn span(&self) -> f64 {
        let (lo, hi) = self
            .records
            .iter()
            .fold((f64::INFINITY, 0.0f64), |(lo, hi), r| {
                (lo.min(r.timestamp), hi.max(r.timestamp))
            });
        if self.records.is_empty() {
            0.0
        } else {
            hi - lo
        }
    }

    /// Compress time by `factor` (2.0 = twice the request rate). Lengths are unchanged.
    pub fn speed_up(mut self, factor: f64) -> Result<Self> {
        if !(factor.is_finite() && factor > 0.0) {
            return Err(Error::config(
                "speed-up factor",
                format!("{factor} must be a positive number"),
            ));
        }
        for r in &mut self.records {
            r.timestamp /= factor;
        }
        Ok(self)
    }

    /// Keep arrivals in `[start_s, start_s + duration_s)` and shift them to start at 0.
    pub fn window(mut self, start_s: f64, duration_s: f64) -> Self {
        let end = start_s + duration_s;
        self.records
            .retain(|r| r.timestamp >= start_s && r.timestamp < end);
        for r in &mut self.records {
            r.timestamp -= start_s;
        }
        self
    }

    /// The trace played again and again from time 0 until `until_s`: copy `k` starts
    /// `k × (span + mean gap)` after the first, so the request rate stays that of the
    /// trace. Session ids of copy `k > 0` get a `#k` suffix (a new conversation).
    pub fn looped(self, until_s: f64) -> Self {
        let n = self.records.len();
        let first = self
            .records
            .iter()
            .map(|r| r.timestamp)
            .fold(f64::INFINITY, f64::min);
        let span = self.span();
        let period = if n > 1 && span > 0.0 {
            span + span / (n - 1) as f64
        } else {
            1.0
        };
        let mut out = Vec::new();
        let mut k = 0u64;
        while n > 0 && (k as f64) * period < until_s {
            for r in &self.records {
                let t = r.timestamp - first + k as f64 * period;
                if t >= until_s {
                    continue;
                }
                let mut r = r.clone();
                r.timestamp = t;
                if k > 0 {
                    r.session_id = r.session_id.map(|s| format!("{s}#{k}"));
                }
                out.push(r);
            }
            k += 1;
        }
        out.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
        Self { records: out }
    }

    /// Keep the records of one model (case-insensitive).
    pub fn filter_model(mut self, model: &str) -> Self {
        self.records.retain(|r| r.model.eq_ignore_ascii_case(model));
        self
    }

    /// Write the trace in the newer BurstGPT layout (with `Session ID`, `Elapsed time`).
    pub fn write_csv<W: Write>(&self, writer: W) -> Result<()> {
        let mut w = csv::Writer::from_writer(writer);
        w.write_record([
            "Timestamp",
            "Model",
            "Request tokens",
            "Response tokens",
            "Total tokens",
            "Log Type",
            "Session ID",
            "Elapsed time",
        ])?;
        for r in &self.records {
            w.write_record([
                format!("{:.3}", r.timestamp),
                r.model.clone(),
                r.request_tokens.to_string(),
                r.response_tokens.to_string(),
                r.total_tokens.to_string(),
                r.log_type.clone(),
                r.session_id.clone().unwrap_or_default(),
                r.elapsed.map(|e| format!("{e:.3}")).unwrap_or_default(),
            ])?;
        }
        w.flush()
            .map_err(|e| Error::file("writing", "trace csv", e))?;
        Ok(())
    }
}

/// Parameters of a synthetic BurstGPT-like trace.
///
/// Inter-arrival times are Gamma(shape, scale) seconds (BurstGPT's fit: shape 0.5, scale 2.0
/// — bursty, mean 1 s). Lengths are Zipf(a) ranks shifted to start at `min` and clamped to
/// `max`: `min + Zipf(n = max - min + 1, a) - 1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SyntheticConfig {
    /// Number of requests.
    pub requests: usize,
    /// Gamma shape of inter-arrival times.
    pub gamma_shape: f64,
    /// Gamma scale (seconds) of inter-arrival times.
    pub gamma_scale: f64,
    /// Zipf exponent of lengths.
    pub zipf_a: f64,
    /// Prompt length clamps `(min, max)` in tokens.
    pub request_tokens: (u32, u32),
    /// Answer length clamps `(min, max)` in tokens.
    pub response_tokens: (u32, u32),
    /// Models and their weights.
    pub models: Vec<(String, f64)>,
    /// Share of `API log` requests (the rest are `Conversation log`).
    pub api_share: f64,
    /// Share of failed requests (`Response tokens` = 0).
    pub failure_rate: f64,
    /// Conversation sessions to draw session ids from.
    pub sessions: u32,
    /// RNG seed.
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            requests: 200,
            gamma_shape: 0.5,
            gamma_scale: 2.0,
            zipf_a: 1.1,
            request_tokens: (8, 2048),
            response_tokens: (1, 512),
            models: vec![("ChatGPT".to_string(), 0.8), ("GPT-4".to_string(), 0.2)],
            api_share: 0.3,
            failure_rate: 0.02,
            sessions: 24,
            seed: 42,
        }
    }
}

impl SyntheticConfig {
    fn validate(&self) -> Result<()> {
        if !(self.gamma_shape > 0.0 && self.gamma_scale > 0.0) {
            return Err(Error::config(
                "gamma_shape/gamma_scale",
                "must both be positive",
            ));
        }
        if !(self.zipf_a.is_finite() && self.zipf_a > 0.0) {
            return Err(Error::config("zipf_a", "must be positive"));
        }
        for (name, (lo, hi)) in [
            ("request_tokens", self.request_tokens),
            ("response_tokens", self.response_tokens),
        ] {
            if lo == 0 || lo > hi {
                return Err(Error::Config {
                    field: name,
                    reason: format!("({lo}, {hi}) needs 1 <= min <= max"),
                });
            }
        }
        if self.models.is_empty()
            || self.models.iter().any(|(_, w)| !w.is_finite() || *w < 0.0)
            || self.models.iter().all(|(_, w)| *w == 0.0)
        {
            return Err(Error::config(
                "models",
                "need at least one model with a positive weight",
            ));
        }
        for (name, p) in [
            ("api_share", self.api_share),
            ("failure_rate", self.failure_rate),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::Config {
                    field: name,
                    reason: format!("{p} is not in [0, 1]"),
                });
            }
        }
        Ok(())
    }

    /// Generate the trace (deterministic for a given config and seed).
    pub fn generate(&self) -> Result<Trace> {
        self.validate()?;
        let mut rng = StdRng::seed_from_u64(self.seed);
        let gamma = Gamma::new(self.gamma_shape, self.gamma_scale)
            .map_err(|e| Error::config("gamma_shape/gamma_scale", e.to_string()))?;
        let zipf = |(lo, hi): (u32, u32)| {
            Zipf::new(u64::from(hi - lo) + 1, self.zipf_a)
                .map_err(|e| Error::config("zipf_a", e.to_string()))
        };
        let (zreq, zresp) = (zipf(self.request_tokens)?, zipf(self.response_tokens)?);
        let total_weight: f64 = self.models.iter().map(|(_, w)| w).sum();
        let mut t = 0.0;
        let mut records = Vec::with_capacity(self.requests);
        for i in 0..self.requests {
            if i > 0 {
                t += gamma.sample(&mut rng);
            }
            let mut pick = rng.gen_range(0.0..total_weight);
            let mut model = &self.models[0].0;
            for (m, w) in &self.models {
                if pick < *w {
                    model = m;
                    break;
                }
                pick -= w;
            }
            let draw = |z: &Zipf<f64>, (lo, hi): (u32, u32), rng: &mut StdRng| {
                let rank = z.sample(rng) as u64; // in [1, n]
                (u64::from(lo) + rank.saturating_sub(1)).min(u64::from(hi)) as u32
            };
            let request_tokens = draw(&zreq, self.request_tokens, &mut rng);
            let failed = rng.gen_bool(self.failure_rate);
            let response_tokens = if failed {
                0
            } else {
                draw(&zresp, self.response_tokens, &mut rng)
            };
            let api = rng.gen_bool(self.api_share);
            let session_id =
                (!api && self.sessions > 0).then(|| rng.gen_range(0..self.sessions).to_string());
            // a plausible serving time: fixed overhead plus per-token decode time
            let elapsed = Some(0.2 + 0.02 * f64::from(response_tokens));
            records.push(TraceRecord {
                line: 0,
                timestamp: (t * 1000.0).round() / 1000.0,
                model: model.clone(),
                request_tokens,
                response_tokens,
                total_tokens: request_tokens + response_tokens,
                log_type: if api { "API log" } else { "Conversation log" }.to_string(),
                session_id,
                elapsed,
            });
        }
        Ok(Trace { records })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
5,ChatGPT,472,18,490,Conversation log
45,ChatGPT,1087,230,1317,Conversation log
118,GPT-4,417,276,693,Conversation log
130,ChatGPT,300,0,300,API log
";

    #[test]
    fn parses_the_original_layout_and_flags_failures() {
        let t = Trace::parse_str(OLD).unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(t.records[0].line, 2);
        assert_eq!(t.records[2].model, "GPT-4");
        assert_eq!(t.records[1].request_tokens, 1087);
        assert!(t.records[3].failed() && !t.records[0].failed());
        assert_eq!(t.records[0].session_id, None);
    }

    #[test]
    fn finds_columns_by_header_in_any_order() {
        let text = "Log Type,SessionID,Elapsed_time,Total tokens,Response tokens,Request tokens,Model,Timestamp,Extra
API log,77,1.5,30,10,20,GPT-4,3.25,x
Conversation log,,,5,0,5,ChatGPT,4,y
";
        let t = Trace::parse_str(text).unwrap();
        let r = &t.records[0];
        assert_eq!(
            (r.timestamp, r.request_tokens, r.response_tokens),
            (3.25, 20, 10)
        );
        assert_eq!(
            (r.session_id.as_deref(), r.elapsed),
            (Some("77"), Some(1.5))
        );
        assert_eq!(
            (t.records[1].session_id.clone(), t.records[1].elapsed),
            (None, None)
        );
    }

    #[test]
    fn malformed_rows_name_line_and_column() {
        let bad_tokens = OLD.replace("1087", "lots");
        let err = Trace::parse_str(&bad_tokens).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::TraceRow { line: 3, .. }), "{msg}");
        assert!(msg.contains("Request tokens"), "{msg}");

        let short = OLD.replace("118,GPT-4,417,276,693,Conversation log", "118,GPT-4,417");
        let err = Trace::parse_str(&short).unwrap_err();
        assert!(matches!(err, Error::TraceRow { line: 4, .. }), "{err}");

        let neg = OLD.replace("\n45,", "\n-45,");
        let err = Trace::parse_str(&neg).unwrap_err();
        assert!(
            err.to_string().contains("line 3, column `Timestamp`"),
            "{err}"
        );

        let err = Trace::parse_str("Timestamp,Model,Request tokens\n1,a,2\n").unwrap_err();
        assert!(err.to_string().contains("Response tokens"), "{err}");
    }

    #[test]
    fn scale_window_filter() {
        let t = Trace::parse_str(OLD).unwrap();
        assert_eq!(t.span(), 125.0);
        let fast = t.clone().speed_up(10.0).unwrap();
        assert_eq!(fast.records[1].timestamp, 4.5);
        let w = t.clone().window(40.0, 80.0);
        assert_eq!(
            w.records.iter().map(|r| r.timestamp).collect::<Vec<_>>(),
            [5.0, 78.0]
        );
        assert_eq!(t.clone().filter_model("gpt-4").len(), 1);
        assert!(t.speed_up(0.0).is_err());
    }

    #[test]
    fn a_looped_trace_keeps_its_rate_and_renames_sessions() {
        let t = Trace::parse_str(
            "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type,Session ID,Elapsed time\n\
             10,ChatGPT,5,1,6,Conversation log,s1,0.1\n\
             12,ChatGPT,5,1,6,API log,,0.1\n\
             14,ChatGPT,5,1,6,Conversation log,s1,0.1\n",
        )
        .unwrap();
        // span 4 s, mean gap 2 s: a copy every 6 s
        let l = t.clone().looped(15.0);
        let times: Vec<f64> = l.records.iter().map(|r| r.timestamp).collect();
        assert_eq!(times, [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0]);
        let sessions: Vec<Option<&str>> =
            l.records.iter().map(|r| r.session_id.as_deref()).collect();
        assert_eq!(sessions[..4], [Some("s1"), None, Some("s1"), Some("s1#1")]);
        assert_eq!(sessions[6], Some("s1#2"));
        assert!(Trace::default().looped(10.0).is_empty());
        assert_eq!(t.looped(0.0).len(), 0);
    }

    #[test]
    fn synthetic_is_seeded_bounded_and_round_trips() {
        let cfg = SyntheticConfig {
            requests: 2000,
            ..SyntheticConfig::default()
        };
        let a = cfg.generate().unwrap();
        assert_eq!(a, cfg.generate().unwrap());
        assert_ne!(
            a,
            SyntheticConfig {
                seed: 1,
                ..cfg.clone()
            }
            .generate()
            .unwrap()
        );
        for r in &a.records {
            assert!((8..=2048).contains(&r.request_tokens));
            assert!(r.response_tokens <= 512);
        }
        // Gamma(0.5, 2.0) inter-arrivals have mean 1 s
        let mean_gap = a.span() / 1999.0;
        assert!((0.8..1.2).contains(&mean_gap), "mean gap {mean_gap}");
        // Zipf: the shortest lengths are the most common
        let at_min = a.records.iter().filter(|r| r.request_tokens == 8).count();
        assert!(at_min > 200, "{at_min}");
        let mut buf = Vec::new();
        a.write_csv(&mut buf).unwrap();
        let back = Trace::parse(buf.as_slice()).unwrap();
        assert_eq!(back.len(), a.len());
        assert_eq!(
            back.records[10].request_tokens,
            a.records[10].request_tokens
        );
        assert_eq!(back.records[10].session_id, a.records[10].session_id);
    }
}
