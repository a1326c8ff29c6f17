//! The gRPC edge: the control and subscription services over the controller.
//! Requests are validated here, converted into the policy core's types, and
//! controller errors become `tonic::Status` here and nowhere else.

mod control;
mod convert;
mod subscribe;

use std::time::Duration;

pub use control::ControlApi;
pub use subscribe::SubscriptionApi;

use crate::controller;
use crate::policy::NameError;

/// Tunables of the subscription stream.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    /// How often the server sends a heartbeat on an idle stream.
    pub heartbeat: Duration,
    /// How long a new stream may take to send its hello.
    pub hello_timeout: Duration,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            heartbeat: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
        }
    }
}

/// The principal of a request. Every caller is `local` until token
/// authentication exists; the server only binds loopback meanwhile.
fn principal<T>(_request: &tonic::Request<T>) -> String {
    "local".to_string()
}

/// An invalid field of a request.
fn invalid(field: &str, error: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::invalid_argument(format!("{field}: {error}"))
}

fn invalid_name(field: &'static str) -> impl Fn(NameError) -> tonic::Status {
    move |e| invalid(field, e)
}

/// The one place controller errors become gRPC statuses.
fn status(error: controller::Error) -> tonic::Status {
    use controller::Error::*;
    let message = error.to_string();
    match error {
        UnknownMode(_) | NotActive { .. } => tonic::Status::not_found(message),
        Ambiguous { .. } => tonic::Status::failed_precondition(message),
        NotLoaded { .. } | Behind { .. } | ShuttingDown => tonic::Status::unavailable(message),
        Conflict(_) => tonic::Status::aborted(message),
        Store(crate::store::Error::Unavailable(_)) => tonic::Status::unavailable(message),
        Store(_) => tonic::Status::internal(message),
    }
}
