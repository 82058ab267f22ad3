//! The dashboard over a real 3-tier loopback cluster (tiny family) and a real socket: `/`
//! is the page (open even with an API key), `/aiflow/status` has every field the page reads
//! (and needs the key), its counters move after a request, and every endpoint the page's
//! HTML and script name is served (a cheap guard against a page calling a route that does
//! not exist). The page itself is driven in a browser by `tests/dashboard.py`.

use flow_familial::init::{init_checkpoint, Preset};
use flow_familial::Layout;
use flow_node::cluster::{ClusterSpec, LocalCluster};
use flow_node::http::ApiOptions;
use flow_node::EngineConfig;
use flow_protocol::{Encoding, Policy};
use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "dash-secret";
const INDEX_HTML: &str = include_str!("../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../assets/dashboard/app.js");
const STYLE_CSS: &str = include_str!("../assets/dashboard/style.css");

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One HTTP/1.1 request on a fresh connection (bodies here are never chunked: axum sends
/// a content length for these responses).
async fn request(addr: &str, method: &str, path: &str, key: bool, body: &str) -> Reply {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let auth = if key {
        format!("Authorization: Bearer {KEY}\r\n")
    } else {
        String::new()
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let raw = String::from_utf8(raw).expect("utf-8 reply");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

/// The paths the page loads or calls: `src`/`href` attributes of the HTML, and the `API`
/// table of the script (every `fetch` in it must go through that table).
fn page_paths() -> Vec<String> {
    let attrs = ["src=\"", "href=\""].into_iter().flat_map(|a| {
        INDEX_HTML
            .split(a)
            .skip(1)
            .filter_map(|s| s.split('"').next())
            .filter(|s| s.starts_with('/'))
    });
    let table = APP_JS
        .split_once("const API = {")
        .and_then(|(_, rest)| rest.split_once("};"))
        .expect("app.js has a `const API = { ... };` table")
        .0;
    for call in APP_JS.split("fetch(").skip(1) {
        assert!(
            call.starts_with("API."),
            "a fetch outside the API table: fetch({call:.40}"
        );
    }
    attrs
        .chain(table.split('"').skip(1).step_by(2))
        .map(str::to_string)
        .collect()
}

fn field<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| match k.parse::<usize>() {
        Ok(i) => &v[i],
        Err(_) => &v[k],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_its_status_and_every_endpoint_it_names() {
    let model = tempfile::tempdir().unwrap();
    init_checkpoint(Preset::Tiny, Layout::RuyiQwen2, 21, model.path()).unwrap();
    let certs = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(ClusterSpec {
        model_dir: model.path().to_path_buf(),
        declare_exits: None,
        device_exit: 1,
        edge_exit: 3,
        certs_dir: certs.path().to_path_buf(),
        policy: Policy::default(),
        encoding: Encoding::F32,
        engine: EngineConfig::default(),
    })
    .await
    .expect("cluster starts");
    let opts = ApiOptions {
        api_key: Some(KEY.into()),
        ..ApiOptions::default()
    };
    let (addr, _server, ready) =
        flow_node::http::serve_loading("127.0.0.1:0".parse().unwrap(), &opts)
            .await
            .expect("bind");
    let addr = addr.to_string();
    let loading = request(&addr, "GET", "/aiflow/status", true, "").await;
    assert_eq!(loading.status, 503, "{}", loading.body);
    assert_eq!(loading.json()["error"]["type"], "service_unavailable");
    // what load balancers and Kubernetes probe: 503 until the model is loaded, then 200
    let health = request(&addr, "GET", "/health", false, "").await;
    assert_eq!(health.status, 503, "{}", health.body);
    ready.set(cluster.device.clone());
    let health = request(&addr, "GET", "/health", false, "").await;
    assert_eq!(health.status, 200, "{}", health.body);

    // The page and its assets are open; the page names its script and style.
    let page = request(&addr, "GET", "/", false, "").await;
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap_or("")
        .starts_with("text/html"));
    assert!(page.header("content-security-policy").is_some());
    assert!(page.body.contains("/dashboard/app.js"));
    for (path, kind) in [
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/style.css", "text/css"),
    ] {
        let r = request(&addr, "GET", path, false, "").await;
        assert_eq!(r.status, 200, "{path}");
        assert!(r.header("content-type").unwrap_or("").starts_with(kind));
    }

    // The data needs the key, in OpenAI's error shape.
    let refused = request(&addr, "GET", "/aiflow/status", false, "").await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.json()["error"]["code"], "invalid_api_key");

    // The edge reports its link to the cloud (protocol 3) within a probe round or two.
    let mut s = request(&addr, "GET", "/aiflow/status", true, "").await;
    for _ in 0..100 {
        if s.status == 200 && s.json()["nodes"][2]["seen"] == "reported" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        s = request(&addr, "GET", "/aiflow/status", true, "").await;
    }
    assert_eq!(s.status, 200, "{}", s.body);
    assert!(s.header("content-type").unwrap_or("").contains("json"));
    let v = s.json();
    for f in [
        "model.name",
        "model.layers",
        "model.exits",
        "nodes.0.id",
        "nodes.0.health",
        "nodes.0.layers",
        "nodes.0.exits",
        "nodes.0.active",
        "links.0.from",
        "links.0.to",
        "links.0.addr",
        "links.0.health",
        "links.0.rtt_ms",
        "links.0.goodput_bps",
        "links.0.confidence",
        "links.0.probes",
        "links.0.quic.rtt_ms",
        "links.0.quic.bytes_sent",
        "links.0.quic.bytes_received",
        "tokens",
        "counters.tokens",
        "counters.escalations",
        "counters.degraded",
        "counters.requests",
        "counters.request_errors",
        "requests.running",
        "requests.waiting",
        "engine.sessions",
        "engine.kv_bytes",
        "engine.kv_budget_bytes",
    ] {
        assert!(!field(&v, f).is_null(), "{f} missing from {v}");
    }
    let tiers: Vec<(&str, &str, Vec<u64>)> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let exits = n["exits"].as_array().unwrap();
            (
                n["role"].as_str().unwrap(),
                n["seen"].as_str().unwrap(),
                exits.iter().filter_map(Value::as_u64).collect(),
            )
        })
        .collect();
    assert_eq!(
        tiers,
        [
            ("device", "self", vec![1]),
            ("edge", "hello", vec![3]),
            ("cloud", "reported", vec![5])
        ]
    );
    assert_eq!(v["nodes"][2]["health"], "up", "{v}");
    assert_eq!(v["nodes"][2]["layers"], serde_json::json!([3, 5]), "{v}");
    assert_eq!(v["links"][0]["to"], "edge");
    assert_eq!(v["links"][0]["health"], "up");
    assert_eq!(v["links"][0]["reported"], false);
    // the edge's own link, as the edge sees it: its peer, health, estimates, QUIC counters
    let beyond = &v["links"][1];
    assert_eq!(
        (
            &beyond["from"],
            &beyond["to"],
            &beyond["reported"],
            &beyond["health"]
        ),
        (&"edge".into(), &"cloud".into(), &true.into(), &"up".into()),
        "{v}"
    );
    assert!(beyond["rtt_ms"].as_f64().is_some_and(|r| r > 0.0), "{v}");
    assert!(
        beyond["quic"]["bytes_sent"].as_u64().is_some_and(|b| b > 0),
        "{v}"
    );

    // A request moves the counters the page shows.
    let chat = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#;
    let r = request(&addr, "POST", "/v1/chat/completions", true, chat).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let after = request(&addr, "GET", "/aiflow/status", true, "")
        .await
        .json();
    let produced = r.json()["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(produced > 0);
    assert_eq!(after["counters"]["tokens"].as_u64(), Some(produced));
    let per_tier: u64 = after["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            assert!(t["tier"].is_string() && t["exit"].is_u64(), "{t}");
            t["count"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(per_tier, produced);
    assert_eq!(after["counters"]["requests"].as_u64(), Some(1));

    // Every path the page names exists (GET on a POST route is 405, never 404).
    let paths = page_paths();
    for p in [
        "/aiflow/status",
        "/v1/chat/completions",
        "/dashboard/app.js",
        "/dashboard/style.css",
    ] {
        assert!(
            paths.iter().any(|q| q == p),
            "the page names {p}: {paths:?}"
        );
    }
    for p in &paths {
        let r = request(&addr, "GET", p, true, "").await;
        assert_ne!(
            r.status, 404,
            "the page names {p}, which the server does not serve"
        );
    }
    // Every series the node exports is in the metrics list users read (docs/api.md).
    let metrics = request(&addr, "GET", "/metrics", false, "").await;
    assert_eq!(metrics.status, 200);
    let documented = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api.md"),
    )
    .expect("docs/api.md");
    let undocumented: Vec<&str> = metrics
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| !documented.contains(&format!("`{name}")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "series missing from docs/api.md's metrics list: {undocumented:?}"
    );
    // Nothing from elsewhere: the page works without internet.
    for (name, text) in [
        ("index.html", INDEX_HTML),
        ("app.js", APP_JS),
        ("style.css", STYLE_CSS),
    ] {
        assert!(
            !text.contains("http://") && !text.contains("https://") && !text.contains("//cdn"),
            "{name} loads something from elsewhere"
        );
    }
    // A node shutting down (SIGTERM) says so on /health, so probes move traffic away.
    assert!(!cluster.device.is_draining());
    cluster.device.drain(Duration::from_millis(1)).await;
    let health = request(&addr, "GET", "/health", false, "").await;
    assert_eq!(health.status, 503, "{}", health.body);
    assert!(health.body.contains("draining"), "{}", health.body);
    cluster.shutdown().await;
}
