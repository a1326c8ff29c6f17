//! safemode: an incident degradation-mode controller for customer-support flows.
//!
//! An incident commander switches pre-agreed degradation modes on and off;
//! every subscribed channel service receives the same compiled policy at once
//! and decides locally. See `ARCHITECTURE.md` for the whole picture.
//!
//! # Layout
//!
//! - [`policy`]: the domain (effects, modes, activations, merge, decide), no I/O.
//! - [`catalog`]: the standard modes and loading a modes directory.
//! - [`store`]: the revisioned store trait, the embedded store and etcd.
//! - [`controller`]: changes as transactions, namespace followers, subscribers.
//! - [`wire`]: the `safemode.v1` protobuf types and their conversions.
//! - [`api`]: the gRPC services; [`server`] runs a replica.
//! - [`client`]: what a channel service links to subscribe and decide.
//! - [`cli`]: the `safemode` command.
//! - [`signing`]: Ed25519 keys and signatures on snapshots, heartbeats, audit.
//! - [`backoff`], [`errors`]: small shared helpers.
#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod auth;
pub mod backoff;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod controller;
pub mod drill;
pub mod errors;
pub mod pem;
pub mod policy;
pub mod server;
pub mod signing;
pub mod sim;
pub mod store;
pub mod wire;
