//! The tokio UDP relay that drives two [`ScheduledLink`]s (one per direction).
//!
//! ```text
//! client ──▶ listen socket ──▶ [up link] ──▶ per-client socket ──▶ upstream
//! client ◀── listen socket ◀── [down link] ◀── per-client socket ◀── upstream
//! ```
//!
//! Each client address gets its own upstream socket so replies find their way back; the
//! table is bounded (`max_clients`, idle clients evicted first, then the least recently
//! seen). Each direction has one scheduler task that owns its link model: packets are
//! stamped on arrival, their departure is *computed* by the model, and the scheduler sleeps
//! until the earliest departure and then sends every packet that is due (tokio timers have
//! 1 ms granularity, so a burst due in the same millisecond goes out together and the
//! long-run rate is exact). The channel into a scheduler is bounded; a full channel drops
//! the packet and counts it in `dropped_overflow`.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::model::{LinkModel, LinkParams, Verdict};
use super::schedule::{Direction, LinkChange, LinkSchedule, ScheduledLink};
use crate::error::{Error, Result};

/// Largest UDP payload we relay.
const MAX_DATAGRAM: usize = 65_535;

/// Configuration of one shaper (one emulated link between a client side and an upstream).
#[derive(Debug, Clone)]
pub struct ShaperConfig {
    /// Address to listen on (clients send here). Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Where packets are forwarded.
    pub upstream: SocketAddr,
    /// Client → upstream link.
    pub up: LinkParams,
    /// Upstream → client link.
    pub down: LinkParams,
    /// Changes over time (applied on top of `up` / `down`).
    pub schedule: LinkSchedule,
    /// Seed of the loss and jitter draws (the down direction uses `seed + 1`).
    pub seed: u64,
    /// Most clients tracked at once.
    pub max_clients: usize,
    /// A client silent for this long may be evicted when the table is full.
    pub client_idle: Duration,
    /// Packets buffered between the sockets and each scheduler.
    pub channel_capacity: usize,
    /// How early a packet may leave to compensate tokio's 1 ms timer granularity (a timer
    /// fires up to ~1 ms after its deadline). 0 = never early, mean delay ~+0.7 ms;
    /// the default 0.5 ms centres the error: mean ~+0.2 ms, at most 0.5 ms early.
    pub timer_slack: Duration,
}

impl ShaperConfig {
    /// A transparent relay on `127.0.0.1:0` to `upstream`; set the link fields as needed.
    pub fn loopback(upstream: SocketAddr) -> Self {
        Self {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            upstream,
            up: LinkParams::default(),
            down: LinkParams::default(),
            schedule: LinkSchedule::default(),
            seed: 0,
            max_clients: 1024,
            client_idle: Duration::from_secs(60),
            channel_capacity: 8192,
            timer_slack: Duration::from_micros(500),
        }
    }
}

#[derive(Debug, Default)]
struct DirCounters {
    packets_in: AtomicU64,
    bytes_in: AtomicU64,
    packets_out: AtomicU64,
    bytes_out: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_queue: AtomicU64,
    dropped_overflow: AtomicU64,
    dropped_send: AtomicU64,
    bytes_dropped: AtomicU64,
}

fn bump(c: &AtomicU64, v: u64) {
    c.fetch_add(v, AtomicOrdering::Relaxed);
}

impl DirCounters {
    fn snapshot(&self) -> DirectionStats {
        let g = |c: &AtomicU64| c.load(AtomicOrdering::Relaxed);
        DirectionStats {
            packets_in: g(&self.packets_in),
            bytes_in: g(&self.bytes_in),
            packets_out: g(&self.packets_out),
            bytes_out: g(&self.bytes_out),
            dropped_loss: g(&self.dropped_loss),
            dropped_queue: g(&self.dropped_queue),
            dropped_overflow: g(&self.dropped_overflow),
            dropped_send: g(&self.dropped_send),
            bytes_dropped: g(&self.bytes_dropped),
        }
    }

    fn dropped(&self, bytes: usize, reason: &AtomicU64) {
        bump(reason, 1);
        bump(&self.bytes_dropped, bytes as u64);
    }
}

/// Counters of one direction. `packets_in = packets_out + dropped_* + in flight`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionStats {
    /// Packets received from the sending side.
    pub packets_in: u64,
    /// Bytes (UDP payload) received from the sending side.
    pub bytes_in: u64,
    /// Packets sent to the receiving side.
    pub packets_out: u64,
    /// Bytes sent to the receiving side.
    pub bytes_out: u64,
    /// Packets dropped by random loss.
    pub dropped_loss: u64,
    /// Packets tail-dropped because the link queue was full.
    pub dropped_queue: u64,
    /// Packets dropped because the relay's internal channel was full.
    pub dropped_overflow: u64,
    /// Packets whose final send failed.
    pub dropped_send: u64,
    /// Bytes of all dropped packets.
    pub bytes_dropped: u64,
}

impl DirectionStats {
    /// All drops together.
    pub fn dropped(&self) -> u64 {
        self.dropped_loss + self.dropped_queue + self.dropped_overflow + self.dropped_send
    }
}

/// Counters of a shaper.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShaperStats {
    /// Client → upstream.
    pub up: DirectionStats,
    /// Upstream → client.
    pub down: DirectionStats,
    /// Clients evicted from the bounded table.
    pub clients_evicted: u64,
}

#[derive(Debug, Default)]
struct Counters {
    up: DirCounters,
    down: DirCounters,
    clients_evicted: AtomicU64,
}

struct Packet {
    data: Vec<u8>,
    arrived: Instant,
    out: Arc<UdpSocket>,
    dest: SocketAddr,
}

struct Due {
    at: Instant,
    seq: u64,
    packet: Packet,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    // reversed: BinaryHeap is a max-heap, we want the earliest departure on top
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// A live parameter change sent to one direction's scheduler, with the reply channel.
type Control = (LinkChange, oneshot::Sender<Result<LinkParams>>);

/// Live changes queued per direction; a full queue makes [`ShaperHandle::apply`] wait.
const CONTROL_CAPACITY: usize = 16;

/// A running shaper. Dropping the handle stops it.
#[derive(Debug)]
pub struct ShaperHandle {
    local_addr: SocketAddr,
    counters: Arc<Counters>,
    tasks: Vec<JoinHandle<()>>,
    up_ctl: mpsc::Sender<Control>,
    down_ctl: mpsc::Sender<Control>,
}

impl ShaperHandle {
    /// Bind the listen socket and start relaying. Returns once the socket is bound; the
    /// address clients should use is [`ShaperHandle::local_addr`].
    pub async fn spawn(config: ShaperConfig) -> Result<Self> {
        if config.max_clients == 0 || config.channel_capacity == 0 {
            return Err(Error::config(
                "max_clients/channel_capacity",
                "must be at least 1",
            ));
        }
        let up = ScheduledLink::new(
            LinkModel::new(config.up.clone(), config.seed)?,
            &config.schedule,
            Direction::Up,
        );
        let down = ScheduledLink::new(
            LinkModel::new(config.down.clone(), config.seed.wrapping_add(1))?,
            &config.schedule,
            Direction::Down,
        );
        let listen = UdpSocket::bind(config.listen)
            .await
            .map_err(|e| Error::socket(format!("binding {}", config.listen), e))?;
        let local_addr = listen
            .local_addr()
            .map_err(|e| Error::socket("reading the listen address", e))?;
        let listen = Arc::new(listen);
        let counters = Arc::new(Counters::default());
        let start = Instant::now();
        let (up_tx, up_rx) = mpsc::channel(config.channel_capacity);
        let (down_tx, down_rx) = mpsc::channel(config.channel_capacity);
        let (up_ctl, up_ctl_rx) = mpsc::channel(CONTROL_CAPACITY);
        let (down_ctl, down_ctl_rx) = mpsc::channel(CONTROL_CAPACITY);
        let tasks = vec![
            tokio::spawn(scheduler(
                up_rx,
                up_ctl_rx,
                up,
                start,
                config.timer_slack,
                counters.clone(),
                Direction::Up,
            )),
            tokio::spawn(scheduler(
                down_rx,
                down_ctl_rx,
                down,
                start,
                config.timer_slack,
                counters.clone(),
                Direction::Down,
            )),
            tokio::spawn(ingress(listen, config, counters.clone(), up_tx, down_tx)),
        ];
        tracing::info!(%local_addr, "link shaper started");
        Ok(Self {
            local_addr,
            counters,
            tasks,
            up_ctl,
            down_ctl,
        })
    }

    /// Change the link's parameters now, in `direction` (`Up`, `Down` or `Both`), on top of
    /// the current ones (schedule steps still due later apply on top of this). Packets
    /// already scheduled keep their departure times. Returns the new parameters per
    /// direction (up first); an invalid change is refused and changes nothing in that
    /// direction.
    pub async fn apply(
        &self,
        direction: Direction,
        change: LinkChange,
    ) -> Result<Vec<(Direction, LinkParams)>> {
        let mut out = Vec::new();
        for (d, ctl) in [
            (Direction::Up, &self.up_ctl),
            (Direction::Down, &self.down_ctl),
        ] {
            if !direction.applies_to(d) {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            let stopped = || Error::config("shaper", "the relay has stopped");
            ctl.send((change.clone(), tx))
                .await
                .map_err(|_| stopped())?;
            out.push((d, rx.await.map_err(|_| stopped())??));
        }
        Ok(out)
    }

    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ShaperStats {
        ShaperStats {
            up: self.counters.up.snapshot(),
            down: self.counters.down.snapshot(),
            clients_evicted: self.counters.clients_evicted.load(AtomicOrdering::Relaxed),
        }
    }

    /// Stop relaying (packets still in the link are dropped).
    pub fn shutdown(self) {}
}

impl Drop for ShaperHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn scheduler(
    mut rx: mpsc::Receiver<Packet>,
    mut ctl: mpsc::Receiver<Control>,
    mut link: ScheduledLink,
    start: Instant,
    slack: Duration,
    counters: Arc<Counters>,
    dir: Direction,
) {
    let c = match dir {
        Direction::Down => &counters.down,
        _ => &counters.up,
    };
    let mut heap: BinaryHeap<Due> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut last_arrival = Duration::ZERO;
    let mut open = true;
    loop {
        // send everything that is due: one timer wake-up serves the whole millisecond
        let now = Instant::now() + slack;
        while heap.peek().is_some_and(|d| d.at <= now) {
            if let Some(due) = heap.pop() {
                let p = due.packet;
                match p.out.send_to(&p.data, p.dest).await {
                    Ok(_) => {
                        bump(&c.packets_out, 1);
                        bump(&c.bytes_out, p.data.len() as u64);
                    }
                    Err(e) => {
                        tracing::debug!(dest = %p.dest, "shaper send failed: {e}");
                        c.dropped(p.data.len(), &c.dropped_send);
                    }
                }
            }
        }
        if !open && heap.is_empty() {
            return;
        }
        let next = heap.peek().map(|d| d.at.checked_sub(slack).unwrap_or(d.at));
        tokio::select! {
            msg = rx.recv(), if open => match msg {
                Some(p) => {
                    // arrivals from several reader tasks may interleave slightly out of order
                    let t = p.arrived.saturating_duration_since(start).max(last_arrival);
                    last_arrival = t;
                    match link.on_packet(t, p.data.len()) {
                        Verdict::Deliver(at) => {
                            seq += 1;
                            heap.push(Due { at: start + at, seq, packet: p });
                        }
                        Verdict::Drop(super::model::DropReason::Loss) => c.dropped(p.data.len(), &c.dropped_loss),
                        Verdict::Drop(super::model::DropReason::QueueFull) => {
                            c.dropped(p.data.len(), &c.dropped_queue)
                        }
                    }
                }
                None => open = false,
            },
            Some((change, reply)) = ctl.recv() => {
                let t = Instant::now().saturating_duration_since(start).max(last_arrival);
                link.advance(t);
                let res = change.apply(link.model().params()).and_then(|p| {
                    link.set_params(p.clone())?;
                    Ok(p)
                });
                match &res {
                    Ok(p) => tracing::info!(?dir, ?p, "link changed live"),
                    Err(e) => tracing::warn!(?dir, "live link change refused: {e}"),
                }
                let _ = reply.send(res); // the caller may have given up waiting
            }
            _ = sleep_until_opt(next) => {}
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

struct Client {
    socket: Arc<UdpSocket>,
    last_seen: Instant,
    reader: JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn ingress(
    listen: Arc<UdpSocket>,
    config: ShaperConfig,
    counters: Arc<Counters>,
    up_tx: mpsc::Sender<Packet>,
    down_tx: mpsc::Sender<Packet>,
) {
    let mut clients: HashMap<SocketAddr, Client> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let bind_ip: IpAddr = match config.upstream {
        a if a.ip().is_loopback() && a.is_ipv4() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        a if a.ip().is_loopback() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        a if a.is_ipv4() => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        _ => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    loop {
        let (n, from) = match listen.recv_from(&mut buf).await {
            Ok(v) => v,
            Err(e) => {
                // ICMP errors surface here on some platforms; the socket stays usable
                tracing::debug!("shaper recv failed: {e}");
                continue;
            }
        };
        let now = Instant::now();
        bump(&counters.up.packets_in, 1);
        bump(&counters.up.bytes_in, n as u64);
        if !clients.contains_key(&from) {
            if clients.len() >= config.max_clients {
                evict(&mut clients, now, config.client_idle, &counters);
            }
            let socket = match UdpSocket::bind(SocketAddr::new(bind_ip, 0)).await {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    tracing::warn!(client = %from, "shaper cannot open an upstream socket: {e}");
                    counters.up.dropped(n, &counters.up.dropped_send);
                    continue;
                }
            };
            let reader = tokio::spawn(read_replies(
                socket.clone(),
                config.upstream,
                from,
                listen.clone(),
                counters.clone(),
                down_tx.clone(),
            ));
            clients.insert(
                from,
                Client {
                    socket,
                    last_seen: now,
                    reader,
                },
            );
        }
        let Some(client) = clients.get_mut(&from) else {
            continue;
        };
        client.last_seen = now;
        let packet = Packet {
            data: buf[..n].to_vec(),
            arrived: now,
            out: client.socket.clone(),
            dest: config.upstream,
        };
        if up_tx.try_send(packet).is_err() {
            counters.up.dropped(n, &counters.up.dropped_overflow);
        }
    }
}

/// Make room for one client: idle ones first, else the least recently seen.
fn evict(
    clients: &mut HashMap<SocketAddr, Client>,
    now: Instant,
    idle: Duration,
    counters: &Counters,
) {
    let before = clients.len();
    clients.retain(|_, c| now.saturating_duration_since(c.last_seen) < idle);
    if clients.len() == before {
        if let Some(oldest) = clients
            .iter()
            .min_by_key(|(_, c)| c.last_seen)
            .map(|(a, _)| *a)
        {
            clients.remove(&oldest);
        }
    }
    bump(&counters.clients_evicted, (before - clients.len()) as u64);
}

async fn read_replies(
    socket: Arc<UdpSocket>,
    upstream: SocketAddr,
    client: SocketAddr,
    listen: Arc<UdpSocket>,
    counters: Arc<Counters>,
    down_tx: mpsc::Sender<Packet>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(%client, "shaper upstream recv failed: {e}");
                continue;
            }
        };
        if from != upstream {
            continue; // only the upstream may answer through this socket
        }
        bump(&counters.down.packets_in, 1);
        bump(&counters.down.bytes_in, n as u64);
        let packet = Packet {
            data: buf[..n].to_vec(),
            arrived: Instant::now(),
            out: listen.clone(),
            dest: client,
        };
        if down_tx.try_send(packet).is_err() {
            counters.down.dropped(n, &counters.down.dropped_overflow);
        }
    }
}
