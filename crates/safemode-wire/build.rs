//! Compiles `proto/safemode/v1/*.proto` (at the top of the repository) with
//! `protox`, a pure-Rust protobuf compiler, so building safemode never needs a
//! `protoc` on the machine. The encoded descriptor set is kept for the gRPC
//! reflection service.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?)
        .join("../../proto")
        .canonicalize()?;
    let protos = [
        "safemode/v1/policy.proto",
        "safemode/v1/control.proto",
        "safemode/v1/subscription.proto",
    ]
    .map(|p| root.join(p));
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    let descriptors = protox::compile(&protos, [&root])?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("safemode_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    // Maps as BTreeMaps: encoded in key order, so a snapshot encodes to the
    // same bytes every time, and the bytes a client re-encodes are the ones
    // the controller signed (a HashMap's order changes per instance).
    tonic_prost_build::configure()
        .btree_map(".")
        .compile_fds(descriptors)?;
    Ok(())
}
