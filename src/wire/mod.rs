//! The wire format: the `safemode.v1` protobuf types generated from `proto/`,
//! and the conversions between them and the policy core (nothing here knows
//! the controller). Conversions into the core validate everything and say
//! what was wrong.

mod convert;
pub mod signed;

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

/// The longest subscriber id a controller accepts.
pub const MAX_SUBSCRIBER_ID_LEN: usize = 128;

/// Checks a subscriber id as the controller does (so a client refuses a bad
/// one at start rather than retrying forever).
pub fn check_subscriber_id(id: &str) -> Result<(), String> {
    let id = id.trim();
    if id.is_empty() || id.len() > MAX_SUBSCRIBER_ID_LEN || id.chars().any(char::is_control) {
        return Err(format!(
            "give a stable id of 1 to {MAX_SUBSCRIBER_ID_LEN} printable characters, e.g. chatbot-7f9c"
        ));
    }
    Ok(())
}
