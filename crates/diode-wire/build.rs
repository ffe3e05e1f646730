//! Compiles `proto/diode.proto`, the one source of truth for frames, with protox so that a build
//! needs no `protoc` binary on the machine.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let proto = proto_dir.join("diode.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let descriptors = protox::compile([&proto], [&proto_dir])?;
    let mut config = prost_build::Config::new();
    // Payloads become `Bytes` slices of the decoded block: no copy per record.
    config.bytes(["."]);
    config.compile_fds(descriptors)?;
    Ok(())
}
