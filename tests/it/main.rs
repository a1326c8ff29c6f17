//! Integration tests: one binary so the crate links once.

mod audit;
mod changes;
mod cli;
mod client;
mod drill;
mod e2e;
mod etcd;
mod example;
mod governance;
mod grpc_surface;
mod mode_files;
mod policy_decide;
mod policy_merge;
mod python_client;
mod replicas;
mod restart;
mod rogue;
mod runbooks;
mod sim;
mod store_contract;
mod support;
mod tls;
mod tokens;
