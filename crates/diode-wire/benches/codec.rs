//! Micro-benchmarks of the protocol's hot paths: Reed-Solomon coding, the encoder and the
//! reassembler. `cargo bench -p diode-wire` (add `--no-default-features` for the portable FEC).

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use diode_wire::fec::{self, CodecCache};
use diode_wire::{Encoder, EncoderConfig, Reassembler, ReassemblerConfig};

const SHARD: usize = 1442;

fn encoder(now: Instant) -> Encoder {
    Encoder::new(
        EncoderConfig {
            heartbeat_interval: Duration::from_secs(3600),
            session_start_time_us: 0,
            ..Default::default()
        },
        now,
    )
    .unwrap()
}

fn fec_coding(c: &mut Criterion) {
    let mut group = c.benchmark_group("fec 32+8 x 1442 B");
    group.throughput(Throughput::Bytes((32 * SHARD) as u64));
    let mut cache = CodecCache::default();
    let codec = cache.get(32, 8);
    let stride = SHARD + 30;
    let mut buf = vec![7u8; 40 * stride];
    group.bench_function("encode", |b| {
        b.iter(|| fec::encode_strided(&codec, &mut buf, 32, stride, 26, SHARD))
    });
    let data: Vec<u8> = (0..32 * SHARD).map(|i| i as u8).collect();
    let mut parity = vec![0u8; 8 * SHARD];
    group.bench_function("rebuild 8 lost data shards", |b| {
        let mut present = vec![true; 40];
        for p in present.iter_mut().take(8) {
            *p = false;
        }
        b.iter_batched(
            || data.clone(),
            |mut d| fec::reconstruct(&codec, &mut d, &mut parity, SHARD, &present).unwrap(),
            BatchSize::LargeInput,
        )
    });
    group.finish();

    // The same work through reed-solomon-simd (GF(2^16), SIMD chosen at run time), for #17.
    let mut group = c.benchmark_group("fec 32+8 x 1442 B, reed-solomon-simd");
    group.throughput(Throughput::Bytes((32 * SHARD) as u64));
    let shards: Vec<Vec<u8>> = data.chunks(SHARD).map(<[u8]>::to_vec).collect();
    let mut encoder = reed_solomon_simd::ReedSolomonEncoder::new(32, 8, SHARD).unwrap();
    group.bench_function("encode", |b| {
        b.iter(|| {
            for shard in &shards {
                encoder.add_original_shard(shard).unwrap();
            }
            let result = encoder.encode().unwrap();
            result.recovery_iter().map(|r| r[0] as usize).sum::<usize>()
        })
    });
    let recovery: Vec<Vec<u8>> = {
        for shard in &shards {
            encoder.add_original_shard(shard).unwrap();
        }
        let result = encoder.encode().unwrap();
        result.recovery_iter().map(<[u8]>::to_vec).collect()
    };
    let mut decoder = reed_solomon_simd::ReedSolomonDecoder::new(32, 8, SHARD).unwrap();
    group.bench_function("rebuild 8 lost data shards", |b| {
        b.iter(|| {
            for (i, shard) in shards.iter().enumerate().skip(8) {
                decoder.add_original_shard(i, shard).unwrap();
            }
            for (i, shard) in recovery.iter().enumerate() {
                decoder.add_recovery_shard(i, shard).unwrap();
            }
            let result = decoder.decode().unwrap();
            result
                .restored_original_iter()
                .map(|(_, r)| r[0] as usize)
                .sum::<usize>()
        })
    });
    group.finish();
}

fn encoder_push(c: &mut Criterion) {
    let now = Instant::now();
    let mut group = c.benchmark_group("encoder");
    for (name, size, count) in [
        ("100 B records", 100usize, 4096usize),
        ("64 KiB records", 65_536, 64),
    ] {
        let record = Bytes::from(vec![1u8; size]);
        group.throughput(Throughput::Bytes((size * count) as u64));
        group.bench_function(name, |b| {
            let mut enc = encoder(now);
            let topic = enc.add_topic("line3/telemetry").unwrap();
            b.iter(|| {
                for _ in 0..count {
                    enc.push(now, topic, 1_700_000_000_000_000, record.clone())
                        .unwrap();
                }
                enc.flush(now);
                while enc.poll_transmit(now).is_some() {}
            })
        });
    }
    group.finish();
}

fn reassembler(c: &mut Criterion) {
    let now = Instant::now();
    let mut group = c.benchmark_group("reassembler");
    // 4 MiB of 64 KiB records as datagrams, then the same with one datagram in ten lost.
    let mut enc = encoder(now);
    let topic = enc.add_topic("bulk").unwrap();
    let record = Bytes::from(vec![3u8; 65_536]);
    for _ in 0..64 {
        enc.push(now, topic, 0, record.clone()).unwrap();
    }
    enc.flush(now);
    let mut datagrams = Vec::new();
    while let Some(d) = enc.poll_transmit(now) {
        datagrams.push(d);
    }
    group.throughput(Throughput::Bytes(64 * 65_536));
    for (name, keep) in [("no loss", 0usize), ("1 in 10 lost", 10)] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || Reassembler::new(ReassemblerConfig::default()),
                |mut rx| {
                    for (i, d) in datagrams.iter().enumerate() {
                        if keep == 0 || i % keep != 0 {
                            let _ = rx.handle_datagram(now, d);
                        }
                        while rx.poll_event().is_some() {}
                    }
                    rx
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

/// What authenticating one full datagram costs with each MAC a security reviewer would take
/// (issue #17): the HMAC-SHA256 the link uses today (wire-format.md §2.1), and the per-datagram
/// MACs of ring's AEADs over an empty plaintext (GMAC from AES-256-GCM, Poly1305 from
/// ChaCha20-Poly1305; both need a nonce never reused under a key), and keyed BLAKE3 (a PRF like
/// HMAC: no nonce). Sign only: verifying is the same computation and a constant-time compare.
fn datagram_macs(c: &mut Criterion) {
    use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
    use ring::hmac;
    let datagram: Vec<u8> = (0..1472 - 17).map(|i| i as u8).collect();
    let key = [9u8; 32];
    let mut group = c.benchmark_group("datagram MAC 1455 B");
    group.throughput(Throughput::Bytes(datagram.len() as u64));
    let hmac_key = hmac::Key::new(hmac::HMAC_SHA256, &key);
    group.bench_function("HMAC-SHA256 (today)", |b| {
        b.iter(|| hmac::sign(&hmac_key, &datagram))
    });
    for (name, algorithm) in [
        ("GMAC (AES-256-GCM)", &aead::AES_256_GCM),
        ("Poly1305 (ChaCha20-Poly1305)", &aead::CHACHA20_POLY1305),
    ] {
        let sealing = LessSafeKey::new(UnboundKey::new(algorithm, &key).unwrap());
        let mut counter = 0u64;
        group.bench_function(name, |b| {
            b.iter(|| {
                counter += 1;
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&counter.to_be_bytes());
                sealing
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(&datagram[..]),
                        &mut [],
                    )
                    .unwrap()
            })
        });
    }
    group.bench_function("BLAKE3 keyed", |b| {
        b.iter(|| blake3::keyed_hash(&key, &datagram))
    });
    group.finish();
}

criterion_group!(
    benches,
    fec_coding,
    encoder_push,
    reassembler,
    datagram_macs
);
criterion_main!(benches);
