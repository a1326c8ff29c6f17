//! The gRPC edge: the control and subscription services over the controller.
//! Requests are validated here, converted into the policy core's types, and
//! controller errors become `tonic::Status` here and nowhere else.

#![forbid(unsafe_code)]

pub mod coalesce;
pub mod console;
mod control;
pub(crate) mod convert;
pub mod fleet;
pub mod https;
mod insights;
pub mod limits;
pub(crate) mod outbound;
mod reports;
pub use reports::TOKEN_BURST as REPORT_TOKEN_BURST;
pub mod server;
mod subscribe;
pub mod telemetry;
mod triggers;

/// The subscription server again, sending [`outbound::Outbound`] (see
/// this crate's `build.rs`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub(crate) mod fanout {
    include!(concat!(env!("OUT_DIR"), "/fanout/safemode.v1.rs"));
}

use std::sync::Arc;
use std::time::Duration;

pub use control::ControlApi;
pub use subscribe::SubscriptionApi;
use tokio::sync::watch;
use tracing::warn;

use safemode_controller::auth::{Operation, Principal, Tokens, hash_token};
use safemode_controller::counters::Unauthenticated;
use safemode_controller::{self as controller, Controller};
use safemode_policy::{NameError, Namespace};

/// Tunables of the subscription stream.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    /// How often the server sends a heartbeat on an idle stream.
    pub heartbeat: Duration,
    /// How long a new stream may take to send its hello.
    pub hello_timeout: Duration,
    /// How many streams the replica admits, per token, per connection and
    /// in all.
    pub limits: limits::StreamLimits,
    /// What the streams count (metrics).
    pub metrics: telemetry::StreamMetrics,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            heartbeat: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
            limits: limits::StreamLimits::default(),
            metrics: telemetry::StreamMetrics::default(),
        }
    }
}

/// Authenticates every request of a service: with a tokens file, the
/// bearer token must belong to a principal, who is attached to the request;
/// without one (the server then listens on loopback only), every caller may
/// do everything, under the name it gives in `x-safemode-principal` (so that
/// two people on one machine can still be two principals for four-eyes), or
/// as [`Principal::local`].
#[derive(Clone)]
pub struct Authenticator {
    tokens: Option<watch::Receiver<Arc<Tokens>>>,
    /// Where refusals for a missing or unknown token are counted.
    counters: Option<Arc<Controller>>,
}

impl Authenticator {
    /// Checks tokens against the newest of `tokens` (`None`: no
    /// authentication).
    pub fn new(tokens: Option<watch::Receiver<Arc<Tokens>>>) -> Self {
        Authenticator {
            tokens,
            counters: None,
        }
    }

    /// Counts the calls it refuses for their token in `controller`'s
    /// counters (`safemode_calls_unauthenticated_total`).
    pub fn counting(mut self, controller: Arc<Controller>) -> Self {
        self.counters = Some(controller);
        self
    }

    fn count(&self, why: Unauthenticated) {
        if let Some(controller) = &self.counters {
            controller.counters().unauthenticated(why);
        }
    }
}

fn revoked_token() -> tonic::Status {
    tonic::Status::unauthenticated(
        "this token was revoked: it is no longer in the server's tokens file",
    )
}

/// The token a request came with (its hash), and the server's tokens as
/// they change: a stream checks that its token was not revoked since.
///
/// Its receiver is a clone of the [`Authenticator`]'s, which never marks a
/// version seen (it only `borrow`s): every credential therefore wakes once
/// after any reload since the server started and checks again. That is
/// deliberate: it also covers a reload between authentication and the
/// credential's first wait.
#[derive(Clone)]
pub struct Credential {
    sha256: String,
    tokens: watch::Receiver<Arc<Tokens>>,
}

impl Credential {
    /// The token's principal in the tokens in force now; UNAUTHENTICATED if
    /// it was revoked since the request was authenticated.
    pub fn current(&self) -> Result<Arc<Principal>, tonic::Status> {
        self.tokens
            .borrow()
            .principal_of(&self.sha256)
            .ok_or_else(revoked_token)
    }

    /// Waits until the token is revoked, or its principal may no longer do
    /// `operation` in `namespace`, and says which as a status to end with;
    /// never returns if neither happens.
    pub async fn revoked(&mut self, operation: Operation, namespace: &Namespace) -> tonic::Status {
        loop {
            if self.tokens.changed().await.is_err() {
                // The tokens never change again.
                return std::future::pending().await;
            }
            let principal = self.tokens.borrow_and_update().principal_of(&self.sha256);
            match principal {
                None => return revoked_token(),
                Some(principal) => {
                    if let Err(denied) = principal.may(operation, Some(namespace)) {
                        return tonic::Status::permission_denied(format!(
                            "the tokens file changed and {denied}"
                        ));
                    }
                }
            }
        }
    }
}

impl tonic::service::Interceptor for Authenticator {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let principal = match &self.tokens {
            None => {
                let mut principal = Principal::local();
                if let Some(name) = request.metadata().get(PRINCIPAL_HEADER) {
                    principal.name = name
                        .to_str()
                        .ok()
                        .and_then(|n| safemode_controller::auth::principal_name(n).ok())
                        .ok_or_else(|| {
                            tonic::Status::invalid_argument(format!(
                                "--principal: {}",
                                safemode_controller::auth::PRINCIPAL_NAME_RULE
                            ))
                        })?;
                }
                Arc::new(principal)
            }
            Some(tokens) => {
                let token = request
                    .metadata()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .ok_or_else(|| {
                        self.count(Unauthenticated::Missing);
                        tonic::Status::unauthenticated(
                            "a bearer token is required: pass --token or set SAFEMODE_TOKEN (an admin makes one with `safemode token create`)",
                        )
                    })?;
                let sha256 = hash_token(token.trim());
                let principal = tokens.borrow().principal_of(&sha256).ok_or_else(|| {
                    self.count(Unauthenticated::Unknown);
                    warn!("request with an unknown token");
                    tonic::Status::unauthenticated(
                        "unknown token: it is not in this server's tokens file",
                    )
                })?;
                request.extensions_mut().insert(Credential {
                    sha256,
                    tokens: tokens.clone(),
                });
                principal
            }
        };
        request.extensions_mut().insert(principal);
        Ok(request)
    }
}

pub use safemode_wire::PRINCIPAL_HEADER;

/// The principal the [`Authenticator`] attached to a request.
fn principal<T>(request: &tonic::Request<T>) -> Result<Arc<Principal>, tonic::Status> {
    request
        .extensions()
        .get::<Arc<Principal>>()
        .cloned()
        .ok_or_else(|| tonic::Status::internal("the request was not authenticated"))
}

/// Checks that `actor` may do `operation` in `namespace`. A refusal changes
/// nothing, says which role is needed, and is logged; a refused write is
/// also audited (`what` says what was attempted).
async fn authorize(
    controller: &Controller,
    actor: &Principal,
    operation: Operation,
    namespace: Option<&Namespace>,
    what: &str,
) -> Result<(), tonic::Status> {
    authorize_change(controller, actor, operation, namespace, what, false).await
}

/// [`authorize`] for a change that may be a dry run: the same check against
/// the same table, but a refused dry run is only logged, since a dry run
/// audits nothing.
async fn authorize_change(
    controller: &Controller,
    actor: &Principal,
    operation: Operation,
    namespace: Option<&Namespace>,
    what: &str,
    dry_run: bool,
) -> Result<(), tonic::Status> {
    let Err(denied) = actor.may(operation, namespace) else {
        return Ok(());
    };
    warn!(principal = %actor.name, %what, dry_run, "refused: {denied}");
    controller.counters().refused(operation);
    if operation.writes() && !dry_run {
        controller
            .record_refusal(actor, namespace, format!("refused {what}: {denied}"))
            .await
            .map_err(status)?;
    }
    Err(tonic::Status::permission_denied(denied.to_string()))
}

/// For a call that names a record by id, before the record is read: refuses
/// a caller who may not do `operation` in any namespace, so that ids cannot
/// be probed by someone who could never act on them. The record's own
/// namespace is checked with [`authorize`] once it is read.
async fn authorize_anywhere(
    controller: &Controller,
    actor: &Principal,
    operation: Operation,
    what: &str,
) -> Result<(), tonic::Status> {
    authorize_change_anywhere(controller, actor, operation, what, false).await
}

/// [`authorize_anywhere`] for a change that may be a dry run (see
/// [`authorize_change`]).
async fn authorize_change_anywhere(
    controller: &Controller,
    actor: &Principal,
    operation: Operation,
    what: &str,
    dry_run: bool,
) -> Result<(), tonic::Status> {
    let live = Namespace::live();
    let drill = Namespace::parse("drill-any").expect("a valid drill namespace");
    if actor.may(operation, Some(&live)).is_ok() || actor.may(operation, Some(&drill)).is_ok() {
        return Ok(());
    }
    authorize_change(controller, actor, operation, None, what, dry_run).await
}

/// The most bytes of an error message: messages quote what the caller
/// sent, and a status travels in a header that HTTP/2 peers bound.
const MAX_MESSAGE_BYTES: usize = 1024;

/// `message`, cut to [`MAX_MESSAGE_BYTES`] at a character boundary.
fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("… (cut)");
    }
    message
}

/// An invalid field of a request.
fn invalid(field: &str, error: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::invalid_argument(bounded(format!("{field}: {error}")))
}

fn invalid_name(field: &'static str) -> impl Fn(NameError) -> tonic::Status {
    move |e| invalid(field, e)
}

/// The one place controller errors become gRPC statuses.
fn status(error: controller::Error) -> tonic::Status {
    use controller::Error::*;
    let message = bounded(error.to_string());
    match error {
        UnknownMode(..)
        | NotActive { .. }
        | UnknownRunbook(..)
        | UnknownIncident(_)
        | UnknownRequest(_)
        | UnknownProposal(_) => tonic::Status::not_found(message),
        Ambiguous { .. }
        | NoStage { .. }
        | SameSeverity { .. }
        | Resolved(_)
        | AlreadyDeclared { .. }
        | NotPending { .. }
        | ProposalClosed { .. }
        | IncidentModes { .. }
        | Superseded { .. }
        | NothingToApply(_)
        | CatalogMismatch { .. }
        | ChangeIdReused { .. } => tonic::Status::failed_precondition(message),
        OwnRequest { .. } => tonic::Status::permission_denied(message),
        NotLoaded { .. } | Behind { .. } | ShuttingDown | CatalogChanged { .. } => {
            tonic::Status::unavailable(message)
        }
        TooManyNamespaces { .. } => tonic::Status::resource_exhausted(message),
        NotInUse { .. } => tonic::Status::failed_precondition(message),
        Conflict(_) => tonic::Status::aborted(message),
        StoreUnreachable { outcome, .. } => {
            let mut status = tonic::Status::unavailable(message);
            let outcome = match outcome {
                controller::StoreOutcome::Read => "read",
                controller::StoreOutcome::Unchanged => "unchanged",
                controller::StoreOutcome::Unknown { .. } => "unknown",
            };
            status.metadata_mut().insert(
                safemode_wire::STORE_UNREACHABLE_HEADER,
                tonic::metadata::MetadataValue::from_static(outcome),
            );
            status
        }
        Store(safemode_store::Error::Unavailable(_)) => tonic::Status::unavailable(message),
        Store(_) => tonic::Status::internal(message),
    }
}
