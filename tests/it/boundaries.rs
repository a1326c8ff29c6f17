//! The crate boundaries of ARCHITECTURE.md ("Crates"), enforced: the
//! workspace's own description (`cargo metadata`) names each crate's
//! declared dependencies, and `cargo tree -e normal -p CRATE` names
//! everything a crate compiles when it is built alone. A crate that gains a
//! forbidden dependency, directly or through another crate, fails here.
//!
//! The transitive check asks `cargo tree` rather than walking the metadata's
//! `resolve` graph: that graph unifies features across the whole workspace
//! (tonic there has the `router` feature, and so depends on axum, because the
//! gRPC edge serves), while a channel service builds the client crate alone.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// The domain: no async runtime, no gRPC, no protobuf, no store.
const POLICY_FORBIDDEN: &[&str] = &[
    "tokio",
    "tonic",
    "prost",
    "etcd-client",
    "redb",
    "safemode-wire",
    "safemode-store",
    "safemode-controller",
    "safemode-grpc",
];

/// What a channel service links: nothing of the control plane or the CLI.
const CLIENT_FORBIDDEN: &[&str] = &[
    "etcd-client",
    "redb",
    "clap",
    "tonic-reflection",
    "tonic-health",
    "axum",
    // Metrics through the OpenTelemetry API alone: the service picks the
    // SDK and the exporter.
    "opentelemetry_sdk",
    "opentelemetry-otlp",
    "opentelemetry-prometheus",
    "prometheus",
    "tracing-opentelemetry",
    "safemode-store",
    "safemode-controller",
    "safemode-grpc",
];

/// The controller's own code is transport-free: it declares neither tonic
/// nor prost (the store below it uses etcd's gRPC client, its own affair).
const CONTROLLER_DIRECT_FORBIDDEN: &[&str] = &[
    "tonic",
    "tonic-prost",
    "prost",
    "prost-types",
    "safemode-wire",
    "safemode-grpc",
    "safemode-client",
];

/// The wire types are shared by both ends, so they know neither.
const WIRE_DIRECT_FORBIDDEN: &[&str] = &[
    "safemode-client",
    "safemode-store",
    "safemode-controller",
    "safemode-grpc",
];

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs cargo (the one that built this test) in the workspace, offline: the
/// lock file and the registry cache are already there.
fn cargo(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO"))
        .args(args)
        .args(["--offline", "--locked"])
        .current_dir(workspace_root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo {args:?}: {e}"));
    assert!(
        output.status.success(),
        "cargo {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("cargo prints UTF-8")
}

/// The workspace's packages, by name: each with its normal (not dev, not
/// build) dependencies as declared in its Cargo.toml.
fn declared_normal_dependencies() -> Vec<(String, BTreeSet<String>)> {
    let metadata: Value =
        serde_json::from_str(&cargo(&["metadata", "--format-version", "1", "--no-deps"]))
            .expect("cargo metadata prints JSON");
    let packages = metadata["packages"].as_array().expect("packages");
    packages
        .iter()
        .map(|package| {
            let name = package["name"].as_str().expect("name").to_string();
            let deps = package["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter(|d| d["kind"].is_null())
                .map(|d| d["name"].as_str().expect("dependency name").to_string())
                .collect();
            (name, deps)
        })
        .collect()
}

/// Every package `crate` compiles when built alone for what it ships (no
/// dev or build dependencies), by name.
fn normal_tree(krate: &str) -> BTreeSet<String> {
    cargo(&[
        "tree", "-p", krate, "-e", "normal", "--prefix", "none", "--format", "{p}",
    ])
    .lines()
    .filter_map(|line| line.split_whitespace().next())
    .map(str::to_string)
    .collect()
}

/// The forbidden names found in `deps`.
fn crossings(deps: &BTreeSet<String>, forbidden: &[&str]) -> Vec<String> {
    forbidden
        .iter()
        .filter(|f| deps.contains(**f))
        .map(|f| f.to_string())
        .collect()
}

#[test]
fn the_workspace_has_the_crates_architecture_md_names() {
    let names: BTreeSet<String> = declared_normal_dependencies()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    for expected in [
        "safemode",
        "safemode-policy",
        "safemode-signing",
        "safemode-support",
        "safemode-wire",
        "safemode-client",
        "safemode-store",
        "safemode-controller",
        "safemode-grpc",
    ] {
        assert!(
            names.contains(expected),
            "{expected} is not a workspace package: {names:?}"
        );
    }
}

#[test]
fn no_crate_declares_a_dependency_across_its_boundary() {
    let declared = declared_normal_dependencies();
    let rules: &[(&str, &[&str])] = &[
        ("safemode-policy", POLICY_FORBIDDEN),
        ("safemode-client", CLIENT_FORBIDDEN),
        ("safemode-controller", CONTROLLER_DIRECT_FORBIDDEN),
        ("safemode-wire", WIRE_DIRECT_FORBIDDEN),
    ];
    let mut problems = Vec::new();
    for (krate, forbidden) in rules {
        let (_, deps) = declared
            .iter()
            .find(|(name, _)| name == krate)
            .unwrap_or_else(|| panic!("{krate} is not a workspace package"));
        let found = crossings(deps, forbidden);
        if !found.is_empty() {
            problems.push(format!("{krate} declares {found:?}"));
        }
    }
    assert!(
        problems.is_empty(),
        "crate boundaries crossed (ARCHITECTURE.md, \"Crates\"): {problems:?}"
    );
}

#[test]
fn the_policy_crate_compiles_nothing_of_async_grpc_protobuf_or_stores() {
    let tree = normal_tree("safemode-policy");
    // The tree is read: the crate itself and what it parses YAML with.
    assert!(
        tree.contains("safemode-policy") && tree.contains("serde-saphyr"),
        "{tree:?}"
    );
    let found = crossings(&tree, POLICY_FORBIDDEN);
    assert!(
        found.is_empty(),
        "safemode-policy compiles {found:?}; the domain must stay free of them"
    );
}

#[test]
fn the_client_crate_compiles_nothing_of_the_control_plane() {
    let tree = normal_tree("safemode-client");
    // The tree is read: the client talks gRPC through tonic.
    assert!(
        tree.contains("tonic") && tree.contains("safemode-wire"),
        "{tree:?}"
    );
    let found = crossings(&tree, CLIENT_FORBIDDEN);
    assert!(
        found.is_empty(),
        "safemode-client compiles {found:?}; a channel service must not"
    );
}

#[test]
fn the_checks_see_a_crossing_where_there_is_one() {
    // The gRPC edge does serve with tonic-health and axum's router: the same
    // check run on it must find them, or the checks above prove nothing.
    let tree = normal_tree("safemode-grpc");
    let found = crossings(&tree, CLIENT_FORBIDDEN);
    for expected in [
        "tonic-health",
        "tonic-reflection",
        "axum",
        "safemode-controller",
    ] {
        assert!(
            found.iter().any(|f| f == expected),
            "{expected} not found in safemode-grpc's tree: {found:?}"
        );
    }
}
