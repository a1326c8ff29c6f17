//! safemode: an incident degradation-mode controller for customer-support flows.
//!
//! An incident commander switches pre-agreed degradation modes on and off;
//! every subscribed channel service receives the same compiled policy at once
//! and decides locally. See `ARCHITECTURE.md` for the whole picture.
//!
//! This package is the `safemode` command and what only it needs; the rest
//! of the system is in the workspace's crates (`crates/`):
//!
//! - `safemode-policy`: the domain (effects, modes, activations, merge,
//!   decide, runbooks) and its YAML loaders; no I/O beyond reading files.
//! - `safemode-signing`: Ed25519 keys and signatures.
//! - `safemode-support`: backoff, error chains, PEM files.
//! - `safemode-wire`: the `safemode.v1` protobuf types and their conversions.
//! - `safemode-client`: what a channel service links to subscribe and decide.
//! - `safemode-store`: the revisioned store trait, the embedded store and etcd.
//! - `safemode-controller`: changes as audited transactions, namespace
//!   followers, subscribers, roles and tokens.
//! - `safemode-grpc`: the gRPC services and a running replica.
//!
//! # Layout
//!
//! - [`cli`]: the `safemode` command.
//! - [`drill`]: runbook drills and their reports.
//! - [`sim`]: simulated channel services, for `safemode sim`, drills and the
//!   benchmarks.
//! - `telemetry`: the process's logs and OpenTelemetry spans, and the W3C
//!   trace context the command sends.
#![forbid(unsafe_code)]

pub mod cli;
mod client_errors;
pub mod drill;
pub mod sim;
mod telemetry;
