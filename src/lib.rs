//! safemode: an incident degradation-mode controller for customer-support flows.
#![forbid(unsafe_code)]

pub mod api;
pub mod backoff;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod controller;
pub mod errors;
pub mod policy;
pub mod server;
pub mod store;
pub mod wire;
