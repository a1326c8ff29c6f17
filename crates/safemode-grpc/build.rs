//! Generates the subscription service's server once more, sending `Outbound`
//! (a response encoded once per revision and channel, then shared by every
//! subscriber of the channel) instead of `SubscribeResponse`, with
//! `FanoutCodec` (small per-stream buffers); every other type is
//! safemode-wire's. `protox` compiles the proto, so no `protoc` is
//! needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?)
        .join("../../proto")
        .canonicalize()?;
    let protos =
        ["safemode/v1/policy.proto", "safemode/v1/subscription.proto"].map(|p| root.join(p));
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    let mut subscription = protox::compile(&protos, [&root])?;
    subscription
        .file
        .retain(|f| f.name() == "safemode/v1/subscription.proto");

    let fanout = PathBuf::from(std::env::var("OUT_DIR")?).join("fanout");
    std::fs::create_dir_all(&fanout)?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .out_dir(&fanout)
        .extern_path(".safemode.v1", "::safemode_wire::proto")
        .extern_path(
            ".safemode.v1.SubscribeResponse",
            "crate::outbound::Outbound",
        )
        // Small per-stream buffers: a stream sends a snapshot of a few
        // hundred bytes now and then and receives acks.
        .codec_path("crate::outbound::FanoutCodec")
        .compile_fds(subscription)?;
    Ok(())
}
