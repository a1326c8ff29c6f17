//! The wire format: the `safemode.v1` protobuf types generated from `proto/`,
//! and the conversions between them and the policy core (nothing here knows
//! the controller). Conversions into the core validate everything and say
//! what was wrong.

mod convert;

pub use convert::{
    WireError, activation_to_wire, channel_policy_from_wire, channel_policy_to_wire, mode_to_wire,
    opt_text, timestamp_from_wire, timestamp_to_wire,
};

/// Generated code for `proto/safemode/v1/*.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("safemode.v1");

    /// The encoded descriptors of the API, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/safemode_descriptor.bin"));
}

/// The snapshot format version this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;
