//! The fleet: every replica that serves the store, found through it.
//!
//! Each replica keeps one record under `replicas/` bound to a lease it
//! renews (its name and the address the others reach it at), so the records
//! of the fleet cost one key and one keep-alive per replica, never one per
//! subscriber. The replica a commander asks for status reads those records,
//! asks every other replica for its own subscribers over an internal call
//! signed with the fleet's signing key, and merges the answers; a replica
//! that does not answer is named, and the answer says it is partial.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status};

use crate::server::{ServeConfig, StoreConfig};
use crate::{convert, invalid, invalid_name, limits};
use safemode_controller::fleet::{
    ChannelCounts, MAX_FLEET, ReplicaPart, ReplicaRecord, SubscriberFilter,
};
use safemode_controller::{Controller, SubscriberCursor, SubscriberState};
use safemode_policy::{Channel as PolicyChannel, Namespace, Revision};
use safemode_wire::proto;

/// The shortest and longest lease a replica's record may have.
pub const REPLICA_TTL_RANGE: (Duration, Duration) =
    (Duration::from_secs(2), Duration::from_secs(300));

/// How a replica is reached by the others, and how it checks them.
#[derive(Clone, Debug)]
pub(crate) struct PeerSettings {
    /// The `host:port` the others dial; `None`: the bound listen address.
    pub advertise: Option<String>,
    /// CA certificates (PEM) that verify the others' certificates, when
    /// gRPC is served over TLS (required with etcd; a single replica on the
    /// embedded store has no others and uses its own chain).
    pub ca: Option<Vec<u8>>,
    /// The name the others' certificates must carry; `None`: the host of
    /// each one's address.
    pub tls_name: Option<String>,
    /// The lease of this replica's record.
    pub ttl: Duration,
}

/// Checks the fleet flags of `config` and reads the peer CA file.
pub(crate) fn peer_settings(config: &ServeConfig) -> anyhow::Result<PeerSettings> {
    let (shortest, longest) = REPLICA_TTL_RANGE;
    if config.replica_ttl < shortest || config.replica_ttl > longest {
        bail!(
            "--replica-ttl {}s is out of range: give 2s to 5m (how long a dead replica's record stays before the others stop asking it)",
            config.replica_ttl.as_secs_f64()
        );
    }
    let advertise = match &config.advertise {
        Some(address) => Some(check_address(address)?),
        None => {
            if config.listen.ip().is_unspecified()
                && matches!(config.store, StoreConfig::Etcd { .. })
            {
                bail!(
                    "--listen {} names no single host the other replicas could reach; give --advertise HOST:PORT (in Kubernetes: --advertise $(POD_IP):{})",
                    config.listen,
                    config.listen.port()
                );
            }
            None
        }
    };
    let serves_tls = config.tls_cert.is_some();
    let ca = match (&config.peer_ca, &config.tls_cert) {
        (Some(path), _) if serves_tls => Some(read_pem_certificates(path, "--peer-ca")?),
        (Some(_), _) => bail!(
            "--peer-ca is for replicas that serve TLS; give --tls-cert and --tls-key too, or drop --peer-ca"
        ),
        // Replicas that serve TLS on etcd ask each other over it: which CA
        // vouches for them is said, never guessed (a leaf alone cannot
        // verify itself unless it is self-signed).
        (None, Some(_)) if matches!(config.store, StoreConfig::Etcd { .. }) => bail!(
            "with --tls-cert and --store etcd, give --peer-ca FILE: the CA certificates that signed the replicas' certificates, which they check when they ask each other for the fleet's status (for a self-signed certificate, the --tls-cert file itself)"
        ),
        (None, Some(cert)) => Some(read_pem_certificates(cert, "--tls-cert")?),
        (None, None) => None,
    };
    let tls_name = match &config.peer_tls_name {
        Some(_) if !serves_tls => bail!(
            "--peer-tls-name is for replicas that serve TLS; give --tls-cert and --tls-key too, or drop --peer-tls-name"
        ),
        Some(name) => {
            let valid = !name.is_empty()
                && name.len() <= 253
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
            if !valid {
                bail!(
                    "bad --peer-tls-name {name:?}: give the DNS name (or IP address) the replicas' certificates carry, e.g. safemode.safemode.svc"
                );
            }
            Some(name.clone())
        }
        None => None,
    };
    Ok(PeerSettings {
        advertise,
        ca,
        tls_name,
        ttl: config.replica_ttl,
    })
}

/// `--advertise`, checked as every replica record's address is
/// ([`safemode_controller::fleet::address_problem`]).
fn check_address(address: &str) -> anyhow::Result<String> {
    match safemode_controller::fleet::address_problem(address) {
        None => Ok(address.to_string()),
        Some(why) => bail!(
            "bad --advertise {address:?}: {why}; give HOST:PORT, the address the other replicas reach this one at, e.g. 10.0.0.5:7700 or [fd00::5]:7700"
        ),
    }
}

/// The certificates in a PEM file, read to check there is at least one.
fn read_pem_certificates(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    let pem =
        std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        bail!(
            "{flag} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_advertised_address_is_host_and_port() {
        for good in [
            "10.0.0.5:7700",
            "safemode-0.safemode:7700",
            "[fd00::5]:7700",
        ] {
            assert_eq!(check_address(good).unwrap(), good);
        }
        for (bad, why) in [
            ("10.0.0.5", "no port"),
            ("http://10.0.0.5:7700", "no scheme"),
            ("10.0.0.5:0", "1 to 65535"),
            ("10.0.0.5:http", "1 to 65535"),
            (":7700", "not a DNS name"),
            ("a b:7700", "not a DNS name"),
            ("[zz]:7700", "not a DNS name"),
        ] {
            let error = check_address(bad).unwrap_err().to_string();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }
}

// === asking the fleet ===

/// How long the replica asked waits for each of the others.
pub const PEER_DEADLINE: Duration = Duration::from_secs(3);

/// How far a peer's clock may be from ours for its signed request to hold.
const REQUEST_FRESH_FOR: Duration = Duration::from_secs(60);

/// The most problems a fleet status names, then a count.
const MAX_FLEET_PROBLEMS: usize = 20;

/// What a fleet status asks each replica for.
#[derive(Clone, Debug)]
pub(crate) struct FleetQuery {
    pub namespace: Namespace,
    pub current: Revision,
    pub filter: SubscriberFilter,
    pub limit: usize,
    pub after: Option<FleetCursor>,
}

/// Where a page of a fleet status ends: a replica, and the subscriber there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FleetCursor {
    replica: String,
    cursor: SubscriberCursor,
}

impl FleetCursor {
    /// The cursor of a page token; `None` if it is not one.
    pub fn parse(token: &str) -> Option<FleetCursor> {
        let (replica, cursor) = token.split_once('/')?;
        let replica = hex_decode(replica)?;
        Some(FleetCursor {
            replica: String::from_utf8(replica).ok()?,
            cursor: SubscriberCursor::parse(cursor)?,
        })
    }

    /// The page token that continues after this cursor.
    pub fn token(&self) -> String {
        format!(
            "{}/{}",
            hex_encode(self.replica.as_bytes()),
            self.cursor.token()
        )
    }
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 512 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// One replica's answer to a fleet status.
#[derive(Clone, Debug)]
struct Answer {
    replica: String,
    address: String,
    part: Result<proto::ReplicaStatusResponse, String>,
}

/// A fleet status: every replica's part, merged.
#[derive(Clone, Debug, Default)]
pub(crate) struct Gathered {
    pub channels: Vec<proto::ChannelSummary>,
    pub subscribers: Vec<proto::SubscriberStatus>,
    pub total: usize,
    pub next: Option<FleetCursor>,
    pub replicas: Vec<proto::ReplicaAnswer>,
    pub partial: bool,
    pub problems: Vec<String>,
}

/// The replicas a fleet-wide question goes to.
pub(crate) struct Members {
    pub members: Vec<ReplicaRecord>,
    pub problems: Vec<String>,
    /// Some replicas were left out.
    pub partial: bool,
}

/// Asks every replica of the fleet for its part of a status, and merges.
pub(crate) struct Fleet {
    controller: Arc<Controller>,
    replica: String,
    /// Where the others reach this replica.
    address: String,
    peers: PeerSettings,
    /// Connections to the others, by address (at most [`MAX_FLEET`]).
    channels: Mutex<HashMap<(String, bool), Channel>>,
    /// The fleet's records as last read, asked while the store is away.
    known: Mutex<Option<Vec<ReplicaRecord>>>,
    /// Gathers under way (each may hold a page from every replica).
    gathers: tokio::sync::Semaphore,
}

/// How many fleet statuses one replica gathers at once; more wait, up to
/// [`PEER_DEADLINE`], then are refused.
pub const MAX_GATHERS: usize = 8;

impl Fleet {
    pub fn new(
        controller: Arc<Controller>,
        replica: String,
        address: String,
        peers: PeerSettings,
    ) -> Self {
        Fleet {
            controller,
            replica,
            address,
            peers,
            channels: Mutex::new(HashMap::new()),
            known: Mutex::new(None),
            gathers: tokio::sync::Semaphore::new(MAX_GATHERS),
        }
    }

    /// This replica's name.
    pub(crate) fn replica(&self) -> &str {
        &self.replica
    }

    pub(crate) fn controller(&self) -> &Controller {
        &self.controller
    }

    /// A turn to gather: at most [`MAX_GATHERS`] at once, since each holds a
    /// page from every replica.
    pub async fn admit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Status> {
        match tokio::time::timeout(PEER_DEADLINE, self.gathers.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(Status::resource_exhausted(format!(
                "this replica is gathering {MAX_GATHERS} fleet statuses already; retry in a moment"
            ))),
        }
    }

    /// The fleet's status for `query`: this replica's part from here, the
    /// others' asked in parallel within [`PEER_DEADLINE`].
    pub async fn gather(&self, query: &FleetQuery) -> Gathered {
        let Members {
            members,
            problems,
            partial,
        } = self.members().await;
        let asks = members.iter().map(|member| {
            // Before the page's replica only counts are needed; at it, the
            // page continues after its cursor; after it, from the start.
            let (after, limit) = match &query.after {
                Some(at) if member.replica < at.replica => (None, 0),
                Some(at) if member.replica == at.replica => (Some(at.cursor.clone()), query.limit),
                _ => (None, query.limit),
            };
            async move {
                let part = if member.replica == self.replica {
                    Ok(self.local_part(query, after.as_ref(), limit))
                } else {
                    self.ask(member, query, after, limit).await
                };
                Answer {
                    replica: member.replica.clone(),
                    address: member.address.clone(),
                    part,
                }
            }
        });
        let answers = futures_util::future::join_all(asks).await;
        let mut gathered = merge(answers, query, problems);
        gathered.partial |= partial;
        gathered
    }

    /// Every replica to ask, this one included, once each (by name and by
    /// address), sorted by name; with what kept any from being found.
    pub(crate) async fn members(&self) -> Members {
        let mut problems = Vec::new();
        let mut partial = false;
        let mut members: Vec<ReplicaRecord> = match self.controller.fleet().await {
            Ok((records, more)) => {
                if more > 0 {
                    partial = true;
                    problems.push(format!(
                        "the store holds {more} more replica records than the {MAX_FLEET} a status asks; those replicas were not asked, and their subscribers are missing from this status"
                    ));
                }
                *self.known.lock().expect("poisoned") = Some(records.clone());
                records
            }
            // The store is away: ask the replicas last read, as the rest of
            // the status shows what this replica last read (and says so).
            Err(e) => match self.known.lock().expect("poisoned").clone() {
                Some(known) => known,
                None => {
                    problems.push(format!(
                        "cannot read the fleet's records from the store ({e}); showing this replica's subscribers only"
                    ));
                    Vec::new()
                }
            },
        };
        // This replica answers whether or not its record is written yet.
        members.retain(|m| m.replica != self.replica);
        members.push(ReplicaRecord {
            replica: self.replica.clone(),
            address: self.address.clone(),
            tls: false,
            started_at: jiff::Timestamp::UNIX_EPOCH,
            version: String::new(),
        });
        members.sort_by(|a, b| a.replica.cmp(&b.replica));
        // One answer per replica and per address: a record copied under
        // another key (by hand, or by someone with the store's
        // credentials) must not count a replica's subscribers twice.
        let mut addresses = std::collections::HashSet::from([self.address.clone()]);
        members.dedup_by(|later, earlier| later.replica == earlier.replica);
        members.retain(|m| m.replica == self.replica || addresses.insert(m.address.clone()));
        Members {
            members,
            problems,
            partial,
        }
    }

    /// [`Fleet::gather`] of this replica's part alone, asking no other.
    pub fn gather_here(&self, query: &FleetQuery) -> Gathered {
        let after = query
            .after
            .as_ref()
            .filter(|at| at.replica == self.replica)
            .map(|at| at.cursor.clone());
        let answer = Answer {
            replica: self.replica.clone(),
            address: self.address.clone(),
            part: Ok(self.local_part(query, after.as_ref(), query.limit)),
        };
        merge(vec![answer], query, Vec::new())
    }

    /// This replica's part, as it would answer another replica.
    fn local_part(
        &self,
        query: &FleetQuery,
        after: Option<&SubscriberCursor>,
        limit: usize,
    ) -> proto::ReplicaStatusResponse {
        let part = self.controller.replica_part(
            &query.namespace,
            query.current,
            query.filter,
            after,
            limit,
        );
        part_to_wire(&self.replica, part)
    }

    /// Asks `member` for its part.
    async fn ask(
        &self,
        member: &ReplicaRecord,
        query: &FleetQuery,
        after: Option<SubscriberCursor>,
        limit: usize,
    ) -> Result<proto::ReplicaStatusResponse, String> {
        let channel = self.peer_channel(member)?;
        let mut request = proto::ReplicaStatusRequest {
            namespace: query.namespace.to_string(),
            current_revision: query.current,
            channel: query
                .filter
                .channel
                .map(|c| c.as_str().to_string())
                .unwrap_or_default(),
            state: query
                .filter
                .state
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            page_size: u32::try_from(limit).unwrap_or(u32::MAX),
            page_token: after
                .as_ref()
                .map(SubscriberCursor::token)
                .unwrap_or_default(),
            asker: self.replica.clone(),
            target: member.replica.clone(),
            issued_at: Some(safemode_wire::timestamp_to_wire(jiff::Timestamp::now())),
            key_id: String::new(),
            signature: Vec::new(),
        };
        safemode_wire::signed::sign(&mut request, self.controller.signing_key());
        let request_signature = request.signature.clone();
        let mut client = proto::fleet_service_client::FleetServiceClient::new(channel)
            .max_decoding_message_size(limits::MAX_STATUS_RESPONSE_BYTES);
        let mut call = Request::new(request);
        crate::telemetry::send_trace(call.metadata_mut());
        let mut answer =
            match tokio::time::timeout(PEER_DEADLINE, client.replica_status(call)).await {
                Ok(Ok(answer)) => answer.into_inner(),
                Ok(Err(status)) => return Err(in_words(&status)),
                Err(_) => {
                    return Err(format!("no answer within {}s", PEER_DEADLINE.as_secs_f64()));
                }
            };
        // Only a replica holding the fleet's key answers, and only this
        // request: an address in the store that leads elsewhere shows
        // nothing.
        safemode_wire::signed::verify(&mut answer, self.controller.trusted_keys())
            .map_err(|e| format!("its answer is not signed by this fleet's key ({e})"))?;
        if answer.request_signature != request_signature || answer.replica != member.replica {
            return Err(format!(
                "it answered another request, as replica {:?}",
                answer.replica
            ));
        }
        if answer.subscribers.len() > limit || answer.cursors.len() != answer.subscribers.len() {
            return Err(format!(
                "it answered {} subscribers with {} cursors for a page of {limit}",
                answer.subscribers.len(),
                answer.cursors.len()
            ));
        }
        Ok(answer)
    }

    /// A connection to `member`, made once and kept.
    pub(crate) fn peer_channel(&self, member: &ReplicaRecord) -> Result<Channel, String> {
        let key = (member.address.clone(), member.tls);
        let mut channels = self.channels.lock().expect("poisoned");
        if let Some(channel) = channels.get(&key) {
            return Ok(channel.clone());
        }
        let scheme = if member.tls { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", member.address))
            .map_err(|e| format!("its address {} is not usable: {e}", member.address))?
            .connect_timeout(PEER_DEADLINE);
        if member.tls {
            let mut tls = ClientTlsConfig::new();
            tls = match &self.peers.ca {
                Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
                None => tls.with_native_roots(),
            };
            if let Some(name) = &self.peers.tls_name {
                tls = tls.domain_name(name.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| format!("cannot set up TLS to it: {e}"))?;
        }
        // The fleet is bounded; a replica that left is forgotten when the
        // map is full.
        if channels.len() >= MAX_FLEET {
            channels.clear();
        }
        let channel = endpoint.connect_lazy();
        channels.insert(key, channel.clone());
        Ok(channel)
    }
}

/// A peer's failure in a few words: "connection refused", "the signature
/// is not trusted …".
pub(crate) fn in_words(status: &Status) -> String {
    let message = status.message();
    let source = std::error::Error::source(status)
        .map(|e| {
            let mut root: &dyn std::error::Error = e;
            while let Some(next) = root.source() {
                root = next;
            }
            root.to_string()
        })
        .unwrap_or_default();
    match (message.is_empty(), source.is_empty()) {
        (false, true) => message.to_string(),
        (_, false) => source,
        (true, true) => format!("{:?}", status.code()),
    }
}

fn part_to_wire(replica: &str, part: ReplicaPart) -> proto::ReplicaStatusResponse {
    proto::ReplicaStatusResponse {
        replica: replica.to_string(),
        applied_revision: part.applied_revision,
        channels: part
            .channels
            .iter()
            .map(|(channel, counts)| summary_to_wire(channel.as_str(), counts))
            .collect(),
        cursors: part.subscribers.iter().map(|s| s.cursor.token()).collect(),
        subscribers: part
            .subscribers
            .iter()
            .map(|s| convert::subscriber_to_wire(&s.record, replica, s.state))
            .collect(),
        more: part.more,
        subscriber_count: u32::try_from(part.total).unwrap_or(u32::MAX),
        problems: part.problems,
        request_signature: Vec::new(),
        key_id: String::new(),
        signature: Vec::new(),
    }
}

fn summary_to_wire(channel: &str, counts: &ChannelCounts) -> proto::ChannelSummary {
    proto::ChannelSummary {
        channel: channel.to_string(),
        synced: counts.get(SubscriberState::Synced),
        not_acked: counts.get(SubscriberState::NotAcked),
        stale: counts.get(SubscriberState::Stale),
        rejected: counts.get(SubscriberState::Rejected),
    }
}

/// Every replica's answer in one status: counts summed per channel, one
/// page of subscribers in (replica, subscriber) order from the query's
/// cursor, and each replica named with whether it answered.
fn merge(answers: Vec<Answer>, query: &FleetQuery, mut problems: Vec<String>) -> Gathered {
    let mut gathered = Gathered::default();
    let mut channels: BTreeMap<String, proto::ChannelSummary> = BTreeMap::new();
    let mut full = false;
    for answer in answers {
        let mut named = proto::ReplicaAnswer {
            replica: answer.replica.clone(),
            address: answer.address.clone(),
            ..proto::ReplicaAnswer::default()
        };
        let part = match answer.part {
            Ok(part) => part,
            Err(why) => {
                named.error = why.clone();
                gathered.partial = true;
                problems.push(format!(
                    "replica {} ({}) did not answer: {why}; its subscribers are missing from this status",
                    answer.replica, answer.address
                ));
                gathered.replicas.push(named);
                continue;
            }
        };
        named.answered = true;
        named.subscriber_count = part.subscriber_count;
        named.applied_revision = part.applied_revision;
        gathered.replicas.push(named);
        gathered.total += part.subscriber_count as usize;
        for summary in &part.channels {
            let sum =
                channels
                    .entry(summary.channel.clone())
                    .or_insert_with(|| proto::ChannelSummary {
                        channel: summary.channel.clone(),
                        ..proto::ChannelSummary::default()
                    });
            sum.synced = sum.synced.saturating_add(summary.synced);
            sum.not_acked = sum.not_acked.saturating_add(summary.not_acked);
            sum.stale = sum.stale.saturating_add(summary.stale);
            sum.rejected = sum.rejected.saturating_add(summary.rejected);
        }
        for problem in part.problems {
            if !problems.contains(&problem) {
                problems.push(problem);
            }
        }
        // Replicas before the page's cursor were asked for counts only.
        let before_page = query
            .after
            .as_ref()
            .is_some_and(|at| answer.replica < at.replica);
        if full || before_page {
            continue;
        }
        for (subscriber, cursor) in part.subscribers.into_iter().zip(part.cursors) {
            if gathered.subscribers.len() == query.limit {
                full = true;
                break;
            }
            gathered.subscribers.push(subscriber);
            if let Some(cursor) = SubscriberCursor::parse(&cursor) {
                gathered.next = Some(FleetCursor {
                    replica: answer.replica.clone(),
                    cursor,
                });
            }
        }
        if part.more {
            full = true;
        }
    }
    if !full {
        gathered.next = None;
    }
    gathered.channels = channels.into_values().collect();
    if problems.len() > MAX_FLEET_PROBLEMS {
        let more = problems.len() - MAX_FLEET_PROBLEMS;
        problems.truncate(MAX_FLEET_PROBLEMS);
        problems.push(format!("and {more} more problems"));
    }
    gathered.problems = problems;
    gathered
}

// === answering the fleet ===

/// `safemode.v1.FleetService`: another replica of the fleet asks for this
/// one's part of a status. No token: the request is signed with the fleet's
/// signing key, for this replica, within a minute; it is checked before
/// anything else is done.
pub struct FleetApi {
    controller: Arc<Controller>,
    replica: String,
}

impl FleetApi {
    /// The service over `controller`, on the replica called `replica`.
    pub fn new(controller: Arc<Controller>, replica: String) -> Self {
        FleetApi {
            controller,
            replica,
        }
    }
}

impl FleetApi {
    /// Checks a peer's request before anything else is done: signed with
    /// the fleet's key, for this replica, within [`REQUEST_FRESH_FOR`].
    fn check_peer<M: safemode_wire::signed::SelfSigned>(
        &self,
        request: &mut M,
        fields: impl Fn(&M) -> (&String, Option<&safemode_wire::prost_types::Timestamp>),
    ) -> Result<(), Status> {
        safemode_wire::signed::verify(request, self.controller.trusted_keys()).map_err(|e| {
            Status::unauthenticated(format!(
                "not a replica of this fleet: {e}; replicas sign these requests with the fleet's signing key (--signing-key)"
            ))
        })?;
        let (target, issued_at) = fields(request);
        if *target != self.replica {
            return Err(Status::failed_precondition(format!(
                "this is replica {}, not {:?}: the fleet's record of that replica is out of date",
                self.replica, target
            )));
        }
        let issued = issued_at
            .and_then(|t| safemode_wire::timestamp_from_wire(t).ok())
            .ok_or_else(|| invalid("issued_at", "missing or not a time"))?;
        let skew = jiff::Timestamp::now().duration_since(issued).unsigned_abs();
        if skew > REQUEST_FRESH_FOR {
            return Err(Status::unauthenticated(format!(
                "the request was signed {}s away from this replica's clock (at most {}s): check the replicas' clocks",
                skew.as_secs(),
                REQUEST_FRESH_FOR.as_secs()
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl proto::fleet_service_server::FleetService for FleetApi {
    async fn replica_reports(
        &self,
        request: Request<proto::ReplicaReportsRequest>,
    ) -> Result<Response<proto::ReplicaReportsResponse>, Status> {
        let mut request = request.into_inner();
        self.check_peer(&mut request, |r| (&r.target, r.issued_at.as_ref()))?;
        let namespace = Namespace::parse(&request.namespace).map_err(invalid_name("namespace"))?;
        let window = crate::insights::window(request.window_seconds, "window_seconds")?;
        let tallies = self
            .controller
            .reports()
            .tallies(&namespace, window, jiff::Timestamp::now());
        let mut answer = crate::insights::tallies_to_wire(&self.replica, tallies);
        answer.request_signature = request.signature;
        safemode_wire::signed::sign(&mut answer, self.controller.signing_key());
        Ok(Response::new(answer))
    }

    async fn replica_status(
        &self,
        request: Request<proto::ReplicaStatusRequest>,
    ) -> Result<Response<proto::ReplicaStatusResponse>, Status> {
        let mut request = request.into_inner();
        self.check_peer(&mut request, |r| (&r.target, r.issued_at.as_ref()))?;
        let namespace = Namespace::parse(&request.namespace).map_err(invalid_name("namespace"))?;
        let filter = filter(&request.channel, &request.state)?;
        let limit = request.page_size as usize;
        if limit > limits::STATUS_PAGE_MAX {
            return Err(invalid(
                "page_size",
                format!("{limit} is more than {}", limits::STATUS_PAGE_MAX),
            ));
        }
        let after = match request.page_token.as_str() {
            "" => None,
            token => Some(
                SubscriberCursor::parse(token)
                    .ok_or_else(|| invalid("page_token", "is not a token this replica gave"))?,
            ),
        };
        let part = self.controller.replica_part(
            &namespace,
            request.current_revision,
            filter,
            after.as_ref(),
            limit,
        );
        let mut answer = part_to_wire(&self.replica, part);
        answer.request_signature = request.signature;
        safemode_wire::signed::sign(&mut answer, self.controller.signing_key());
        Ok(Response::new(answer))
    }
}

/// The status filters of a request: a channel and a state, each optional.
pub(crate) fn filter(channel: &str, state: &str) -> Result<SubscriberFilter, Status> {
    let channel = match channel {
        "" => None,
        name => Some(PolicyChannel::parse(name).map_err(invalid_name("channel"))?),
    };
    let state = match state {
        "" => None,
        name => Some(SubscriberState::parse(name).ok_or_else(|| {
            invalid(
                "state",
                format!(
                    "{name:?} is not a subscriber state; give one of synced, not_acked, stale, rejected"
                ),
            )
        })?),
    };
    Ok(SubscriberFilter { channel, state })
}
