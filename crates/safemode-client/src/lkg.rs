//! Last-known-good: the newest applied snapshot, kept in a local file so that
//! a channel service that restarts while the controller is unreachable still
//! enforces the modes that were active.
//!
//! The file is written atomically (a fresh temporary file in the same
//! directory, readable only by its owner, synced, renamed over the old one,
//! the directory synced) and checked when read: a first line naming the
//! format, a second line (JSON) with the payload's length and SHA-256 and
//! when the policy was last known current, then the snapshot exactly as the
//! controller sent it (protobuf), with the controller's signature. The
//! checksum only finds damage (whoever edits the file can recompute it); the
//! signature is what makes the file trusted: it is verified against the
//! subscriber's trusted keys on every load, so an edited policy, or one no
//! controller of this service signed, is refused. A "last known current"
//! time in the future (beyond a minute of clock adjustment) is refused too:
//! it would make an old policy look current for as long as it likes. A file
//! that fails any check is refused whole, never half-trusted. The "last known current" time is rewritten as
//! heartbeats confirm the policy, so a service that restarts cut off from
//! the controller counts its staleness from then, not from its restart.

use std::io;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use jiff::Timestamp;

use prost::Message as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::PolicySnapshot;
use safemode_policy::{Channel, Namespace};
use safemode_signing::TrustedKeys;
use safemode_support::files::{self, Existing, Readers, directory};
use safemode_wire::{self as wire, proto};

/// Version 2 keeps the signature; a version 1 file (unsigned) is refused.
const FORMAT: &str = "safemode-last-known-good 2";

/// How far in the future a "last known current" time may be and still be
/// taken (as now): a clock stepped back a little by NTP.
const CLOCK_STEP: Duration = Duration::from_secs(60);

/// The second line of the file.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    namespace: String,
    channel: String,
    revision: i64,
    length: usize,
    sha256: String,
    /// When this process last knew the policy current (absent: unknown).
    /// Not trusted for the policy's age, since anyone who can edit the file
    /// could move it; only checked not to be in the future.
    #[serde(default)]
    confirmed_at: Option<Timestamp>,
    /// The last signed heartbeat that confirmed this policy (its protobuf
    /// encoding, base64): its server time, which the controller signed for
    /// this namespace, channel, epoch and revision, is when the policy was
    /// last known current. Absent: unknown, which counts as long ago.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    heartbeat: Option<String>,
}

/// A snapshot to keep: encoded once, written with each new confirmation.
pub(super) struct Kept {
    namespace: String,
    channel: String,
    revision: i64,
    payload: Vec<u8>,
    /// The newest verified heartbeat confirming it, encoded.
    heartbeat: Option<Vec<u8>>,
}

impl Kept {
    /// `snapshot` (verified, with its signature) to keep.
    pub fn of(snapshot: &proto::Snapshot) -> Kept {
        Kept {
            namespace: snapshot.namespace.clone(),
            channel: snapshot.channel.clone(),
            revision: snapshot.revision,
            payload: snapshot.encode_to_vec(),
            heartbeat: None,
        }
    }

    /// Keeps `heartbeat` (verified by the caller) as the policy's newest
    /// confirmation, if it is for the kept revision.
    pub fn confirmed_by(&mut self, heartbeat: &proto::Heartbeat) {
        if heartbeat.revision == self.revision {
            self.heartbeat = Some(heartbeat.encode_to_vec());
        }
    }

    /// The file's contents, saying the policy was current at `confirmed_at`.
    pub fn file(&self, confirmed_at: Timestamp) -> Vec<u8> {
        let header = Header {
            namespace: self.namespace.clone(),
            channel: self.channel.clone(),
            revision: self.revision,
            length: self.payload.len(),
            sha256: format!("{:x}", Sha256::digest(&self.payload)),
            confirmed_at: Some(confirmed_at),
            heartbeat: self
                .heartbeat
                .as_ref()
                .map(|h| base64::engine::general_purpose::STANDARD.encode(h)),
        };
        let mut bytes = Vec::with_capacity(self.payload.len() + 256);
        bytes.extend_from_slice(FORMAT.as_bytes());
        bytes.push(b'\n');
        serde_json::to_writer(&mut bytes, &header).expect("headers serialize");
        bytes.push(b'\n');
        bytes.extend_from_slice(&self.payload);
        bytes
    }
}

/// Checks, at start, that the file at `path` can be written: its directory
/// exists and takes new files.
pub(super) fn check_writable(path: &Path) -> Result<(), String> {
    if path.file_name().is_none() || path.is_dir() {
        return Err(format!("{} is not a file path", path.display()));
    }
    let dir = directory(path);
    tempfile::NamedTempFile::new_in(dir)
        .map(drop)
        .map_err(|e| format!("cannot write in {}: {e}", dir.display()))
}

/// Replaces the file at `path` with `bytes`, atomically and durably,
/// readable only by its owner.
pub(super) fn save(path: &Path, bytes: &[u8]) -> io::Result<()> {
    files::write_atomically(path, bytes, Readers::Owner, Existing::Replace)
}

/// Why a last-known-good file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("the last-known-good file {path} cannot be used: {reason}")]
pub struct LastKnownGoodError {
    /// The file.
    pub path: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Reads the file at `path` for the subscription of `channel` in
/// `namespace`, signed by one of `trusted`: `Ok(None)` if there is none;
/// else the snapshot, and how long ago it was last known current (`None`:
/// unknown).
pub(super) fn load(
    path: &Path,
    namespace: &Namespace,
    channel: Channel,
    trusted: &TrustedKeys,
) -> Result<Option<(PolicySnapshot, Option<Duration>)>, LastKnownGoodError> {
    let refuse = |reason: String| LastKnownGoodError {
        path: path.display().to_string(),
        reason,
    };
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(refuse(format!("cannot read it: {e}"))),
    };
    let (format, rest) =
        split_line(&bytes).ok_or_else(|| refuse("it is empty or cut short".into()))?;
    if format != FORMAT.as_bytes() {
        return Err(refuse(format!(
            "it does not start with '{FORMAT}' (not a safemode file, or from another version)"
        )));
    }
    let (header, payload) =
        split_line(rest).ok_or_else(|| refuse("it is cut short after its first line".into()))?;
    let header: Header = serde_json::from_slice(header)
        .map_err(|e| refuse(format!("its header cannot be read: {e}")))?;
    if payload.len() != header.length {
        return Err(refuse(format!(
            "it holds {} bytes of policy where its header says {}: it was cut short or appended to",
            payload.len(),
            header.length
        )));
    }
    if format!("{:x}", Sha256::digest(payload)) != header.sha256 {
        return Err(refuse(
            "its policy does not match its checksum: it was damaged".into(),
        ));
    }
    let mut wire = proto::Snapshot::decode(payload)
        .map_err(|e| refuse(format!("its policy cannot be decoded: {e}")))?;
    wire::signed::verify_snapshot(&mut wire, trusted).map_err(|e| {
        refuse(format!(
            "its policy is not one a trusted controller signed: {e}"
        ))
    })?;
    let now = Timestamp::now();
    if let Some(at) = header.confirmed_at
        && at.duration_since(now) > jiff::SignedDuration::try_from(CLOCK_STEP).expect("a minute")
    {
        return Err(refuse(format!(
            "it says its policy was last known current at {at}, in the future: it was edited (or this machine's clock is far behind); delete it if the clock is right"
        )));
    }
    // The policy's age comes from what the controller signed, never from
    // what the file says: a heartbeat for this very snapshot.
    let confirmed = match &header.heartbeat {
        None => None,
        Some(encoded) => {
            let beat = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .ok()
                .and_then(|bytes| proto::Heartbeat::decode(bytes.as_slice()).ok())
                .ok_or_else(|| refuse("its heartbeat cannot be decoded".into()))?;
            wire::signed::verify_heartbeat(
                &beat,
                &wire.namespace,
                &wire.channel,
                &wire.epoch,
                trusted,
            )
            .map_err(|e| {
                refuse(format!(
                    "its heartbeat is not one a trusted controller signed: {e}"
                ))
            })?;
            if beat.revision != wire.revision {
                return Err(refuse(format!(
                    "its heartbeat confirms revision {}, not its policy's {}",
                    beat.revision, wire.revision
                )));
            }
            beat.server_time
                .and_then(|t| wire::timestamp_from_wire(&t).ok())
        }
    };
    if let Some(at) = confirmed
        && at.duration_since(now) > jiff::SignedDuration::try_from(CLOCK_STEP).expect("a minute")
    {
        return Err(refuse(format!(
            "its heartbeat was signed at {at}, in the future: this machine's clock is far behind the controller's"
        )));
    }
    let snapshot =
        PolicySnapshot::from_wire(wire, namespace, channel).map_err(|e| refuse(e.to_string()))?;
    // A time a little in the future (a clock stepped back) counts as now.
    let ago =
        confirmed.map(|at| Duration::try_from(now.duration_since(at)).unwrap_or(Duration::ZERO));
    Ok(Some((snapshot, ago)))
}

fn split_line(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = bytes.iter().position(|b| *b == b'\n')?;
    Some((&bytes[..end], &bytes[end + 1..]))
}
