//! Sending a write to the controller replicas until one carries it out.
//!
//! A command that changes something (apply, lift, declare, escalate,
//! resolve, approve) carries one change id, made once per command (or given
//! with `--change-id`). When a replica cannot be reached, or answers
//! UNAVAILABLE (its store failed, it is shutting down) or with an outcome it
//! could not learn, the same request, with the same change id, goes to the
//! next `--server`. The controller records every change id with its change,
//! so a request that reached the store through a replica that then died is
//! answered with that change's result by the next one, never applied twice.
//!
//! Bounded: at most [`PASSES`] passes over the servers, with a short
//! jittered pause between passes (an etcd election takes about a second),
//! and one pass when every replica answered that the store is unreachable
//! (each already tried every etcd member). Then the last word is the
//! store's own line ("... is unreachable: ...; nothing changed, retry when
//! it is back"), as exact as the replicas' about what became of the change.

use std::time::Duration;

use anyhow::anyhow;
use futures_util::future::BoxFuture;
use tonic::Code;

use super::{Caller, Control, control, explain_control};
use crate::client_errors;
use safemode_controller::ChangeId;
use safemode_support::backoff::Backoff;

/// How many times a write goes over the whole server list at most.
pub(crate) const PASSES: usize = 3;

/// Sends `call` (given a client and the change id) to each server in turn
/// until one answers with something other than "try elsewhere". `what`
/// names the command in the final error.
pub(crate) async fn write<T>(
    servers: &[String],
    caller: &Caller,
    what: &str,
    mut call: impl FnMut(
        Control,
        String,
    ) -> BoxFuture<'static, Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    let change_id = caller.change_id.to_string();
    let mut pause = Backoff::new(Duration::from_millis(250), Duration::from_secs(1));
    let mut failures: Vec<String> = Vec::new();
    let mut store = StoreDown::default();
    for pass in 0..PASSES {
        if pass > 0 {
            // Every replica answered that the store is unreachable: the
            // next pass would hear the same, and each replica already
            // tried every etcd member.
            if store.everywhere && store.this_pass > 0 {
                break;
            }
            tokio::time::sleep(pause.next_delay()).await;
        }
        store.everywhere = true;
        store.this_pass = 0;
        for server in servers {
            let client = match control(std::slice::from_ref(server), caller).await {
                Ok(client) => client,
                Err(e) => {
                    // In the command line's flags, as `main` prints a
                    // client error, not in `SubscriberConfig`'s fields.
                    failures.push(format!("{server}: {}", client_errors::render(&e)));
                    continue;
                }
            };
            match call(client, change_id.clone()).await {
                Ok(response) => return Ok(response.into_inner()),
                // A wrong address stays wrong.
                Err(status) if let Some(explained) = explain_control(server, &status).await => {
                    return Err(explained.into());
                }
                Err(status) if elsewhere(&status) => {
                    tracing::debug!(%server, code = ?status.code(), message = status.message(), "trying the next server");
                    store.heard(&status);
                    failures.push(format!("{server}: {}", status.message()));
                }
                // The controller's message says what to do.
                Err(status) => return Err(anyhow!("{}", status.message())),
            }
        }
    }
    if let Some(line) = store.last_word() {
        return Err(anyhow!("{line}"));
    }
    let last = failures.last().cloned().unwrap_or_default();
    Err(anyhow!(
        "{what} failed on every server ({}), {PASSES} times over; last: {last}. Nothing was applied twice: run the command again with --change-id {change_id} and it is applied at most once",
        servers.join(", ")
    ))
}

/// What the replicas said about the store over a write's attempts, so the
/// last word is the store's when that is what failed: "the store (etcd at
/// ...) is unreachable: ...; nothing changed, retry when it is back". It
/// says "nothing changed" only when no attempt may have changed anything:
/// every replica that answered said so (a replica that could not be
/// reached was never sent the change).
#[derive(Default)]
struct StoreDown {
    /// A replica's answer that the store is unreachable and nothing changed.
    unchanged: Option<String>,
    /// A replica's answer that the change may have been applied.
    unknown: Option<String>,
    /// An attempt failed some other way after it was sent (a replica cut
    /// off mid-call): its outcome is not known here.
    other: bool,
    /// In this pass, every replica that answered said the store is down.
    everywhere: bool,
    /// How many replicas said so in this pass.
    this_pass: usize,
}

impl StoreDown {
    fn heard(&mut self, status: &tonic::Status) {
        let outcome = status
            .metadata()
            .get(safemode_wire::STORE_UNREACHABLE_HEADER)
            .and_then(|v| v.to_str().ok());
        match outcome {
            Some("unchanged") => {
                self.this_pass += 1;
                self.unchanged = Some(status.message().to_string());
            }
            Some("unknown") => {
                self.this_pass += 1;
                self.unknown = Some(status.message().to_string());
            }
            _ => {
                self.other = true;
                self.everywhere = false;
            }
        }
    }

    /// The line to end with, when the store is what failed.
    fn last_word(&self) -> Option<&str> {
        if self.other {
            return None;
        }
        self.unknown.as_deref().or(self.unchanged.as_deref())
    }
}

/// Whether another replica may succeed where this answer came from: the
/// replica or its store was unreachable, or the call was cut off. The
/// change id makes sending it again safe even when it did arrive.
fn elsewhere(status: &tonic::Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded | Code::Aborted => true,
        // A connection cut mid-call, in hyper's and h2's words.
        Code::Unknown | Code::Internal => {
            let message = status.message();
            [
                "transport error",
                "h2 protocol error",
                "connection",
                "broken pipe",
            ]
            .iter()
            .any(|sign| message.contains(sign))
        }
        _ => false,
    }
}

/// The change id of one command: `--change-id`, or a new one.
pub(crate) fn change_id(given: Option<&str>) -> anyhow::Result<ChangeId> {
    match given {
        Some(text) => ChangeId::parse(text).map_err(|e| anyhow!("--change-id: {e}")),
        None => Ok(ChangeId::random()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_another_replica_could_better_are_retried() {
        let check = |code: Code, message: &str, expected: bool| {
            assert_eq!(
                elsewhere(&tonic::Status::new(code, message)),
                expected,
                "{code:?} {message}"
            );
        };
        check(Code::Unavailable, "store unavailable: leader changed", true);
        check(Code::Aborted, "too many concurrent changes", true);
        check(Code::Unknown, "transport error", true);
        check(Code::Internal, "h2 protocol error: stream reset", true);
        check(Code::NotFound, "unknown mode 'x'", false);
        check(Code::FailedPrecondition, "already declared", false);
        check(Code::PermissionDenied, "not a commander", false);
        check(Code::Internal, "store data is damaged", false);
    }

    #[tokio::test]
    async fn a_write_to_no_server_says_what_to_do_in_flags() {
        let caller = Caller {
            token: None,
            principal: Some("alice".into()),
            ca_cert: None,
            insecure: false,
            change_id: ChangeId::random(),
            connected: std::sync::Mutex::new(None),
        };
        let servers = ["http://127.0.0.1:1".to_string()];
        let error = write(&servers, &caller, "mode apply", |_client, _id| {
            Box::pin(async { Ok(tonic::Response::new(())) })
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("(--server / SAFEMODE_SERVER point elsewhere)"),
            "{error}"
        );
        assert!(!error.contains("SubscriberConfig"), "{error}");
    }

    #[test]
    fn the_last_word_is_the_stores_only_when_every_failure_said_it() {
        let store = |outcome: &'static str, message: &str| {
            let mut status = tonic::Status::unavailable(message);
            status.metadata_mut().insert(
                safemode_wire::STORE_UNREACHABLE_HEADER,
                tonic::metadata::MetadataValue::from_static(outcome),
            );
            status
        };
        let unchanged = "the store (etcd at http://e:2379) is unreachable: connection refused; nothing changed, retry when it is back";
        let unknown = "the store (etcd at http://e:2379) is unreachable: connection refused; the change was sent but its answer was lost, ...";
        let cut = tonic::Status::unknown("transport error");
        let cases: Vec<(Vec<tonic::Status>, Option<&str>)> = vec![
            (vec![store("unchanged", unchanged)], Some(unchanged)),
            (
                vec![store("unchanged", unchanged), store("unchanged", unchanged)],
                Some(unchanged),
            ),
            // One attempt may have applied it: that is the last word.
            (
                vec![store("unknown", unknown), store("unchanged", unchanged)],
                Some(unknown),
            ),
            // A replica cut off mid-call: nobody knows; the general message.
            (vec![store("unchanged", unchanged), cut.clone()], None),
            (vec![tonic::Status::unavailable("shutting down")], None),
        ];
        for (answers, expected) in cases {
            let mut down = StoreDown::default();
            for answer in &answers {
                down.heard(answer);
            }
            assert_eq!(down.last_word(), expected, "{answers:?}");
        }
    }

    #[test]
    fn a_given_change_id_is_checked() {
        assert!(change_id(Some("deploy-42.retry_1")).is_ok());
        let error = change_id(Some("has space")).unwrap_err().to_string();
        assert!(error.contains("--change-id"), "{error}");
        let error = change_id(Some(&"x".repeat(65))).unwrap_err().to_string();
        assert!(error.contains("1 to 64"), "{error}");
        assert_ne!(change_id(None).unwrap(), change_id(None).unwrap());
    }
}
