//! `EtcdStore`: the production store, over etcd v3 with the `etcd-client`
//! crate. Only this module knows etcd's API.
//!
//! The store's semantics are etcd's own, so most calls map one to one. Two
//! things are added for the controller's sake:
//!
//! - watches ask for leader-backed streams (`require_leader`), so a member
//!   cut off from the cluster ends the stream instead of going silent;
//! - a watch stream asks for a progress notification every
//!   `progress_interval`, and treats a stream that says nothing for
//!   `quiet_deadline` as dead (etcd can leave a watch hanging when a member is
//!   killed), so the caller reconnects.
//!
//! Progress notifications are liveness signals only, never batches: etcd 3.4
//! answers a progress request with its current revision even while the
//! watcher is still catching up on older events, so treating that revision as
//! "delivered up to here" would make the caller drop the events still coming.
//!
//! ## One client per member, explicit failover
//!
//! `etcd_client::Client::connect` with several endpoints puts them all behind
//! one tonic balanced channel (tower's power-of-two-choices balancer over
//! lazily reconnecting connections). A member that was killed stays in that
//! rotation: tonic's reconnecting service reports itself ready and fails the
//! call itself ("tcp connect error: Connection refused"), so the balancer
//! keeps picking it and nothing retries. That was issue 10's finding 8.
//!
//! So the store holds one client per member and chooses itself: every call
//! goes to the member that answered last, and a failure that proves the
//! request never reached etcd's consensus (the connection was refused, the
//! member has no leader) moves on to the next member at once. Reads,
//! watches and compaction are idempotent, so they also move on after an
//! ambiguous failure (leader changed, a timeout, a connection cut mid-call).
//! A transaction after an ambiguous failure may have been applied: it is
//! not sent again here but returned as [`Error::Unavailable`] saying so,
//! and the controller resolves it by the change id it carries
//! (`controller/change.rs`). Every call is bounded: at most
//! [`EtcdOptions::call_deadline`] in all, and [`ROUNDS`] passes over the
//! members, with a short jittered pause between passes while the cluster
//! elects a leader; when every member refuses the connection for
//! [`REFUSED_FOR`], etcd is down rather than electing, and the call gives
//! up then. [`Store::probe`] (status's health check) makes one pass only.
//!
//! Errors say why in plain words ("connection refused", "etcd has no
//! leader"), with etcd's own error kept as the cause.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, CompactionOptions, Compare as EtcdCompare, CompareOp, ConnectOptions,
    EventType, GetOptions, Identity, PutOptions, TlsOptions, Txn as EtcdTxn, TxnOp, WatchOptions,
};
use futures_util::StreamExt;
use tokio::time::{Instant, MissedTickBehavior};

use safemode_support::backoff::Backoff;
use safemode_support::pem;

use super::{
    Cause, Compare, Error, Event, EventKind, KeyValue, Lease, Op, RangePage, RangeResult, Result,
    Revision, Store, Txn, TxnOutcome, WatchBatch, WatchStream,
};

/// TLS to etcd, for `https://` endpoints: PEM files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// CA certificates that vouch for the members; without it, the
    /// platform's.
    pub ca_cert: Option<PathBuf>,
    /// A client certificate and its key, for a cluster that asks for one
    /// (`--client-cert-auth`).
    pub cert: Option<PathBuf>,
    /// The client certificate's key.
    pub key: Option<PathBuf>,
}

impl EtcdTls {
    /// Whether no file is given.
    pub fn is_empty(&self) -> bool {
        *self == EtcdTls::default()
    }

    /// The TLS settings for the client, with every file read and checked.
    pub fn client_config(&self) -> std::result::Result<TlsOptions, String> {
        let mut config = TlsOptions::new();
        config = match &self.ca_cert {
            Some(path) => {
                let pem = pem::certificates(path)
                    .map_err(|e| pem::describe("the etcd CA certificate", path, &e))?;
                config.ca_certificate(Certificate::from_pem(pem))
            }
            None => config.with_native_roots(),
        };
        match (&self.cert, &self.key) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                let cert = pem::certificates(cert)
                    .map_err(|e| pem::describe("the etcd client certificate", cert, &e))?;
                let key = pem::private_key(key)
                    .map_err(|e| pem::describe("the etcd client key", key, &e))?;
                config = config.identity(Identity::from_pem(cert, key));
            }
            (Some(_), None) => {
                return Err(
                    "--etcd-cert needs --etcd-key: give the client certificate's key too".into(),
                );
            }
            (None, Some(_)) => {
                return Err("--etcd-key needs --etcd-cert: give the client certificate too".into());
            }
        }
        Ok(config)
    }
}

/// How to reach etcd.
#[derive(Clone)]
pub struct EtcdOptions {
    /// Client URLs of the members, e.g. `http://10.0.0.5:2379`.
    pub endpoints: Vec<String>,
    /// TLS for `https://` endpoints (see [`EtcdTls::client_config`]).
    pub tls: Option<TlsOptions>,
    /// Limit on connecting to a member.
    pub connect_timeout: Duration,
    /// Limit on one request to one member (not on a watch stream).
    pub request_timeout: Duration,
    /// Limit on one call in all, across every member it tries.
    pub call_deadline: Duration,
    /// How often a watch asks for a progress notification.
    pub progress_interval: Duration,
    /// A watch that receives nothing for this long is treated as dead.
    pub quiet_deadline: Duration,
}

/// Not derived: the TLS settings hold the client's private key.
impl std::fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls.as_ref().map(|_| "(configured)"))
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("call_deadline", &self.call_deadline)
            .field("progress_interval", &self.progress_interval)
            .field("quiet_deadline", &self.quiet_deadline)
            .finish()
    }
}

impl EtcdOptions {
    /// Defaults for everything but the endpoints, reached without TLS.
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdOptions {
            endpoints,
            tls: None,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            call_deadline: Duration::from_secs(12),
            progress_interval: Duration::from_secs(2),
            quiet_deadline: Duration::from_secs(8),
        }
    }

    /// Defaults for everything but `endpoints` and `tls`, checked: URLs,
    /// all `http://` or all `https://`, TLS files only with `https://`
    /// (read and checked now). The error says what to change.
    pub fn checked(endpoints: Vec<String>, tls: &EtcdTls) -> std::result::Result<Self, String> {
        if endpoints.is_empty() {
            return Err("the etcd store needs --etcd-endpoints, e.g. http://127.0.0.1:2379".into());
        }
        if let Some(endpoint) = endpoints
            .iter()
            .find(|e| !e.starts_with("http://") && !e.starts_with("https://"))
        {
            return Err(format!(
                "--etcd-endpoints '{endpoint}' is not a URL; write e.g. http://10.0.0.5:2379 (or https:// for TLS)"
            ));
        }
        let https = endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        let tls = if https == 0 {
            if !tls.is_empty() {
                return Err("--etcd-ca-cert, --etcd-cert and --etcd-key are for TLS to etcd: write the endpoints as https://HOST:2379".into());
            }
            None
        } else if https < endpoints.len() {
            return Err(
                "--etcd-endpoints mixes http:// and https://; reach every member the same way"
                    .into(),
            );
        } else {
            Some(tls.client_config()?)
        };
        Ok(EtcdOptions {
            tls,
            ..EtcdOptions::new(endpoints)
        })
    }
}

/// How long a call keeps trying while every member refuses the connection
/// (nothing listens: etcd is down, not electing) before it gives up: long
/// enough for a member's restart, short enough that a commander hears at
/// once that etcd is down.
pub const REFUSED_FOR: Duration = Duration::from_secs(2);

/// How many passes over the members one call makes at most (an election
/// takes a second or two; the pauses between passes grow to a second).
pub const ROUNDS: usize = 16;

/// The store over an etcd cluster.
pub struct EtcdStore {
    /// One client per member, in the order of `options.endpoints`.
    members: Vec<Client>,
    /// The member that answered last: where the next call starts.
    preferred: AtomicUsize,
    options: EtcdOptions,
}

/// Whether a failed call may have reached etcd's consensus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// It never did (no connection, no leader on that member): any call may
    /// go to another member at once.
    NotSent,
    /// It may have: a transaction may have been applied.
    Ambiguous,
    /// etcd refused the request itself; another member would too.
    Final,
}

/// Whether a call may be sent again after an ambiguous failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Repeat {
    /// Reads, watches, compaction: sending twice changes nothing.
    Idempotent,
    /// A transaction: sent again only when it never arrived.
    OnlyUnsent,
}

impl EtcdStore {
    /// Connects and checks that the cluster answers, so a wrong endpoint is
    /// reported at start rather than on the first request. One member down
    /// is not an error: the check fails over like every call.
    pub async fn connect(options: EtcdOptions) -> Result<Self> {
        if options.endpoints.is_empty() {
            return Err(Error::InvalidRequest(
                "no etcd endpoints given; pass --etcd-endpoints http://HOST:2379[,...]".into(),
            ));
        }
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_timeout(options.request_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_require_leader(true);
        if let Some(tls) = &options.tls {
            connect = connect.with_tls(tls.clone());
        }
        let mut members = Vec::with_capacity(options.endpoints.len());
        for endpoint in &options.endpoints {
            // Connecting is lazy: this checks the URL and TLS settings, and
            // dials on the first call.
            let client = Client::connect([endpoint], Some(connect.clone()))
                .await
                .map_err(|e| unreachable(&options.endpoints, e))?;
            members.push(client);
        }
        let store = EtcdStore {
            members,
            preferred: AtomicUsize::new(0),
            options,
        };
        store
            .call(Repeat::Idempotent, |client| async move {
                client
                    .kv_client()
                    .get("/", Some(GetOptions::new().with_count_only()))
                    .await
            })
            .await
            .map_err(|(e, _)| unreachable(&store.options.endpoints, e))?;
        Ok(store)
    }

    /// Runs `request` on one member after another, starting with the one
    /// that answered last, until one answers, the failure is final, or the
    /// bounds (deadline, [`ROUNDS`]) are spent. Returns the last error and
    /// whether a transaction may have been applied.
    async fn call<T, F, Fut>(
        &self,
        repeat: Repeat,
        mut request: F,
    ) -> std::result::Result<T, (etcd_client::Error, Failure)>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.options.call_deadline;
        let count = self.members.len();
        let mut pause = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        let mut last = None;
        // Since when every member has refused the connection, pass after
        // pass: nothing listens where etcd should be, which no election
        // explains.
        let mut all_refused_since: Option<Instant> = None;
        for round in 0..ROUNDS {
            if round > 0 {
                if all_refused_since.is_some_and(|since| since.elapsed() >= REFUSED_FOR) {
                    break;
                }
                // Every member failed: most likely an election is under way.
                let wait = pause.next_delay();
                if Instant::now() + wait >= deadline {
                    break;
                }
                tokio::time::sleep(wait).await;
            }
            let start = self.preferred.load(Ordering::Relaxed);
            let mut refusals = 0;
            for step in 0..count {
                let index = (start + step) % count;
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    break;
                };
                let attempt = tokio::time::timeout(left, request(self.members[index].clone()));
                let error = match attempt.await {
                    Ok(Ok(answer)) => {
                        self.preferred.store(index, Ordering::Relaxed);
                        return Ok(answer);
                    }
                    Ok(Err(error)) => error,
                    Err(_) => {
                        etcd_client::Error::GRpcStatus(tonic::Status::deadline_exceeded(format!(
                            "no answer from etcd within {:?}",
                            self.options.call_deadline
                        )))
                    }
                };
                let failure = classify(&error);
                if refused(&error) {
                    refusals += 1;
                }
                tracing::debug!(
                    member = %self.options.endpoints[index],
                    ?failure,
                    error = %describe(&error),
                    "etcd call failed"
                );
                match failure {
                    Failure::Final => return Err((error, failure)),
                    Failure::Ambiguous if repeat == Repeat::OnlyUnsent => {
                        self.move_on(index);
                        return Err((error, failure));
                    }
                    Failure::NotSent | Failure::Ambiguous => {
                        self.move_on(index);
                        last = Some((error, failure));
                    }
                }
            }
            if refusals == count {
                all_refused_since.get_or_insert_with(Instant::now);
            } else {
                all_refused_since = None;
            }
        }
        Err(last.unwrap_or_else(|| {
            (
                etcd_client::Error::GRpcStatus(tonic::Status::deadline_exceeded(format!(
                    "no answer from etcd within {:?}",
                    self.options.call_deadline
                ))),
                Failure::NotSent,
            )
        }))
    }

    /// After member `failed` failed: the next call starts with the member
    /// after it, unless another call already moved on.
    fn move_on(&self, failed: usize) {
        let next = (failed + 1) % self.members.len();
        let _ = self
            .preferred
            .compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// Sorts an etcd failure by whether the request may have reached consensus.
/// Only failures known to happen before that are [`Failure::NotSent`]; when
/// in doubt, a failure is ambiguous.
fn classify(error: &etcd_client::Error) -> Failure {
    let status = match error {
        etcd_client::Error::GRpcStatus(status) => status,
        // Building a channel or an endpoint: nothing was sent.
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            return Failure::NotSent;
        }
        _ => return Failure::Ambiguous,
    };
    let described = safemode_support::errors::join_causes(
        status.message().to_string(),
        std::error::Error::source(status),
    );
    match status.code() {
        tonic::Code::InvalidArgument
        | tonic::Code::OutOfRange
        | tonic::Code::FailedPrecondition
        | tonic::Code::PermissionDenied
        | tonic::Code::Unauthenticated
        | tonic::Code::ResourceExhausted
        | tonic::Code::AlreadyExists
        | tonic::Code::NotFound
        | tonic::Code::Unimplemented => Failure::Final,
        // TLS refused either way: a configuration to fix (the message says
        // what), not a member to wait for.
        _ if [
            "certificate",
            "Certificate",
            "UnknownIssuer",
            "NotValidForName",
        ]
        .iter()
        .any(|sign| described.contains(sign)) =>
        {
            Failure::Final
        }
        // No connection could be made, or the member answered before
        // proposing anything: `require_leader` makes a member without a
        // leader refuse at once, and an overloaded one refuses up front.
        _ if [
            "tcp connect error",
            "error trying to connect",
            "Connection refused",
            "dns error",
            "etcdserver: no leader",
            "etcdserver: not capable",
            "etcdserver: too many requests",
        ]
        .iter()
        .any(|sign| described.contains(sign)) =>
        {
            Failure::NotSent
        }
        // "leader changed", "request timed out", a cut connection, a
        // deadline: the request may have been proposed.
        _ => Failure::Ambiguous,
    }
}

fn unreachable(endpoints: &[String], error: etcd_client::Error) -> Error {
    let described = describe(&error);
    // TLS failures say what is wrong in rustls' words; say what to check.
    let hint = if described.contains("UnknownIssuer") {
        "; give --etcd-ca-cert the CA that signed the etcd members' certificates"
    } else if described.contains("NotValidForName") {
        "; the member's certificate does not name the host in --etcd-endpoints: use a name it lists"
    } else if described.contains("BadCertificate") || described.contains("CertificateRequired") {
        "; etcd refused this client's certificate (or its lack of one): give --etcd-cert and --etcd-key, signed by a CA in etcd's --trusted-ca-file"
    } else {
        ""
    };
    let message = format!(
        "cannot reach etcd at {}: {described}{hint}",
        endpoints.join(","),
    );
    Error::Unavailable(Cause::new(message, error))
}

/// An etcd error for people: a gRPC status's message and the causes behind
/// it, rather than the status's debug form.
fn describe(error: &etcd_client::Error) -> String {
    match error {
        etcd_client::Error::GRpcStatus(status) => safemode_support::errors::join_causes(
            status.message().to_string(),
            std::error::Error::source(status),
        ),
        other => safemode_support::errors::error_chain(other),
    }
}

/// Maps an etcd error: the cluster refusing a malformed request is the
/// caller's bug; anything else may pass (no leader, member down, timeout).
fn etcd_error(error: etcd_client::Error) -> Error {
    match &error {
        etcd_client::Error::GRpcStatus(status)
            if status.code() == tonic::Code::InvalidArgument
                || status.code() == tonic::Code::OutOfRange =>
        {
            let message = status.message().to_owned();
            Error::InvalidRequest(Cause::new(message, error))
        }
        _ => Error::Unavailable(Cause::new(plain_words(&error), error)),
    }
}

/// Why etcd could not be used, in the words a person at 3 a.m. needs
/// ("connection refused"), not tonic's chain of transport errors; the error
/// itself stays the cause's source.
fn plain_words(error: &etcd_client::Error) -> String {
    let described = describe(error);
    let has = |sign: &str| described.contains(sign);
    if has("Connection refused") || has("connection refused") {
        "connection refused".into()
    } else if has("no leader") {
        "etcd has no leader (too few members are up to elect one)".into()
    } else if has("dns error") || has("failed to lookup address") {
        "its host name does not resolve".into()
    } else if has("Connection reset") || has("connection reset") {
        "the connection was reset".into()
    } else {
        described
    }
}

/// Whether etcd refused the connection itself: nothing listens there.
fn refused(error: &etcd_client::Error) -> bool {
    let described = describe(error);
    described.contains("Connection refused") || described.contains("connection refused")
}

fn key_string(key: &[u8]) -> Result<String> {
    String::from_utf8(key.to_vec())
        .map_err(|_| Error::Corrupt(format!("etcd key {key:?} is not UTF-8")))
}

fn key_value(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    Ok(KeyValue {
        key: key_string(kv.key())?,
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    })
}

/// Options for every key under `prefix` (the empty prefix is every key).
fn prefix_range(prefix: &str) -> (String, GetOptions) {
    if prefix.is_empty() {
        ("\0".to_string(), GetOptions::new().with_all_keys())
    } else {
        (prefix.to_string(), GetOptions::new().with_prefix())
    }
}

/// The first key after every key that starts with `prefix` (etcd's range
/// end for a prefix); `None` when there is none (no end: to the last key).
fn prefix_end(prefix: &str) -> Option<Vec<u8>> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A range read at a revision etcd no longer has is answered with
/// OUT_OF_RANGE and "required revision has been compacted".
fn range_error(error: etcd_client::Error, revision: Revision) -> Error {
    if let etcd_client::Error::GRpcStatus(status) = &error
        && status.message().contains("compacted")
    {
        // etcd does not say up to where; the requested revision is the
        // newest one known to be gone.
        return Error::Compacted {
            requested: revision,
            compacted: revision,
        };
    }
    etcd_error(error)
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<Revision> {
    header
        .map(|h| h.revision())
        .ok_or_else(|| Error::Unavailable("etcd answered without a response header".into()))
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn range(&self, prefix: &str) -> Result<RangeResult> {
        let (key, options) = prefix_range(prefix);
        let response = self
            .call(Repeat::Idempotent, |client| {
                let (key, options) = (key.clone(), options.clone());
                async move { client.kv_client().get(key, Some(options)).await }
            })
            .await
            .map_err(|(e, _)| etcd_error(e))?;
        let kvs = response
            .kvs()
            .iter()
            .map(key_value)
            .collect::<Result<Vec<_>>>()?;
        Ok(RangeResult {
            kvs,
            revision: header_revision(response.header())?,
        })
    }

    async fn range_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        revision: Revision,
    ) -> Result<RangePage> {
        super::check_page_limit(limit)?;
        if revision < 0 {
            return Err(Error::InvalidRequest(
                format!("a page is read at revision 0 (now) or later, not {revision}").into(),
            ));
        }
        // Keys sort as bytes, so the first key after `start_after` is
        // `start_after` followed by a zero byte.
        let start = match start_after {
            Some(after) if after.as_bytes() >= prefix.as_bytes() => {
                let mut key = after.as_bytes().to_vec();
                key.push(0);
                key
            }
            _ if prefix.is_empty() => vec![0],
            _ => prefix.as_bytes().to_vec(),
        };
        let mut options = GetOptions::new()
            .with_limit(limit as i64)
            .with_revision(revision);
        options = match prefix_end(prefix) {
            Some(end) => options.with_range(end),
            None => options.with_from_key(),
        };
        let response = self
            .call(Repeat::Idempotent, |client| {
                let (start, options) = (start.clone(), options.clone());
                async move { client.kv_client().get(start, Some(options)).await }
            })
            .await
            .map_err(|(e, _)| range_error(e, revision))?;
        let kvs = response
            .kvs()
            .iter()
            .map(key_value)
            .collect::<Result<Vec<_>>>()?;
        Ok(RangePage {
            kvs,
            revision: if revision == 0 {
                header_revision(response.header())?
            } else {
                revision
            },
            more: response.more(),
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        let compares: Vec<EtcdCompare> = txn
            .compares
            .into_iter()
            .map(|compare| match compare {
                // etcd's idiom for "the key does not exist".
                Compare::ModRevision { key, revision: 0 } => {
                    EtcdCompare::version(key, CompareOp::Equal, 0)
                }
                Compare::ModRevision { key, revision } => {
                    EtcdCompare::mod_revision(key, CompareOp::Equal, revision)
                }
            })
            .collect();
        let ops: Vec<TxnOp> = txn
            .ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value } => TxnOp::put(key, value, None),
                Op::Delete { key } => TxnOp::delete(key, None),
            })
            .collect();
        let txn = EtcdTxn::new().when(compares).and_then(ops);
        let response = self
            .call(Repeat::OnlyUnsent, |client| {
                let txn = txn.clone();
                async move { client.kv_client().txn(txn).await }
            })
            .await
            .map_err(|(e, failure)| match failure {
                Failure::Ambiguous => {
                    Error::Unavailable(Cause::new(plain_words(&e), e).maybe_applied())
                }
                _ => etcd_error(e),
            })?;
        let revision = header_revision(response.header())?;
        Ok(if response.succeeded() {
            TxnOutcome::Committed { revision }
        } else {
            TxnOutcome::CompareFailed { revision }
        })
    }

    async fn put_leased(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<Lease> {
        let seconds = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        // Granted again on a retry, an unused lease lapses by itself.
        let lease = self
            .call(Repeat::Idempotent, |client| async move {
                client.lease_client().grant(seconds, None).await
            })
            .await
            .map_err(|(e, _)| etcd_error(e))?
            .id();
        let put = self
            .call(Repeat::Idempotent, |client| {
                let (key, value) = (key.to_string(), value.clone());
                async move {
                    client
                        .kv_client()
                        .put(key, value, Some(PutOptions::new().with_lease(lease)))
                        .await
                }
            })
            .await;
        if let Err((e, _)) = put {
            let _ = self.revoke_lease(Lease::Etcd(lease)).await;
            return Err(etcd_error(e));
        }
        Ok(Lease::Etcd(lease))
    }

    async fn renew_lease(&self, lease: Lease) -> Result<bool> {
        let Lease::Etcd(id) = lease else {
            return Ok(true);
        };
        // etcd-client's keep_alive sends one renewal and reads its answer
        // (a lapsed lease answers with no time to live, which it reports as
        // "lease not found"); the stream is then dropped.
        let renewed = self
            .call(Repeat::Idempotent, |client| async move {
                match client.lease_client().keep_alive(id).await {
                    Ok(_) => Ok(true),
                    Err(etcd_client::Error::LeaseKeepAliveError(why))
                        if why.contains("lease not found") =>
                    {
                        Ok(false)
                    }
                    Err(e) => Err(e),
                }
            })
            .await
            .map_err(|(e, _)| etcd_error(e))?;
        Ok(renewed)
    }

    async fn revoke_lease(&self, lease: Lease) -> Result<()> {
        let Lease::Etcd(id) = lease else {
            return Ok(());
        };
        match self
            .call(Repeat::Idempotent, |client| async move {
                client.lease_client().revoke(id).await
            })
            .await
        {
            Ok(_) => Ok(()),
            // Lapsed already: its key is gone, which is what was asked.
            Err((e, _)) if e.to_string().contains("lease not found") => Ok(()),
            Err((e, _)) => Err(etcd_error(e)),
        }
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream> {
        if from < 1 {
            return Err(Error::InvalidRequest(
                format!("a watch starts at revision 1 or later, not {from}").into(),
            ));
        }
        let (key, _) = prefix_range(prefix);
        let mut options = WatchOptions::new()
            .with_start_revision(from)
            .with_progress_notify();
        options = if prefix.is_empty() {
            options.with_all_keys()
        } else {
            options.with_prefix()
        };
        let stream = self
            .call(Repeat::Idempotent, |client| {
                let (key, options) = (key.clone(), options.clone());
                async move { client.watch_client().watch(key, Some(options)).await }
            })
            .await
            .map_err(|(e, _)| etcd_error(e))?;
        let state = WatchState {
            stream,
            from,
            progress_interval: self.options.progress_interval,
            quiet_deadline: self.options.quiet_deadline,
            ended: false,
        };
        Ok(futures_util::stream::unfold(state, WatchState::next_item).boxed())
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        let result = self
            .call(Repeat::Idempotent, |client| async move {
                client
                    .kv_client()
                    .compact(revision, Some(CompactionOptions::new().with_physical()))
                    .await
            })
            .await
            .map_err(|(e, _)| e);
        match result {
            Ok(_) => Ok(()),
            // Compacting at or below an earlier compaction changes nothing.
            Err(etcd_client::Error::GRpcStatus(status))
                if status
                    .message()
                    .contains("required revision has been compacted") =>
            {
                Ok(())
            }
            Err(e) => Err(etcd_error(e)),
        }
    }

    fn describe(&self) -> String {
        format!("etcd:{}", self.options.endpoints.join(","))
    }

    fn place(&self) -> super::Place {
        super::Place::Etcd {
            endpoints: self.options.endpoints.clone(),
        }
    }

    /// One pass over the members, starting with the one that answered
    /// last, within `within` in all: no waiting for an election, so a
    /// status call on a dead etcd answers at once with etcd's reason.
    async fn probe(&self, key: &str, within: Duration) -> Result<RangeResult> {
        let deadline = Instant::now() + within;
        let count = self.members.len();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last = None;
        for step in 0..count {
            let index = (start + step) % count;
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            let mut kv = self.members[index].kv_client();
            match tokio::time::timeout(left, kv.get(key.to_string(), None)).await {
                Ok(Ok(response)) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    let kvs = response
                        .kvs()
                        .iter()
                        .map(key_value)
                        .collect::<Result<Vec<_>>>()?;
                    return Ok(RangeResult {
                        kvs,
                        revision: header_revision(response.header())?,
                    });
                }
                Ok(Err(error)) => last = Some(etcd_error(error)),
                Err(_) => break,
            }
        }
        Err(last.unwrap_or_else(|| {
            Error::Unavailable(format!("no answer within {}", super::seconds(within)).into())
        }))
    }
}

/// One etcd watch, turned into [`WatchBatch`]es.
struct WatchState {
    stream: etcd_client::WatchStream,
    from: Revision,
    progress_interval: Duration,
    quiet_deadline: Duration,
    ended: bool,
}

impl WatchState {
    async fn next_item(mut self) -> Option<(Result<WatchBatch>, Self)> {
        if self.ended {
            return None;
        }
        let item = self.next_batch().await;
        self.ended = item.is_err();
        Some((item, self))
    }

    async fn next_batch(&mut self) -> Result<WatchBatch> {
        let mut heard = Instant::now();
        let mut ask = tokio::time::interval_at(
            Instant::now() + self.progress_interval,
            self.progress_interval,
        );
        ask.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = self.stream.message() => {
                    let response = match message {
                        Ok(Some(response)) => response,
                        Ok(None) => return Err(Error::Unavailable("the etcd watch stream ended".into())),
                        Err(e) => return Err(etcd_error(e)),
                    };
                    heard = Instant::now();
                    if response.canceled() {
                        if response.compact_revision() > 0 {
                            return Err(Error::Compacted {
                                requested: self.from,
                                compacted: response.compact_revision() - 1,
                            });
                        }
                        return Err(Error::Unavailable(format!(
                            "etcd cancelled the watch: {}",
                            response.cancel_reason()
                        ).into()));
                    }
                    // The creation answer and progress notifications carry
                    // etcd's current revision, not a promise that everything
                    // up to it was delivered (see the module doc): they only
                    // show the stream is alive.
                    let Some(last) = response.events().last() else {
                        continue;
                    };
                    let revision = last.kv().map_or(self.from, |kv| kv.mod_revision());
                    let events = response
                        .events()
                        .iter()
                        .map(event)
                        .collect::<Result<Vec<_>>>()?;
                    self.from = revision + 1;
                    return Ok(WatchBatch { revision, events });
                }
                _ = ask.tick() => {
                    if heard.elapsed() > self.quiet_deadline {
                        return Err(Error::Unavailable(format!(
                            "the etcd watch said nothing for {:?}; reconnecting",
                            self.quiet_deadline
                        ).into()));
                    }
                    self.stream.request_progress().await.map_err(etcd_error)?;
                }
            }
        }
    }
}

fn event(event: &etcd_client::Event) -> Result<Event> {
    let kv = event
        .kv()
        .ok_or_else(|| Error::Corrupt("etcd sent a watch event without a key".into()))?;
    Ok(Event {
        kind: match event.event_type() {
            EventType::Put => EventKind::Put,
            EventType::Delete => EventKind::Delete,
        },
        kv: key_value(kv)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: tonic::Code, message: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::new(code, message))
    }

    #[test]
    fn failures_are_said_in_plain_words() {
        use tonic::Code::*;
        let cases = [
            (
                Unavailable,
                "tcp connect error: Connection refused (os error 111)",
                "connection refused",
            ),
            (
                Unavailable,
                "etcdserver: no leader",
                "etcd has no leader (too few members are up to elect one)",
            ),
            (
                Unavailable,
                "dns error: failed to lookup address information",
                "its host name does not resolve",
            ),
            (
                Unavailable,
                "error reading a body from connection: Connection reset by peer",
                "the connection was reset",
            ),
            (
                DeadlineExceeded,
                "no answer from etcd within 12s",
                "no answer from etcd within 12s",
            ),
        ];
        for (code, message, expected) in cases {
            assert_eq!(plain_words(&status(code, message)), expected, "{message}");
        }
        assert!(refused(&status(
            Unavailable,
            "tcp connect error: Connection refused (os error 111)"
        )));
        assert!(!refused(&status(Unavailable, "etcdserver: no leader")));
    }

    #[test]
    fn only_failures_before_consensus_count_as_not_sent() {
        use tonic::Code::*;
        let cases = [
            (
                Unavailable,
                "tcp connect error: Connection refused (os error 111)",
                Failure::NotSent,
            ),
            (Unavailable, "etcdserver: no leader", Failure::NotSent),
            (
                Unavailable,
                "error trying to connect: invalid peer certificate: UnknownIssuer",
                Failure::Final,
            ),
            (
                Unavailable,
                "etcdserver: too many requests",
                Failure::NotSent,
            ),
            (
                Unavailable,
                "etcdserver: leader changed",
                Failure::Ambiguous,
            ),
            (
                Unavailable,
                "etcdserver: request timed out",
                Failure::Ambiguous,
            ),
            (
                Unavailable,
                "error reading a body from connection: connection reset",
                Failure::Ambiguous,
            ),
            (
                DeadlineExceeded,
                "context deadline exceeded",
                Failure::Ambiguous,
            ),
            (Unknown, "h2 protocol error", Failure::Ambiguous),
            (
                InvalidArgument,
                "etcdserver: duplicate key given in txn request",
                Failure::Final,
            ),
            (
                OutOfRange,
                "etcdserver: mvcc: required revision has been compacted",
                Failure::Final,
            ),
            (
                ResourceExhausted,
                "etcdserver: mvcc: database space exceeded",
                Failure::Final,
            ),
        ];
        for (code, message, expected) in cases {
            assert_eq!(
                classify(&status(code, message)),
                expected,
                "{code:?} {message}"
            );
        }
    }
}
