//! The encoder's pacing and send batching on a virtual clock: what leaves never exceeds the
//! rate in any 10 ms window, batches have the shape GSO needs, and what goes in comes out.

use std::time::{Duration, Instant};

use bytes::Bytes;
use diode_wire::datagram::IP_UDP_OVERHEAD;
use diode_wire::{Batch, Encoder, EncoderConfig, Event, Reassembler, ReassemblerConfig};

/// Every batch sent while `records` records of `payload_bytes` are pushed as fast as the
/// encoder takes them, with the time it left; and what a reassembler made of them.
fn run(rate_mbps: f64, max_datagrams: usize, records: usize, payload_bytes: usize) -> Run {
    let start = Instant::now();
    let mut encoder = Encoder::new(
        EncoderConfig {
            rate_mbps: Some(rate_mbps),
            ..Default::default()
        },
        start,
    )
    .unwrap();
    let topic = encoder.add_topic("plant/bulk").unwrap();
    let mut receiver = Reassembler::new(ReassemblerConfig::default());
    let mut now = start;
    let mut pushed = 0;
    let mut sent = Vec::new();
    let mut delivered = 0;
    let mut buf = Vec::new();
    while pushed < records || !encoder.is_idle() {
        // Keep a bounded backlog, as the sender's link thread does.
        while pushed < records && encoder.queued_bytes() < 1 << 20 {
            let payload = Bytes::from(vec![pushed as u8; payload_bytes]);
            encoder.push(now, topic, 0, payload).unwrap();
            pushed += 1;
        }
        if pushed == records {
            encoder.flush(now);
        }
        encoder.handle_timeout(now, 0);
        while let Some(batch) = encoder.poll_transmit_batch(now, max_datagrams, &mut buf) {
            check_shape(&batch, &buf, max_datagrams);
            let last = buf.len() - (batch.datagrams - 1) * batch.segment_size;
            for i in 0..batch.datagrams {
                let at = i * batch.segment_size;
                let len = if i + 1 == batch.datagrams {
                    last
                } else {
                    batch.segment_size
                };
                receiver.handle_datagram(now, &buf[at..at + len]).unwrap();
            }
            sent.push((now, batch));
        }
        while let Some(event) = receiver.poll_event() {
            if let Event::Record(_) = event {
                delivered += 1;
            }
        }
        let next = encoder
            .poll_timeout()
            .unwrap_or(now + Duration::from_millis(1));
        now = next.max(now + Duration::from_micros(1));
    }
    Run {
        start,
        sent,
        delivered,
    }
}

struct Run {
    start: Instant,
    sent: Vec<(Instant, Batch)>,
    delivered: usize,
}

/// Datagrams of one size back to back, the last possibly shorter, within the count asked for.
fn check_shape(batch: &Batch, buf: &[u8], max_datagrams: usize) {
    assert!((1..=max_datagrams).contains(&batch.datagrams), "{batch:?}");
    let full = (batch.datagrams - 1) * batch.segment_size;
    assert!(
        buf.len() > full && buf.len() <= full + batch.segment_size,
        "{batch:?}"
    );
    assert_eq!(
        batch.wire_bytes,
        buf.len() + batch.datagrams * IP_UDP_OVERHEAD
    );
}

/// The most wire bytes any `window` saw.
fn peak_bytes(sent: &[(Instant, Batch)], window: Duration) -> usize {
    let mut lo = 0;
    let mut in_window = 0usize;
    let mut peak = 0usize;
    for hi in 0..sent.len() {
        in_window += sent[hi].1.wire_bytes;
        while sent[hi].0 - sent[lo].0 >= window {
            in_window -= sent[lo].1.wire_bytes;
            lo += 1;
        }
        peak = peak.max(in_window);
    }
    peak
}

#[test]
fn the_rate_holds_in_every_window_and_nothing_is_lost() {
    for rate_mbps in [20.0, 200.0, 2000.0] {
        let records = 4000;
        let run = run(rate_mbps, 32, records, 1000);
        assert_eq!(run.delivered, records, "at {rate_mbps} Mb/s");
        // Any stretch of time sees at most the rate's share, the pacer's burst (a quarter of a
        // millisecond, at least two datagrams) and the one batch that may go into debt.
        let bytes_per_sec = rate_mbps * 1e6 / 8.0;
        let burst = (bytes_per_sec * 0.00025).max(2.0 * 1500.0);
        let largest_batch = run.sent.iter().map(|(_, b)| b.wire_bytes).max().unwrap();
        let allowed =
            |span: Duration| bytes_per_sec * span.as_secs_f64() + burst + largest_batch as f64;
        let wire: usize = run.sent.iter().map(|(_, b)| b.wire_bytes).sum();
        let elapsed = run.sent.last().unwrap().0 - run.start;
        assert!(
            wire as f64 <= allowed(elapsed),
            "{wire} bytes in {elapsed:?}"
        );
        // And the encoder keeps up with the rate it is given.
        let average = wire as f64 * 8.0 / 1e6 / elapsed.as_secs_f64();
        assert!(
            average >= rate_mbps * 0.95,
            "{average:.1} Mb/s on average at {rate_mbps} Mb/s"
        );
        for window_ms in [10, 100] {
            let window = Duration::from_millis(window_ms);
            let allowed = allowed(window);
            let peak = peak_bytes(&run.sent, window);
            assert!(
                peak as f64 <= allowed,
                "{peak} bytes in some {window_ms} ms at {rate_mbps} Mb/s (at most {allowed:.0})"
            );
        }
        // Over 100 ms that is within a few percent of the rate, however slow.
        let peak_100ms = peak_bytes(&run.sent, Duration::from_millis(100)) as f64;
        assert!(peak_100ms * 8.0 / 1e6 / 0.1 <= rate_mbps * 1.05);
    }
}

#[test]
fn batches_grow_with_the_rate_up_to_the_count_asked_for() {
    // 250 µs of credit: two datagrams at 20 Mb/s, a full batch at 2 Gb/s.
    let slow = run(20.0, 32, 2000, 1000);
    let fast = run(2000.0, 32, 2000, 1000);
    let largest = |run: &Run| run.sent.iter().map(|(_, b)| b.datagrams).max().unwrap();
    assert!(largest(&slow) <= 2, "{}", largest(&slow));
    assert_eq!(largest(&fast), 32);
    let capped = run(2000.0, 8, 2000, 1000);
    assert_eq!(largest(&capped), 8);
}

#[test]
fn a_batch_never_exceeds_what_one_udp_send_carries() {
    // 9000-byte jumbo frames at 10 Gb/s: the credit allows far more than 64 KiB at once.
    let now = Instant::now();
    let mut encoder = Encoder::new(
        EncoderConfig {
            mtu_bytes: 9000,
            rate_mbps: Some(10_000.0),
            ..Default::default()
        },
        now,
    )
    .unwrap();
    let topic = encoder.add_topic("plant/bulk").unwrap();
    for _ in 0..200 {
        encoder
            .push(now, topic, 0, Bytes::from(vec![7u8; 8000]))
            .unwrap();
    }
    encoder.flush(now);
    let mut buf = Vec::new();
    let mut t = now + Duration::from_millis(1);
    let mut largest = 0;
    while !encoder.is_idle() {
        encoder.handle_timeout(t, 0);
        while let Some(batch) = encoder.poll_transmit_batch(t, 32, &mut buf) {
            check_shape(&batch, &buf, 32);
            assert!(buf.len() <= 65_507, "{batch:?}");
            largest = largest.max(batch.datagrams);
        }
        t += Duration::from_millis(1);
    }
    assert!(largest >= 7, "{largest}");
}

#[test]
fn an_unpaced_encoder_sends_everything_at_once() {
    let now = Instant::now();
    let mut encoder = Encoder::new(EncoderConfig::default(), now).unwrap();
    let topic = encoder.add_topic("plant/bulk").unwrap();
    for i in 0..1000u32 {
        encoder
            .push(now, topic, 0, Bytes::from(i.to_be_bytes().repeat(250)))
            .unwrap();
    }
    encoder.flush(now);
    encoder.handle_timeout(now, 0);
    let mut buf = Vec::new();
    let mut datagrams = 0;
    while let Some(batch) = encoder.poll_transmit_batch(now, 32, &mut buf) {
        check_shape(&batch, &buf, 32);
        datagrams += batch.datagrams;
    }
    assert!(encoder.is_idle());
    // 1 MB in 1442-byte shards, 32 + 8 a block, and the first heartbeat.
    assert!(datagrams > 1000 * 1000 / 1442, "{datagrams}");
}
