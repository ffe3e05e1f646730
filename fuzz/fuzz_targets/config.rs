//! Configuration text, arbitrary: parsing into both services' configurations and locating keys
//! for error messages give an error, never a panic. (Address resolution is left out: a fuzzer
//! inventing host names would send DNS queries.)
#![no_main]

use diode_common::config::ConfigSource;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The first line, if short, doubles as a key path to locate.
    let key = text
        .lines()
        .next()
        .filter(|l| l.len() < 64)
        .unwrap_or("link.rate_mbps");
    let source = ConfigSource::from_text("fuzz.toml", text);
    let _ = source.parse::<diode_sender::config::SenderConfig>();
    let _ = source.parse::<diode_receiver::config::ReceiverConfig>();
    let _ = source.parse::<diode_sender::config::TopicConfig>();
    let _ = source.line_of(key);
    let _ = source.invalid(key, "fuzz").to_string();
});
