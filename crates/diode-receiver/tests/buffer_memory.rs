//! Opening a disk buffer with a large backlog, measured in this process's peak resident memory
//! (its own test binary, so nothing runs beside it). Opening once read the whole backlog into
//! memory to count it: a 900 MB backlog peaked at 930 MB, so with the plant example's 8 GiB
//! buffers and `MemoryMax=512M` a restart after an IT outage looped on out-of-memory.

use std::sync::Arc;

use bytes::Bytes;
use diode_receiver::buffer::{DiskBuffer, FullPolicy};
use diode_wire::Record;

fn peak_resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[test]
fn a_large_backlog_opens_in_bounded_memory_and_is_counted_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let topic: Arc<str> = Arc::from("historian/events");
    let payload = Bytes::from(vec![7u8; 4000]);
    let batch = 250;
    let batches = 400; // 400 MB in 64 MiB segments
    {
        let mut buffer = DiskBuffer::open(dir.path(), 1 << 30, FullPolicy::DropOldest).unwrap();
        for b in 0..batches {
            let records: Vec<Record> = (0..batch)
                .map(|i| Record {
                    session_id: 1,
                    topic: topic.clone(),
                    seq: (b * batch + i) as u64,
                    time_us: 1,
                    origin: None,
                    late: false,
                    payload: payload.clone(),
                })
                .collect();
            buffer.append(&records).unwrap();
        }
        // Deliver a few, so the first segment is opened part way through.
        let (records, next) = buffer.peek(100, u64::MAX).unwrap().unwrap();
        buffer.commit(records.len(), next).unwrap();
    }
    let total = (batch * batches - 100) as u64;
    let before = peak_resident_bytes();
    let mut buffer = DiskBuffer::open(dir.path(), 1 << 30, FullPolicy::DropOldest).unwrap();
    let grown = peak_resident_bytes().saturating_sub(before);
    assert_eq!(buffer.unread_records(), total);
    assert!(
        grown < 32 << 20,
        "opening a 400 MB backlog took {} MiB",
        grown >> 20
    );
    let (first, _) = buffer.peek(1, u64::MAX).unwrap().unwrap();
    assert_eq!(first[0].seq, 100);
    drop(buffer);

    // A count file lost in a crash: that segment's headers are walked instead.
    let count = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.path().extension().is_some_and(|x| x == "count"))
        .expect("full segments have count files")
        .path();
    std::fs::remove_file(count).unwrap();
    let buffer = DiskBuffer::open(dir.path(), 1 << 30, FullPolicy::DropOldest).unwrap();
    assert_eq!(buffer.unread_records(), total);
}
