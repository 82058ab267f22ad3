//! The real relay on 127.0.0.1: configured delay, rate and loss are met (generous
//! tolerances here; precise numbers come from `examples/shaper_accuracy.rs`).

use std::time::Duration;

use flow_testbed::shaper::bench::{measure_delay, measure_loss, measure_rate};
use flow_testbed::shaper::{LinkParams, ShaperConfig, ShaperHandle};
use tokio::net::UdpSocket;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_is_met() {
    let m = measure_delay(Duration::from_millis(40), 40, Duration::from_millis(10))
        .await
        .unwrap();
    assert_eq!(m.samples, 40);
    // the relay may send up to `timer_slack` (0.5 ms) early to centre the 1 ms timer error
    assert!(m.min_ms >= 39.4, "a packet left too early: {m:?}");
    assert!(m.mean_error().abs() < 0.15, "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_is_met() {
    let m = measure_rate(8_000_000, 1000, Duration::from_millis(600))
        .await
        .unwrap();
    assert_eq!(m.received, m.sent, "{m:?}");
    assert_eq!(m.stats.up.dropped(), 0, "{m:?}");
    // the bar: configured rate met within 5 %
    assert!(m.error().abs() < 0.05, "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_is_met_and_counted() {
    let m = measure_loss(0.2, 1000, 11).await.unwrap();
    // seed 11 draws 0.209; the binomial sd of 1000 draws at p = 0.2 is 0.013, so allow 0.02
    // (the shaper's own count must match the receiver's exactly)
    assert!((m.measured - 0.2).abs() < 0.02, "{m:?}");
    assert_eq!(m.stats.up.dropped_loss, m.sent - m.received, "{m:?}");
    assert_eq!(m.stats.up.packets_in, m.sent);
}

/// Replies come back to the right client through per-client sockets; the table is bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_replies_per_client_with_a_bounded_table() {
    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server_addr = server.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = server.recv_from(&mut buf).await {
            let _ = server.send_to(&buf[..n], from).await; // echo
        }
    });
    let mut cfg = ShaperConfig::loopback(server_addr);
    cfg.up = LinkParams::with_delay(Duration::from_millis(5));
    cfg.down = LinkParams::with_delay(Duration::from_millis(5));
    cfg.max_clients = 2;
    let shaper = ShaperHandle::spawn(cfg).await.unwrap();
    let mut clients = Vec::new();
    for i in 0..3u8 {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.send_to(&[i; 10], shaper.local_addr()).await.unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = tokio::time::timeout(Duration::from_secs(2), c.recv_from(&mut buf))
            .await
            .expect("echo through the shaper")
            .unwrap();
        assert_eq!((n, buf[0], from), (10, i, shaper.local_addr()));
        clients.push(c);
    }
    let s = shaper.stats();
    assert_eq!(s.clients_evicted, 1);
    assert_eq!((s.up.packets_out, s.down.packets_out), (3, 3));
    assert_eq!((s.up.bytes_in, s.down.bytes_out), (30, 30));
}

/// A live change (`ShaperHandle::apply`) takes effect for later packets, per direction, and
/// an invalid change is refused without touching the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_change_applies_to_later_packets() {
    use flow_testbed::shaper::{Direction, LinkChange};
    let sink = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = ShaperConfig::loopback(sink.local_addr().unwrap());
    cfg.up = LinkParams::with_delay(Duration::from_millis(5));
    let shaper = ShaperHandle::spawn(cfg).await.unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let one_way = || async {
        let mut buf = [0u8; 64];
        let t = tokio::time::Instant::now();
        client.send_to(&[1; 10], shaper.local_addr()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(2), sink.recv_from(&mut buf))
            .await
            .expect("packet through the shaper")
            .unwrap();
        t.elapsed()
    };
    let before = one_way().await;
    assert!(before < Duration::from_millis(40), "{before:?}");
    let change = LinkChange {
        delay_ms: Some(80.0),
        ..Default::default()
    };
    let applied = shaper.apply(Direction::Up, change).await.unwrap();
    assert_eq!(applied.len(), 1);
    assert_eq!(applied[0].0, Direction::Up);
    assert_eq!(applied[0].1.delay, Duration::from_millis(80));
    let after = one_way().await;
    assert!(after >= Duration::from_millis(79), "{after:?}");
    let bad = LinkChange {
        loss: Some(1.5),
        ..Default::default()
    };
    let err = shaper.apply(Direction::Both, bad).await.unwrap_err();
    assert!(err.to_string().contains("loss"), "{err}");
    let again = one_way().await;
    assert!(
        again >= Duration::from_millis(79),
        "refused change kept 80 ms: {again:?}"
    );
    // loss 1.0 cuts the link (a shaper-level partition) and counts the drops
    let cut = LinkChange {
        loss: Some(1.0),
        ..Default::default()
    };
    shaper.apply(Direction::Both, cut).await.unwrap();
    client.send_to(&[2; 10], shaper.local_addr()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(shaper.stats().up.dropped_loss, 1);
}
