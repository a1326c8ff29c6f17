//! Integration tests: one binary so the crate links once.

mod changes;
mod cli;
mod e2e;
mod etcd;
mod grpc_surface;
mod mode_files;
mod policy_decide;
mod policy_merge;
mod replicas;
mod restart;
mod store_contract;
mod support;
