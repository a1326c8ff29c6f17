//! Compiles `proto/safemode/v1/*.proto` with `protox`, a pure-Rust protobuf
//! compiler, so building safemode never needs a `protoc` on the machine. The
//! encoded descriptor set is kept for the gRPC reflection service.
//!
//! It also embeds the standard modes (`runbooks/modes/*.yaml`) and runbooks
//! (`runbooks/*.yaml`) so that the binary serves them wherever it runs.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/safemode/v1/policy.proto",
        "proto/safemode/v1/control.proto",
        "proto/safemode/v1/subscription.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;

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
        .compile_fds(descriptors.clone())?;

    // The subscription service's server once more, sending `Outbound`
    // (a response encoded once per revision and channel, then shared by
    // every subscriber of the channel) instead of `SubscribeResponse`; every
    // other type is the one generated above.
    let fanout = out_dir.join("fanout");
    std::fs::create_dir_all(&fanout)?;
    let mut subscription = descriptors.clone();
    subscription
        .file
        .retain(|f| f.name() == "safemode/v1/subscription.proto");
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .out_dir(&fanout)
        .extern_path(".safemode.v1", "crate::wire::proto")
        .extern_path(
            ".safemode.v1.SubscribeResponse",
            "crate::api::outbound::Outbound",
        )
        .compile_fds(subscription)?;

    let runbooks = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("runbooks");
    embed_yaml_files(
        &runbooks.join("modes"),
        &out_dir.join("standard_modes.rs"),
        "STANDARD_MODES",
        "The standard modes",
    )?;
    // Only the files directly in runbooks/: the modes below it are embedded
    // above.
    embed_yaml_files(
        &runbooks,
        &out_dir.join("standard_runbooks.rs"),
        "STANDARD_RUNBOOKS",
        "The standard runbooks",
    )?;
    Ok(())
}

/// Writes to `out` a constant `name` listing every `*.yaml` file directly in
/// `dir` as (file name, YAML text), in file-name order.
fn embed_yaml_files(
    dir: &std::path::Path,
    out: &std::path::Path,
    name: &str,
    doc: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    let mut code =
        format!("/// {doc}: (file name, YAML text).\npub const {name}: &[(&str, &str)] = &[\n");
    for path in files {
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or("YAML file name is not UTF-8")?;
        code.push_str(&format!(
            "    ({file:?}, include_str!({:?})),\n",
            path.display().to_string()
        ));
    }
    code.push_str("];\n");
    std::fs::write(out, code)?;
    Ok(())
}
