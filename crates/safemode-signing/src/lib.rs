//! Ed25519 signatures on what the controller issues: snapshots, heartbeats
//! and audit entries. The signing key lives outside the store (a file or a
//! Kubernetes Secret), so neither a writer of etcd, nor a rogue process that
//! speaks the subscription protocol, nor whoever can edit a last-known-good
//! file can produce something a client or `audit --verify` accepts.
//!
//! Keys are the standard PEM forms, so operators can make and inspect them
//! with their usual tools: a private key is PKCS#8 (`-----BEGIN PRIVATE
//! KEY-----`, e.g. `openssl genpkey -algorithm ed25519`), a public key is
//! SubjectPublicKeyInfo (`-----BEGIN PUBLIC KEY-----`, `openssl pkey
//! -pubout`). A trusted-keys file holds one or more public keys, so a key can
//! be rotated: trust old and new, switch the controllers, then drop the old.
//!
//! Every signature is over a purpose tag and the message, so a signed
//! heartbeat can never pass for a snapshot or an audit entry.
//!
//! The crypto is `ring`'s, which rustls (and so tonic's TLS) already builds.
#![forbid(unsafe_code)]

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use safemode_support::files::{self, Existing, Readers};

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{self, Ed25519KeyPair, KeyPair as _};
use sha2::{Digest, Sha256};

/// The most public keys one trusted-keys set may hold.
pub const MAX_TRUSTED_KEYS: usize = 16;

/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 key
/// bytes follow it.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// What a signature is for. The tag is signed with the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A policy snapshot for one channel.
    Snapshot,
    /// A heartbeat: "the policy at this revision is current".
    Heartbeat,
    /// An audit log entry.
    AuditEntry,
    /// One replica asking another for its part of a fleet status.
    ReplicaStatusRequest,
    /// A replica's answer to [`Purpose::ReplicaStatusRequest`].
    ReplicaStatusResponse,
    /// One replica asking another for its tallies of reports.
    ReplicaReportsRequest,
    /// A replica's answer to [`Purpose::ReplicaReportsRequest`].
    ReplicaReportsResponse,
}

impl Purpose {
    fn tag(self) -> &'static [u8] {
        match self {
            Purpose::Snapshot => b"safemode.v1 snapshot\0",
            Purpose::Heartbeat => b"safemode.v1 heartbeat\0",
            Purpose::AuditEntry => b"safemode.v1 audit entry\0",
            Purpose::ReplicaStatusRequest => b"safemode.v1 replica status request\0",
            Purpose::ReplicaStatusResponse => b"safemode.v1 replica status response\0",
            Purpose::ReplicaReportsRequest => b"safemode.v1 replica reports request\0",
            Purpose::ReplicaReportsResponse => b"safemode.v1 replica reports response\0",
        }
    }
}

/// Why a key could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The text is not the PEM block expected.
    #[error("{0}")]
    Format(String),
    /// More keys than [`MAX_TRUSTED_KEYS`], or none.
    #[error("{0}")]
    Count(String),
}

/// Why a signature was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// There is no signature at all.
    #[error("it is not signed; the controller must sign what it sends (serve --signing-key)")]
    Unsigned,
    /// Signed by a key that is not trusted.
    #[error(
        "it is signed by key {key_id}, which is not among the trusted keys ({trusted}); add that key's public half to the trusted keys if it is your controller's"
    )]
    UnknownKey {
        /// The key the signature names.
        key_id: String,
        /// The trusted keys' ids.
        trusted: String,
    },
    /// The signature does not match the contents: they were changed, or
    /// it was made by another key under a trusted key's id.
    #[error("its signature by key {key_id} does not match its contents: it was altered")]
    Invalid {
        /// The key the signature names.
        key_id: String,
    },
}

/// A public key's short, stable name: `ed25519:` and the first 16 hex digits
/// of the SHA-256 of its 32 bytes. Signatures carry it so that the verifier
/// knows which trusted key to try.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    fn of(public: &[u8; 32]) -> KeyId {
        let digest = Sha256::digest(public);
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        KeyId(format!("ed25519:{hex}"))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A signature with the id of the key that made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    /// Which key signed.
    pub key_id: KeyId,
    /// The 64 signature bytes.
    pub bytes: Vec<u8>,
}

/// An Ed25519 public key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PublicKey {
    bytes: [u8; 32],
    id: KeyId,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id)
    }
}

impl PublicKey {
    /// The key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> PublicKey {
        PublicKey {
            id: KeyId::of(&bytes),
            bytes,
        }
    }

    /// Its id.
    pub fn id(&self) -> &KeyId {
        &self.id
    }

    /// Its 32 bytes.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// The key as a PEM `PUBLIC KEY` block.
    pub fn to_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.bytes);
        pem_block("PUBLIC KEY", &der)
    }

    /// Every `PUBLIC KEY` block of `text` (other blocks are ignored); at
    /// least one, at most [`MAX_TRUSTED_KEYS`].
    pub fn parse_pem_all(text: &str) -> Result<Vec<PublicKey>, KeyError> {
        let mut keys = Vec::new();
        for der in pem_blocks(text, "PUBLIC KEY")? {
            let bytes = der
                .strip_prefix(&SPKI_PREFIX[..])
                .and_then(|rest| <[u8; 32]>::try_from(rest).ok())
                .ok_or_else(|| {
                    KeyError::Format(
                        "a PUBLIC KEY block is not an Ed25519 key (make one with `safemode key public` or `openssl pkey -pubout`)".into(),
                    )
                })?;
            keys.push(PublicKey::from_bytes(bytes));
            if keys.len() > MAX_TRUSTED_KEYS {
                return Err(KeyError::Count(format!(
                    "more than {MAX_TRUSTED_KEYS} public keys; trust only the keys your controllers sign with"
                )));
            }
        }
        if keys.is_empty() {
            return Err(KeyError::Format(
                "holds no -----BEGIN PUBLIC KEY----- block".into(),
            ));
        }
        Ok(keys)
    }

    /// Checks `signature` over `message` for `purpose` with this key.
    fn verify_bytes(&self, purpose: Purpose, message: &[u8], signature: &[u8]) -> bool {
        let key = signature::UnparsedPublicKey::new(&signature::ED25519, &self.bytes);
        key.verify(&tagged(purpose, message), signature).is_ok()
    }
}

/// The public keys a verifier accepts signatures from: one to
/// [`MAX_TRUSTED_KEYS`], several during a rotation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: Vec<PublicKey>,
}

impl TrustedKeys {
    /// Trusts `keys` (duplicates are dropped); at least one, at most
    /// [`MAX_TRUSTED_KEYS`].
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Result<TrustedKeys, KeyError> {
        let mut unique: Vec<PublicKey> = Vec::new();
        for key in keys {
            if !unique.contains(&key) {
                unique.push(key);
            }
            if unique.len() > MAX_TRUSTED_KEYS {
                return Err(KeyError::Count(format!(
                    "more than {MAX_TRUSTED_KEYS} trusted keys; trust only the keys your controllers sign with"
                )));
            }
        }
        if unique.is_empty() {
            return Err(KeyError::Count(
                "no trusted key; give the controller's public key (`safemode key public`)".into(),
            ));
        }
        Ok(TrustedKeys { keys: unique })
    }

    /// The keys of a PEM text with one or more `PUBLIC KEY` blocks.
    pub fn from_pem(text: &str) -> Result<TrustedKeys, KeyError> {
        TrustedKeys::new(PublicKey::parse_pem_all(text)?)
    }

    /// The keys of a PEM file with one or more `PUBLIC KEY` blocks.
    pub fn load(path: &Path) -> Result<TrustedKeys, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.display().to_string(),
            source,
        })?;
        TrustedKeys::from_pem(&text).map_err(|e| match e {
            KeyError::Format(m) | KeyError::Count(m) => {
                KeyError::Format(format!("{}: {m}", path.display()))
            }
            other => other,
        })
    }

    /// The trusted keys.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// Whether a signature by `key_id` could be checked.
    pub fn trusts(&self, key_id: &str) -> bool {
        self.keys.iter().any(|k| k.id.as_str() == key_id)
    }

    /// Checks that `signature` (by the key named `key_id`) signs `message`
    /// for `purpose` with one of the trusted keys. An empty `key_id` and
    /// signature mean unsigned.
    pub fn verify(
        &self,
        purpose: Purpose,
        message: &[u8],
        key_id: &str,
        signature: &[u8],
    ) -> Result<(), SignatureError> {
        if key_id.is_empty() && signature.is_empty() {
            return Err(SignatureError::Unsigned);
        }
        let Some(key) = self.keys.iter().find(|k| k.id.as_str() == key_id) else {
            return Err(SignatureError::UnknownKey {
                key_id: printable_id(key_id),
                trusted: self
                    .keys
                    .iter()
                    .map(|k| k.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        if signature.len() != SIGNATURE_LEN || !key.verify_bytes(purpose, message, signature) {
            return Err(SignatureError::Invalid {
                key_id: key.id.to_string(),
            });
        }
        Ok(())
    }
}

/// A key id from the wire, safe to print: at most 40 visible ASCII
/// characters.
fn printable_id(key_id: &str) -> String {
    key_id
        .chars()
        .take(40)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

/// The controller's Ed25519 signing key. Cheap to clone.
#[derive(Clone)]
pub struct SigningKey {
    pair: Arc<Ed25519KeyPair>,
    public: PublicKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the private half.
        write!(f, "SigningKey({})", self.public.id)
    }
}

impl SigningKey {
    /// A new random key, and its PKCS#8 PEM to keep.
    pub fn generate() -> (SigningKey, String) {
        let document = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .expect("the system's random source works");
        let pem = pem_block("PRIVATE KEY", document.as_ref());
        let key = SigningKey::from_pkcs8(document.as_ref()).expect("a key ring just made parses");
        (key, pem)
    }

    fn from_pkcs8(der: &[u8]) -> Result<SigningKey, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(|e| {
            KeyError::Format(format!(
                "the PRIVATE KEY block is not an Ed25519 key ({e}); make one with `openssl genpkey -algorithm ed25519`"
            ))
        })?;
        let bytes: [u8; 32] = pair
            .public_key()
            .as_ref()
            .try_into()
            .expect("Ed25519 public keys are 32 bytes");
        Ok(SigningKey {
            pair: Arc::new(pair),
            public: PublicKey::from_bytes(bytes),
        })
    }

    /// The key of a PEM text holding one `PRIVATE KEY` (PKCS#8) block.
    pub fn from_pem(text: &str) -> Result<SigningKey, KeyError> {
        let blocks = pem_blocks(text, "PRIVATE KEY")?;
        match blocks.as_slice() {
            [der] => SigningKey::from_pkcs8(der),
            [] => Err(KeyError::Format(
                "holds no -----BEGIN PRIVATE KEY----- block (an Ed25519 key in PKCS#8 form, e.g. from `openssl genpkey -algorithm ed25519`)".into(),
            )),
            _ => Err(KeyError::Format(
                "holds more than one private key; give the one this controller signs with".into(),
            )),
        }
    }

    /// The key in the PEM file at `path`.
    pub fn load(path: &Path) -> Result<SigningKey, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.display().to_string(),
            source,
        })?;
        SigningKey::from_pem(&text).map_err(|e| match e {
            KeyError::Format(m) => KeyError::Format(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// The key at `path`; if there is no file there, a new key written to it
    /// (readable only by its owner) and `true`.
    pub fn load_or_create(path: &Path) -> Result<(SigningKey, bool), KeyError> {
        match std::fs::metadata(path) {
            Ok(_) => Ok((SigningKey::load(path)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (key, pem) = SigningKey::generate();
                write_private(path, &pem).map_err(|source| KeyError::Io {
                    path: path.display().to_string(),
                    source,
                })?;
                Ok((key, true))
            }
            Err(source) => Err(KeyError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Its public half.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// The id of its public half.
    pub fn key_id(&self) -> &KeyId {
        &self.public.id
    }

    /// Signs `message` for `purpose`.
    pub fn sign(&self, purpose: Purpose, message: &[u8]) -> Signature {
        Signature {
            key_id: self.public.id.clone(),
            bytes: self.pair.sign(&tagged(purpose, message)).as_ref().to_vec(),
        }
    }
}

fn tagged(purpose: Purpose, message: &[u8]) -> Vec<u8> {
    let tag = purpose.tag();
    let mut bytes = Vec::with_capacity(tag.len() + message.len());
    bytes.extend_from_slice(tag);
    bytes.extend_from_slice(message);
    bytes
}

/// Writes a private key file that only its owner can read, whole, and
/// never over an existing one (a crash never leaves half a key, and two
/// starts at once never replace each other's key).
fn write_private(path: &Path, pem: &str) -> std::io::Result<()> {
    files::write_atomically(path, pem.as_bytes(), Readers::Owner, Existing::Keep)
}

fn pem_block(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

/// The DER of every `label` block in `text`; other blocks are skipped.
fn pem_blocks(text: &str, label: &str) -> Result<Vec<Vec<u8>>, KeyError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut blocks = Vec::new();
    let mut body: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        match &mut body {
            None if line == begin => body = Some(String::new()),
            None => {}
            Some(_) if line == end => {
                let encoded = body.take().expect("inside a block");
                let der = base64::engine::general_purpose::STANDARD
                    .decode(encoded.as_bytes())
                    .map_err(|e| {
                        KeyError::Format(format!("a {label} block is not base64 ({e})"))
                    })?;
                blocks.push(der);
                if blocks.len() > MAX_TRUSTED_KEYS + 1 {
                    break;
                }
            }
            Some(body) => {
                if body.len() > 16 * 1024 {
                    return Err(KeyError::Format(format!("a {label} block is far too long")));
                }
                body.push_str(line);
            }
        }
    }
    if body.is_some() {
        return Err(KeyError::Format(format!(
            "a {label} block has no {end} line"
        )));
    }
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_only_for_its_key_purpose_and_message() {
        let (key, pem) = SigningKey::generate();
        let again = SigningKey::from_pem(&pem).unwrap();
        assert_eq!(again.key_id(), key.key_id());
        let trusted = TrustedKeys::from_pem(&key.public_key().to_pem()).unwrap();
        let signature = key.sign(Purpose::Snapshot, b"rules");
        let id = signature.key_id.as_str();
        assert_eq!(
            trusted.verify(Purpose::Snapshot, b"rules", id, &signature.bytes),
            Ok(())
        );
        assert!(matches!(
            trusted.verify(Purpose::Snapshot, b"rulez", id, &signature.bytes),
            Err(SignatureError::Invalid { .. })
        ));
        assert!(matches!(
            trusted.verify(Purpose::Heartbeat, b"rules", id, &signature.bytes),
            Err(SignatureError::Invalid { .. })
        ));
        assert_eq!(
            trusted.verify(Purpose::Snapshot, b"rules", "", &[]),
            Err(SignatureError::Unsigned)
        );
        let (other, _) = SigningKey::generate();
        let forged = other.sign(Purpose::Snapshot, b"rules");
        assert!(matches!(
            trusted.verify(
                Purpose::Snapshot,
                b"rules",
                forged.key_id.as_str(),
                &forged.bytes
            ),
            Err(SignatureError::UnknownKey { .. })
        ));
        // Another key's signature under a trusted key's id.
        assert!(matches!(
            trusted.verify(Purpose::Snapshot, b"rules", id, &forged.bytes),
            Err(SignatureError::Invalid { .. })
        ));
    }

    #[test]
    fn several_keys_can_be_trusted_for_a_rotation() {
        let (old, _) = SigningKey::generate();
        let (new, _) = SigningKey::generate();
        let pem = format!("{}{}", old.public_key().to_pem(), new.public_key().to_pem());
        let trusted = TrustedKeys::from_pem(&pem).unwrap();
        assert_eq!(trusted.keys().len(), 2);
        for key in [&old, &new] {
            let s = key.sign(Purpose::AuditEntry, b"entry");
            assert_eq!(
                trusted.verify(Purpose::AuditEntry, b"entry", s.key_id.as_str(), &s.bytes),
                Ok(())
            );
        }
    }

    #[test]
    fn wrong_files_are_named() {
        assert!(TrustedKeys::from_pem("hello").is_err());
        assert!(SigningKey::from_pem("hello").is_err());
        let (key, pem) = SigningKey::generate();
        // A public key where a private one belongs, and the reverse.
        assert!(SigningKey::from_pem(&key.public_key().to_pem()).is_err());
        assert!(TrustedKeys::from_pem(&pem).is_err());
        let many: String = (0..=MAX_TRUSTED_KEYS)
            .map(|_| SigningKey::generate().0.public_key().to_pem())
            .collect();
        assert!(matches!(
            TrustedKeys::from_pem(&many),
            Err(KeyError::Count(_))
        ));
    }

    #[test]
    fn keys_made_by_openssl_are_read() {
        // `openssl genpkey -algorithm ed25519` and `openssl pkey -pubout`
        // (a key made for this test and nothing else).
        let private = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIPvSzRMX8menO9rwp0htQGQroUNAcBiWdipw7zdx8I+N\n-----END PRIVATE KEY-----\n";
        let public = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA+RpVR7KqRmnUfAUdKfY7w+v99NxRASZK7s1sgfOH7YM=\n-----END PUBLIC KEY-----\n";
        let key = SigningKey::from_pem(private).unwrap();
        let trusted = TrustedKeys::from_pem(public).unwrap();
        assert_eq!(trusted.keys()[0].id(), key.key_id());
        assert_eq!(key.public_key().to_pem(), public);
        let s = key.sign(Purpose::Heartbeat, b"beat");
        assert_eq!(
            trusted.verify(Purpose::Heartbeat, b"beat", s.key_id.as_str(), &s.bytes),
            Ok(())
        );
    }

    #[test]
    fn a_key_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        let (made, created) = SigningKey::load_or_create(&path).unwrap();
        assert!(created);
        let (read, created) = SigningKey::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(made.key_id(), read.key_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "the private key is readable by others");
        }
    }
}
