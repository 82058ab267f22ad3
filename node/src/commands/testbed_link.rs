//! `flow-node testbed shape` (link shapers with a control port) and `testbed link-ctl`.
//!
//! The control protocol is one JSON object per line over TCP, answered by one JSON line:
//! `{"cmd":"stats"}` → `{"ok":true,"result":{"device1:edge1":{ShaperStats},...}}`;
//! `{"cmd":"apply","link":"a:b","direction":"both","change":{"delay_ms":80}}` →
//! `{"ok":true,"result":[["up",{LinkParams}],...]}`; errors → `{"ok":false,"error":"..."}`.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use flow_testbed::shaper::{
    Direction, LinkChange, LinkSchedule, ShaperConfig, ShaperHandle, ShaperStats,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Default control address of `shape` (inside the links container).
pub const DEFAULT_CONTROL: &str = "127.0.0.1:7900";

/// Longest control request line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// Flags of `testbed shape`.
#[derive(clap::Args, Debug)]
pub struct ShapeArgs {
    /// One link, repeatable: `name=device1:edge1,listen=0.0.0.0:7101,upstream=HOST:PORT`
    /// then optional `delay_ms=..,jitter_ms=..,rate_mbit=..,loss=..` (both directions) and
    /// `schedule=FILE` (a link schedule TOML, see testbed/links/).
    #[arg(long = "link", value_name = "SPEC", required = true)]
    pub links: Vec<String>,
    /// TCP address of the control port (`link-ctl` talks to it).
    #[arg(long, default_value = DEFAULT_CONTROL)]
    pub control: SocketAddr,
    /// Seed of the loss and jitter draws (each link adds its index).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Debug)]
struct LinkSpec {
    name: String,
    listen: SocketAddr,
    upstream: SocketAddr,
    change: LinkChange,
    schedule: Option<PathBuf>,
}

fn resolve(field: &str, v: &str) -> anyhow::Result<SocketAddr> {
    v.to_socket_addrs()
        .with_context(|| format!("{field}={v}: not an address HOST:PORT"))?
        .next()
        .with_context(|| format!("{field}={v}: resolves to nothing"))
}

fn parse_link(spec: &str) -> anyhow::Result<LinkSpec> {
    let (mut name, mut listen, mut upstream, mut schedule) = (None, None, None, None);
    let mut change = LinkChange::default();
    for kv in spec.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--link {spec:?}: `{kv}` is not key=value"))?;
        let num = |v: &str| -> anyhow::Result<f64> {
            v.parse()
                .with_context(|| format!("--link {spec:?}: {k}={v} is not a number"))
        };
        match k {
            "name" => name = Some(v.to_string()),
            "listen" => listen = Some(resolve(k, v)?),
            "upstream" => upstream = Some(resolve(k, v)?),
            "schedule" => schedule = Some(PathBuf::from(v)),
            "delay_ms" => change.delay_ms = Some(num(v)?),
            "jitter_ms" => change.jitter_ms = Some(num(v)?),
            "rate_mbit" => change.rate_mbit = Some(num(v)?),
            "loss" => change.loss = Some(num(v)?),
            o => bail!("--link {spec:?}: unknown key `{o}` (name, listen, upstream, delay_ms, jitter_ms, rate_mbit, loss, schedule)"),
        }
    }
    let missing = |k: &str| anyhow::anyhow!("--link {spec:?}: `{k}=` missing");
    Ok(LinkSpec {
        name: name.ok_or_else(|| missing("name"))?,
        listen: listen.ok_or_else(|| missing("listen"))?,
        upstream: upstream.ok_or_else(|| missing("upstream"))?,
        change,
        schedule,
    })
}

type Links = Arc<BTreeMap<String, ShaperHandle>>;

/// Find a link by name, accepting `b:a` for `a:b`.
fn find<'a>(links: &'a Links, name: &str) -> Option<&'a ShaperHandle> {
    links.get(name).or_else(|| {
        let (a, b) = name.split_once(':')?;
        links.get(&format!("{b}:{a}"))
    })
}

/// A control request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
enum CtlRequest {
    Stats,
    Apply {
        link: String,
        #[serde(default)]
        direction: Direction,
        change: LinkChange,
    },
}

async fn answer(links: &Links, line: &str) -> Value {
    let req: CtlRequest = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    match req {
        CtlRequest::Stats => {
            let stats: BTreeMap<&String, ShaperStats> =
                links.iter().map(|(n, h)| (n, h.stats())).collect();
            json!({"ok": true, "result": stats})
        }
        CtlRequest::Apply {
            link,
            direction,
            change,
        } => {
            let Some(h) = find(links, &link) else {
                let known: Vec<_> = links.keys().collect();
                return json!({"ok": false, "error": format!("unknown link `{link}` (known: {known:?})")});
            };
            match h.apply(direction, change).await {
                Ok(p) => {
                    let per_dir: BTreeMap<String, _> = p
                        .into_iter()
                        .map(|(d, params)| (format!("{d:?}").to_lowercase(), params))
                        .collect();
                    json!({"ok": true, "result": per_dir})
                }
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            }
        }
    }
}

async fn serve_control(stream: TcpStream, links: Links) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r.take(MAX_LINE));
    let mut line = String::new();
    while matches!(r.read_line(&mut line).await, Ok(n) if n > 0) {
        if !line.ends_with('\n') {
            let _ = w
                .write_all(b"{\"ok\":false,\"error\":\"request line too long\"}\n")
                .await;
            return;
        }
        let mut reply = answer(&links, line.trim()).await.to_string();
        reply.push('\n');
        if w.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
        line.clear();
        r.get_mut().set_limit(MAX_LINE);
    }
}

/// Run the shapers until SIGTERM/Ctrl-C.
pub fn shape(a: ShapeArgs) -> anyhow::Result<()> {
    let specs = a
        .links
        .iter()
        .map(|s| parse_link(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut links = BTreeMap::new();
        for (i, s) in specs.into_iter().enumerate() {
            let mut cfg = ShaperConfig::loopback(s.upstream);
            cfg.listen = s.listen;
            cfg.seed = a.seed.wrapping_add(2 * i as u64);
            cfg.up = s
                .change
                .apply(&cfg.up)
                .with_context(|| format!("link {}", s.name))?;
            cfg.down = cfg.up.clone();
            if let Some(p) = &s.schedule {
                cfg.schedule = LinkSchedule::load(p)?;
            }
            let h = ShaperHandle::spawn(cfg)
                .await
                .with_context(|| format!("starting link {}", s.name))?;
            eprintln!(
                "link {}: {} -> {} ({:?})",
                s.name,
                h.local_addr(),
                s.upstream,
                s.change
            );
            anyhow::ensure!(
                links.insert(s.name.clone(), h).is_none(),
                "link {} given twice",
                s.name
            );
        }
        let links: Links = Arc::new(links);
        let listener = TcpListener::bind(a.control)
            .await
            .with_context(|| format!("binding the control port {}", a.control))?;
        eprintln!("control port {}", a.control);
        let accept = {
            let links = links.clone();
            async move {
                loop {
                    match listener.accept().await {
                        Ok((s, _)) => {
                            tokio::spawn(serve_control(s, links.clone()));
                        }
                        Err(e) => tracing::warn!("control accept failed: {e}"),
                    }
                }
            }
        };
        tokio::select! {
            _ = accept => {}
            r = super::shutdown_signal() => r?,
        }
        for (n, h) in links.iter() {
            eprintln!("link {n}: {:?}", h.stats());
        }
        Ok(())
    })
}

/// Flags of `testbed link-ctl`.
#[derive(clap::Args, Debug)]
pub struct LinkCtlArgs {
    /// Control address of the `shape` process.
    #[arg(long, default_value = DEFAULT_CONTROL)]
    pub control: SocketAddr,
    #[command(subcommand)]
    pub cmd: LinkCtlCmd,
}

/// What to ask the shaper.
#[derive(clap::Subcommand, Debug)]
pub enum LinkCtlCmd {
    /// Print every link's counters as JSON.
    Stats,
    /// Change a link now (unset fields keep their value).
    Apply {
        /// Link name, e.g. device1:edge1.
        link: String,
        /// up, down or both.
        #[arg(long, default_value = "both")]
        direction: String,
        #[arg(long)]
        delay_ms: Option<f64>,
        #[arg(long)]
        jitter_ms: Option<f64>,
        #[arg(long)]
        rate_mbit: Option<f64>,
        #[arg(long)]
        loss: Option<f64>,
    },
}

/// Send one control request and return the `result` (errors become `Err`).
pub async fn control_request(control: SocketAddr, req: &Value) -> anyhow::Result<Value> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(control))
        .await
        .with_context(|| format!("connecting to the shaper control port {control}: timeout"))?
        .with_context(|| format!("connecting to the shaper control port {control}"))?;
    s.write_all(format!("{req}\n").as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).await?;
    let v: Value = serde_json::from_str(&line).context("reading the shaper's reply")?;
    if v["ok"] == json!(true) {
        Ok(v["result"].clone())
    } else {
        bail!(
            "shaper refused: {}",
            v["error"].as_str().unwrap_or("no reason given")
        )
    }
}

pub fn link_ctl(a: LinkCtlArgs) -> anyhow::Result<()> {
    let req = match a.cmd {
        LinkCtlCmd::Stats => json!({"cmd": "stats"}),
        LinkCtlCmd::Apply {
            link,
            direction,
            delay_ms,
            jitter_ms,
            rate_mbit,
            loss,
        } => {
            let direction: Direction = serde_json::from_value(json!(direction))
                .with_context(|| format!("--direction {direction:?}: up, down or both"))?;
            let change = LinkChange {
                delay_ms,
                jitter_ms,
                rate_mbit,
                loss,
            };
            json!({"cmd": "apply", "link": link, "direction": direction, "change": change})
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let v = rt.block_on(control_request(a.control, &req))?;
    println!("{v}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_specs_parse_and_errors_name_the_key() {
        let s = parse_link(
            "name=device1:edge1,listen=127.0.0.1:7101,upstream=127.0.0.1:7000,delay_ms=5,rate_mbit=100",
        )
        .unwrap();
        assert_eq!(s.name, "device1:edge1");
        assert_eq!(s.change.delay_ms, Some(5.0));
        assert_eq!(s.change.rate_mbit, Some(100.0));
        let e =
            parse_link("name=a:b,listen=127.0.0.1:1,upstream=127.0.0.1:2,latency=3").unwrap_err();
        assert!(e.to_string().contains("latency"), "{e}");
        let e = parse_link("name=a:b,listen=127.0.0.1:1").unwrap_err();
        assert!(e.to_string().contains("upstream"), "{e}");
    }

    /// The control port changes a real relay and reports its counters.
    #[test]
    fn control_port_applies_and_reports() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let h = ShaperHandle::spawn(ShaperConfig::loopback(sink.local_addr().unwrap()))
                .await
                .unwrap();
            let shaper_addr = h.local_addr();
            let links: Links = Arc::new([("device1:edge1".to_string(), h)].into());
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let control = listener.local_addr().unwrap();
            let l2 = links.clone();
            tokio::spawn(async move {
                while let Ok((s, _)) = listener.accept().await {
                    tokio::spawn(serve_control(s, l2.clone()));
                }
            });
            let apply = json!({"cmd": "apply", "link": "edge1:device1", "direction": "up",
                "change": {"delay_ms": 30.0}});
            let r = control_request(control, &apply).await.unwrap();
            assert_eq!(r["up"]["delay"]["secs"], 0, "{r}");
            assert_eq!(r["up"]["delay"]["nanos"], 30_000_000, "{r}");
            assert!(r.get("down").is_none(), "{r}");
            let c = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let t = tokio::time::Instant::now();
            c.send_to(b"hello", shaper_addr).await.unwrap();
            let mut buf = [0u8; 16];
            sink.recv_from(&mut buf).await.unwrap();
            assert!(t.elapsed() >= Duration::from_millis(29));
            let stats = control_request(control, &json!({"cmd": "stats"}))
                .await
                .unwrap();
            let s: BTreeMap<String, ShaperStats> = serde_json::from_value(stats).unwrap();
            assert_eq!(s["device1:edge1"].up.bytes_out, 5);
            let bad = json!({"cmd": "apply", "link": "x:y", "change": {}});
            let e = control_request(control, &bad).await.unwrap_err();
            assert!(e.to_string().contains("unknown link `x:y`"), "{e}");
            let e = control_request(control, &json!({"cmd": "reboot"}))
                .await
                .unwrap_err();
            assert!(e.to_string().contains("bad request"), "{e}");
        });
    }
}
