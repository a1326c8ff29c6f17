//! Last-known-good: the newest applied snapshot, kept in a local file so that
//! a channel service that restarts while the controller is unreachable still
//! enforces the modes that were active.
//!
//! The file is written atomically (a temporary file in the same directory,
//! synced, renamed over the old one, the directory synced) and checked when
//! read: a first line naming the format, a second line (JSON) with the
//! payload's length and SHA-256, then the snapshot exactly as the controller
//! sent it (protobuf). A file that fails any check is refused whole, never
//! half-trusted.

use std::io::{self, Write as _};
use std::path::Path;

use prost::Message as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::PolicySnapshot;
use crate::policy::{Channel, Namespace};
use crate::wire::proto;

const FORMAT: &str = "safemode-last-known-good 1";

/// The second line of the file.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    namespace: String,
    channel: String,
    revision: i64,
    length: usize,
    sha256: String,
}

/// The file's contents for `snapshot`.
pub(super) fn encode(snapshot: &proto::Snapshot) -> Vec<u8> {
    let payload = snapshot.encode_to_vec();
    let header = Header {
        namespace: snapshot.namespace.clone(),
        channel: snapshot.channel.clone(),
        revision: snapshot.revision,
        length: payload.len(),
        sha256: format!("{:x}", Sha256::digest(&payload)),
    };
    let mut bytes = Vec::with_capacity(payload.len() + 256);
    bytes.extend_from_slice(FORMAT.as_bytes());
    bytes.push(b'\n');
    serde_json::to_writer(&mut bytes, &header).expect("headers serialize");
    bytes.push(b'\n');
    bytes.extend_from_slice(&payload);
    bytes
}

/// Replaces the file at `path` with `bytes`, atomically: readers see the
/// old file or the new one, even across a crash.
pub(super) fn save(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?;
    let mut temporary = name.to_os_string();
    temporary.push(format!(".{}.tmp", std::process::id()));
    let temporary = dir.join(temporary);
    let written = (|| {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        // The rename itself is durable once the directory is.
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
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
/// `namespace`: `Ok(None)` if there is none.
pub(super) fn load(
    path: &Path,
    namespace: &Namespace,
    channel: Channel,
) -> Result<Option<PolicySnapshot>, LastKnownGoodError> {
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
    let wire = proto::Snapshot::decode(payload)
        .map_err(|e| refuse(format!("its policy cannot be decoded: {e}")))?;
    PolicySnapshot::from_wire(wire, namespace, channel)
        .map(Some)
        .map_err(|e| refuse(e.to_string()))
}

fn split_line(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = bytes.iter().position(|b| *b == b'\n')?;
    Some((&bytes[..end], &bytes[end + 1..]))
}
