//! Open-loop load generation: a trace becomes a schedule of requests fired at their arrival
//! times, whether or not earlier requests have been answered.
//!
//! - [`Schedule::from_trace`]: `(send_at, prompt_tokens, max_tokens, session)` per request.
//! - [`run_open_loop`]: the async driver, generic over the request function so the agent's
//!   HTTP client (or a test double) plugs in. In-flight requests are capped; a request that
//!   would exceed the cap is recorded as [`Outcome::Shed`], never dropped silently, and every
//!   scheduled request yields exactly one [`RequestRecord`].
//!
//! Time comes from tokio's clock, so tests run under `tokio::time::pause()`.

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::trace::Trace;

/// One request to send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduledRequest {
    /// Index in the schedule (also the report's request id).
    pub id: u64,
    /// When to send it, since the run started.
    pub send_at: Duration,
    /// Prompt length in tokens.
    pub prompt_tokens: u32,
    /// Answer budget in tokens.
    pub max_tokens: u32,
    /// Conversation session, when the trace has one.
    pub session: Option<String>,
    /// Model name from the trace.
    pub model: String,
    /// The request failed in the original trace (`Response tokens` = 0); it is still sent,
    /// with `max_tokens` = [`ScheduleOptions::failed_max_tokens`].
    pub failed_in_trace: bool,
}

/// How a trace becomes a schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScheduleOptions {
    /// Upper bound for `max_tokens` (a small model on a device cannot answer 2000 tokens).
    pub max_tokens_cap: u32,
    /// Upper bound for `prompt_tokens`.
    pub prompt_tokens_cap: u32,
    /// `max_tokens` for requests that failed in the trace.
    pub failed_max_tokens: u32,
}

impl Default for ScheduleOptions {
    fn default() -> Self {
        Self {
            max_tokens_cap: 256,
            prompt_tokens_cap: 2048,
            failed_max_tokens: 16,
        }
    }
}

/// A list of requests sorted by send time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// The requests; `id` is the position in this list.
    pub requests: Vec<ScheduledRequest>,
}

impl Schedule {
    /// Turn a trace into a schedule: arrivals are shifted so the first is sent at 0, sorted
    /// by time (stable), lengths capped by `opts`.
    pub fn from_trace(trace: &Trace, opts: &ScheduleOptions) -> Result<Self> {
        if opts.max_tokens_cap == 0 || opts.prompt_tokens_cap == 0 {
            return Err(Error::config(
                "max_tokens_cap/prompt_tokens_cap",
                "must be at least 1",
            ));
        }
        let mut recs: Vec<_> = trace.records.iter().collect();
        recs.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
        let t0 = recs.first().map(|r| r.timestamp).unwrap_or(0.0);
        let requests = recs
            .into_iter()
            .enumerate()
            .map(|(i, r)| ScheduledRequest {
                id: i as u64,
                send_at: Duration::from_secs_f64((r.timestamp - t0).max(0.0)),
                prompt_tokens: r.request_tokens.clamp(1, opts.prompt_tokens_cap),
                max_tokens: if r.failed() {
                    opts.failed_max_tokens.max(1)
                } else {
                    r.response_tokens.min(opts.max_tokens_cap)
                },
                session: r.session_id.clone(),
                model: r.model.clone(),
                failed_in_trace: r.failed(),
            })
            .collect();
        Ok(Self { requests })
    }

    /// Number of requests.
    pub fn len(&self) -> usize {
        self.requests.len()
    }

    /// No requests.
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }
}

/// What the request function reports for an answered request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Time to first token, measured by the client.
    pub ttft: Option<Duration>,
    /// Tokens generated.
    pub tokens_out: u32,
    /// The tier that produced (most of) the answer: `device`, `edge`, `cloud`.
    pub tier: Option<String>,
    /// The request was escalated beyond its entry tier.
    pub escalated: bool,
    /// Answered in a degraded mode (e.g. a shallow exit because the parent was unreachable).
    pub degraded: bool,
    /// The generated text, kept to compare greedy outputs with a reference run.
    pub text: Option<String>,
}

/// The fate of one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum Outcome {
    /// Answered.
    Answered,
    /// Failed with an explicit error (including timeouts).
    Error(String),
    /// Not sent: the in-flight cap was reached at its send time.
    Shed,
}

/// One request's record, as the report consumes it. Times in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Request id (schedule index).
    pub id: u64,
    /// Scheduled send time, ms since the run started.
    pub scheduled_ms: f64,
    /// Actual send time, ms since the run started (`None` when shed).
    pub sent_ms: Option<f64>,
    /// Outcome.
    pub outcome: Outcome,
    /// Send to completion (answered or errored), ms.
    pub latency_ms: Option<f64>,
    /// Time to first token, ms.
    pub ttft_ms: Option<f64>,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub tokens_out: u32,
    /// Tier that answered.
    pub tier: Option<String>,
    /// Escalated beyond the entry tier.
    pub escalated: bool,
    /// Degraded answer.
    pub degraded: bool,
    /// The generated text (absent from records written before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl RequestRecord {
    fn base(req: &ScheduledRequest) -> Self {
        Self {
            id: req.id,
            scheduled_ms: ms(req.send_at),
            sent_ms: None,
            outcome: Outcome::Shed,
            latency_ms: None,
            ttft_ms: None,
            prompt_tokens: req.prompt_tokens,
            tokens_out: 0,
            tier: None,
            escalated: false,
            degraded: false,
            text: None,
        }
    }
}

/// Options of the open-loop driver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OpenLoopConfig {
    /// Most requests in flight; one more at its send time is shed.
    pub max_in_flight: usize,
    /// A request not finished after this long is recorded as an error `timeout`.
    pub request_timeout: Duration,
}

impl Default for OpenLoopConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 256,
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// Fire every request of `schedule` at its `send_at` (relative to the call), regardless of
/// replies, through `send`. Returns one record per scheduled request, sorted by id.
///
/// `send` returns `Ok(Reply)` or an error message; a panicking `send` is recorded as an
/// error too. Requests run as tokio tasks, so `send`'s future must be `Send + 'static`.
pub async fn run_open_loop<F, Fut, E>(
    schedule: &Schedule,
    config: &OpenLoopConfig,
    send: F,
) -> Vec<RequestRecord>
where
    F: Fn(ScheduledRequest) -> Fut,
    Fut: Future<Output = std::result::Result<Reply, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let start = Instant::now();
    let cap = config.max_in_flight.max(1);
    let mut in_flight: JoinSet<RequestRecord> = JoinSet::new();
    let mut done: Vec<RequestRecord> = Vec::with_capacity(schedule.len());
    for req in &schedule.requests {
        let at = start + req.send_at;
        // collect completions while waiting, so the in-flight count is current
        loop {
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(at) => break,
                Some(res) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Ok(rec) = res { done.push(rec) }
                }
            }
        }
        while let Some(res) = in_flight.try_join_next() {
            if let Ok(rec) = res {
                done.push(rec);
            }
        }
        let rec = RequestRecord::base(req);
        if in_flight.len() >= cap {
            tracing::debug!(
                id = req.id,
                "open loop: in-flight cap reached, request shed"
            );
            done.push(rec); // Outcome::Shed
            continue;
        }
        let fut = send(req.clone());
        in_flight.spawn(attempt(rec, start, config.request_timeout, fut));
    }
    while let Some(res) = in_flight.join_next().await {
        if let Ok(rec) = res {
            done.push(rec);
        }
    }
    done.sort_by_key(|r| r.id);
    done
}

/// Run one request's future under `timeout` and fill its record (a panicking future is an
/// error record; a timed-out one is aborted).
async fn attempt<Fut, E>(
    mut rec: RequestRecord,
    start: Instant,
    timeout: Duration,
    fut: Fut,
) -> RequestRecord
where
    Fut: Future<Output = std::result::Result<Reply, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let sent = Instant::now();
    rec.sent_ms = Some(ms(sent.duration_since(start)));
    // the inner task turns a panic of `send` into an error record
    let task = tokio::spawn(fut);
    let abort = task.abort_handle();
    let result = tokio::time::timeout(timeout, task).await;
    if result.is_err() {
        abort.abort(); // a timed-out request must not keep running
    }
    rec.latency_ms = Some(ms(sent.elapsed()));
    rec.outcome = match result {
        Err(_) => Outcome::Error("timeout".to_string()),
        Ok(Err(join)) => Outcome::Error(format!("request task failed: {join}")),
        Ok(Ok(Err(e))) => Outcome::Error(e.to_string()),
        Ok(Ok(Ok(reply))) => {
            rec.ttft_ms = reply.ttft.map(ms);
            rec.tokens_out = reply.tokens_out;
            rec.tier = reply.tier;
            rec.escalated = reply.escalated;
            rec.degraded = reply.degraded;
            rec.text = reply.text;
            Outcome::Answered
        }
    };
    rec
}

/// Send every request of `schedule` one after another, each once the previous one finished,
/// ignoring `send_at`: the reference run that concurrent, faulted runs are compared with
/// (nothing is shed; `max_in_flight` is not used). One record per request, sorted by id.
pub async fn run_sequential<F, Fut, E>(
    schedule: &Schedule,
    config: &OpenLoopConfig,
    send: F,
) -> Vec<RequestRecord>
where
    F: Fn(ScheduledRequest) -> Fut,
    Fut: Future<Output = std::result::Result<Reply, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let start = Instant::now();
    let mut done = Vec::with_capacity(schedule.len());
    for req in &schedule.requests {
        let fut = send(req.clone());
        done.push(attempt(RequestRecord::base(req), start, config.request_timeout, fut).await);
    }
    done.sort_by_key(|r| r.id);
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Trace;

    fn schedule(times_ms: &[u64]) -> Schedule {
        Schedule {
            requests: times_ms
                .iter()
                .enumerate()
                .map(|(i, &t)| ScheduledRequest {
                    id: i as u64,
                    send_at: Duration::from_millis(t),
                    prompt_tokens: 10,
                    max_tokens: 5,
                    session: None,
                    model: "m".into(),
                    failed_in_trace: false,
                })
                .collect(),
        }
    }

    #[test]
    fn trace_to_schedule() {
        let t = Trace::parse_str(
            "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n\
             12,ChatGPT,472,18,490,Conversation log\n\
             10,GPT-4,5000,900,5900,API log\n\
             11,ChatGPT,0,0,0,API log\n",
        )
        .unwrap();
        let s = Schedule::from_trace(&t, &ScheduleOptions::default()).unwrap();
        let r = &s.requests;
        assert_eq!(
            r.iter().map(|r| r.send_at.as_secs()).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert_eq!(
            (r[0].prompt_tokens, r[0].max_tokens, r[0].model.as_str()),
            (2048, 256, "GPT-4")
        );
        assert!(r[1].failed_in_trace && r[1].max_tokens == 16 && r[1].prompt_tokens == 1);
        assert_eq!(r[2].max_tokens, 18);
    }

    #[tokio::test(start_paused = true)]
    async fn fires_on_time_without_waiting_for_replies() {
        let s = schedule(&[0, 100, 200, 300]);
        // every reply takes 1 s: a closed loop would send the 2nd request at 1 s
        let recs = run_open_loop(&s, &OpenLoopConfig::default(), |req| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, String>(Reply {
                tokens_out: req.max_tokens,
                ttft: Some(Duration::from_millis(50)),
                ..Reply::default()
            })
        })
        .await;
        assert_eq!(recs.len(), 4);
        for (r, want) in recs.iter().zip([0.0, 100.0, 200.0, 300.0]) {
            let sent = r.sent_ms.unwrap();
            assert!((sent - want).abs() < 2.0, "sent at {sent}, want {want}");
            assert_eq!(r.outcome, Outcome::Answered);
            assert!((r.latency_ms.unwrap() - 1000.0).abs() < 2.0);
            assert_eq!((r.ttft_ms, r.tokens_out), (Some(50.0), 5));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cap_sheds_explicitly_and_everything_is_accounted_for() {
        let s = schedule(&[0, 0, 0, 0, 0, 10, 2000]);
        let cfg = OpenLoopConfig {
            max_in_flight: 2,
            request_timeout: Duration::from_secs(5),
        };
        let recs = run_open_loop(&s, &cfg, |req| async move {
            match req.id {
                0 => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Ok(Reply::default())
                }
                1 => {
                    tokio::time::sleep(Duration::from_secs(100)).await; // times out
                    Ok(Reply::default())
                }
                6 => panic!("request function bug"),
                _ => Err("refused".to_string()),
            }
        })
        .await;
        let kinds: Vec<&Outcome> = recs.iter().map(|r| &r.outcome).collect();
        assert_eq!(
            recs.iter().map(|r| r.id).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4, 5, 6]
        );
        assert_eq!(kinds[0], &Outcome::Answered);
        assert_eq!(kinds[1], &Outcome::Error("timeout".into()));
        assert!(
            kinds[2..6].iter().all(|k| **k == Outcome::Shed),
            "{kinds:?}"
        );
        assert!(
            matches!(kinds[6], Outcome::Error(m) if m.contains("request task failed")),
            "{kinds:?}"
        );
        assert!((recs[1].latency_ms.unwrap() - 5000.0).abs() < 2.0);
        assert_eq!(recs[2].sent_ms, None);
    }

    #[tokio::test(start_paused = true)]
    async fn sequential_waits_for_each_reply_and_keeps_the_text() {
        // scheduled all at once with a cap of 1: open loop would shed; sequential sends
        // each after the previous reply and sheds nothing
        let s = schedule(&[0, 0, 0]);
        let cfg = OpenLoopConfig {
            max_in_flight: 1,
            request_timeout: Duration::from_secs(5),
        };
        let recs = run_sequential(&s, &cfg, |req| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if req.id == 1 {
                return Err("refused".to_string());
            }
            Ok(Reply {
                text: Some(format!("answer {}", req.id)),
                ..Reply::default()
            })
        })
        .await;
        let sent: Vec<f64> = recs.iter().map(|r| r.sent_ms.unwrap()).collect();
        for (got, want) in sent.iter().zip([0.0, 1000.0, 2000.0]) {
            assert!((got - want).abs() < 2.0, "sent at {sent:?}");
        }
        assert_eq!(recs[0].text.as_deref(), Some("answer 0"));
        assert_eq!(recs[1].outcome, Outcome::Error("refused".into()));
        assert_eq!(
            (recs[1].text.as_ref(), recs[2].outcome.clone()),
            (None, Outcome::Answered)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn errors_are_recorded_not_lost() {
        let s = schedule(&[0, 5, 10]);
        let recs = run_open_loop(&s, &OpenLoopConfig::default(), |req| async move {
            if req.id == 1 {
                Err("connection reset".to_string())
            } else {
                Ok(Reply {
                    tier: Some("edge".into()),
                    escalated: true,
                    ..Reply::default()
                })
            }
        })
        .await;
        assert_eq!(recs[1].outcome, Outcome::Error("connection reset".into()));
        assert_eq!(recs[0].tier.as_deref(), Some("edge"));
        assert!(recs[2].escalated);
    }
}
