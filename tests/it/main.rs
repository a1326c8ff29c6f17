//! Integration tests: one binary so the crate links once.

mod audit;
mod changes;
mod cli;
mod e2e;
mod etcd;
mod governance;
mod grpc_surface;
mod mode_files;
mod policy_decide;
mod policy_merge;
mod replicas;
mod restart;
mod runbooks;
mod store_contract;
mod support;
mod tls;
