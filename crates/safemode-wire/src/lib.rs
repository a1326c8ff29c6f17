//! The wire format: the `safemode.v1` protobuf types generated from `proto/`,
//! and the conversions between them and the policy core (nothing here knows
//! the controller). Conversions into the core validate everything and say
//! what was wrong.
#![forbid(unsafe_code)]

mod convert;
pub mod signed;

/// The well-known types the messages use (timestamps).
pub use prost_types;

pub use convert::{
    WireError, activation_to_wire, channel_policy_from_wire, channel_policy_to_wire, mode_to_wire,
    opt_text, runbook_to_wire, timestamp_from_wire, timestamp_to_wire,
};

/// Generated code for `proto/safemode/v1/*.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("safemode.v1");

    /// The encoded descriptors of the API, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/safemode_descriptor.bin"));
}

/// The request header a client names itself in, on a server without tokens
/// (the CLI's `--principal`).
pub const PRINCIPAL_HEADER: &str = "x-safemode-principal";

/// The trailer an UNAVAILABLE answer carries when the store was unreachable:
/// what became of the request. `unchanged`: a change that certainly was not
/// applied; `unknown`: one that may have been; `read`: a read. A client that
/// tries another replica keeps count, so its last word is as exact as the
/// server's.
pub const STORE_UNREACHABLE_HEADER: &str = "x-safemode-store-unreachable";

/// Response header naming the replica that answered, on every control-plane
/// answer (refusals included), so that a command can say who answered.
pub const REPLICA_HEADER: &str = "x-safemode-replica";

/// The response header of a subscription stream by which a replica says it
/// takes reports on it; a client sends none to a replica without it (an
/// older version ends the stream on a message it does not know).
pub const REPORTS_HEADER: &str = "x-safemode-reports";

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

/// The most status pages [`full_status`] reads (5,000 subscribers each at
/// most): far beyond any replica's stream limit.
const MAX_STATUS_PAGES: usize = 100;

/// The page [`full_status`] asks for: the most a server gives, so a fleet
/// is asked as few times as can be.
const MAX_STATUS_PAGE_SIZE: u32 = 5000;

/// A namespace's whole status across the fleet: every page of its
/// subscribers, read in turn and merged (activations, problems, the channel
/// summary and the replicas come with every page; the first page's are
/// kept).
pub async fn full_status<T>(
    client: &mut proto::control_service_client::ControlServiceClient<T>,
    namespace: &str,
) -> Result<proto::GetStatusResponse, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let first = proto::GetStatusRequest {
        namespace: namespace.to_string(),
        ..proto::GetStatusRequest::default()
    };
    full_status_of(client, first).await
}

/// Every page of the status `first` asks for (its filters), as one answer:
/// the first page's summary, replicas and problems, every page's
/// subscribers.
pub async fn full_status_of<T>(
    client: &mut proto::control_service_client::ControlServiceClient<T>,
    first: proto::GetStatusRequest,
) -> Result<proto::GetStatusResponse, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let first = proto::GetStatusRequest {
        page_size: match first.page_size {
            0 => MAX_STATUS_PAGE_SIZE,
            n => n,
        },
        ..first
    };
    let request = |page_token: String| proto::GetStatusRequest {
        page_token,
        ..first.clone()
    };
    let mut status = client
        .get_status(request(String::new()))
        .await?
        .into_inner();
    let mut token = std::mem::take(&mut status.next_page_token);
    for _ in 1..MAX_STATUS_PAGES {
        if token.is_empty() {
            return Ok(status);
        }
        let page = client.get_status(request(token)).await?.into_inner();
        status.subscribers.extend(page.subscribers);
        status.subscriber_count = page.subscriber_count;
        // A replica that stopped answering between pages leaves the whole
        // answer partial.
        status.partial |= page.partial;
        for answer in page.replicas.iter().filter(|r| !r.answered) {
            match status
                .replicas
                .iter_mut()
                .find(|r| r.replica == answer.replica)
            {
                Some(known) => *known = answer.clone(),
                None => status.replicas.push(answer.clone()),
            }
        }
        token = page.next_page_token;
    }
    if token.is_empty() {
        Ok(status)
    } else {
        Err(tonic::Status::resource_exhausted(format!(
            "the status has more than {MAX_STATUS_PAGES} pages of subscribers; read it page by page"
        )))
    }
}
