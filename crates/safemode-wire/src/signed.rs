//! Which bytes of a snapshot, of a heartbeat and of the fleet's status
//! calls are signed, written once for the side that signs them and the side
//! that checks them (the proto says the same in words, for clients in other
//! languages).
//!
//! A snapshot's signature covers its own protobuf encoding with `key_id` and
//! `signature` empty, so every field a client acts on is covered, and a
//! client that decodes, clears those two fields and encodes again gets the
//! very bytes (prost writes fields in number order, the canonical encoding).
//! A heartbeat's signature covers a `HeartbeatClaim`: the subscription's
//! namespace and channel and the stream's epoch, which the client knows
//! already, with the heartbeat's revision and time, so that a heartbeat of
//! one channel or history cannot stand in for another's.

use prost::Message as _;

use super::proto;
use safemode_signing::{Purpose, SignatureError, SigningKey, TrustedKeys};

/// A message whose signature covers its own protobuf encoding with its
/// `key_id` and `signature` fields empty: a snapshot, and the fleet's
/// status request and answer.
pub trait SelfSigned: prost::Message + Sized {
    /// What the signature is for: a signature for one purpose never
    /// verifies for another.
    const PURPOSE: Purpose;

    /// The message's `key_id` and `signature` fields.
    fn seal(&mut self) -> (&mut String, &mut Vec<u8>);
}

macro_rules! self_signed {
    ($($message:ty => $purpose:expr),* $(,)?) => {$(
        impl SelfSigned for $message {
            const PURPOSE: Purpose = $purpose;

            fn seal(&mut self) -> (&mut String, &mut Vec<u8>) {
                (&mut self.key_id, &mut self.signature)
            }
        }
    )*};
}

self_signed! {
    proto::Snapshot => Purpose::Snapshot,
    proto::ReplicaStatusRequest => Purpose::ReplicaStatusRequest,
    proto::ReplicaStatusResponse => Purpose::ReplicaStatusResponse,
    proto::ReplicaReportsRequest => Purpose::ReplicaReportsRequest,
    proto::ReplicaReportsResponse => Purpose::ReplicaReportsResponse,
}

/// Signs `message` with `key`: fills its `key_id` and `signature`.
pub fn sign<M: SelfSigned>(message: &mut M, key: &SigningKey) {
    let (key_id, signature) = message.seal();
    key_id.clear();
    signature.clear();
    let sealed = key.sign(M::PURPOSE, &message.encode_to_vec());
    let (key_id, signature) = message.seal();
    *key_id = sealed.key_id.as_str().to_string();
    *signature = sealed.bytes;
}

/// Checks that `message` is signed by one of `trusted`, as it is: a single
/// changed field, or a signature by any other key, fails.
pub fn verify<M: SelfSigned>(message: &mut M, trusted: &TrustedKeys) -> Result<(), SignatureError> {
    // Taken out for the encoding, and put back whatever the outcome.
    let (key_id, signature) = message.seal();
    let (key_id, signature) = (std::mem::take(key_id), std::mem::take(signature));
    let result = trusted.verify(M::PURPOSE, &message.encode_to_vec(), &key_id, &signature);
    let (own_key_id, own_signature) = message.seal();
    *own_key_id = key_id;
    *own_signature = signature;
    result
}

/// Signs `snapshot` with `key` ([`sign`]).
pub fn sign_snapshot(snapshot: &mut proto::Snapshot, key: &SigningKey) {
    sign(snapshot, key);
}

/// Checks that `snapshot` is signed by one of `trusted` ([`verify`]).
pub fn verify_snapshot(
    snapshot: &mut proto::Snapshot,
    trusted: &TrustedKeys,
) -> Result<(), SignatureError> {
    verify(snapshot, trusted)
}

/// What a heartbeat for `namespace`/`channel` in `epoch` says, as signed.
pub fn heartbeat_claim(
    namespace: &str,
    channel: &str,
    epoch: &str,
    revision: i64,
    server_time: Option<prost_types::Timestamp>,
) -> Vec<u8> {
    proto::HeartbeatClaim {
        namespace: namespace.to_string(),
        channel: channel.to_string(),
        epoch: epoch.to_string(),
        revision,
        server_time,
    }
    .encode_to_vec()
}

/// A heartbeat for `namespace`/`channel` in `epoch`, signed with `key`.
pub fn signed_heartbeat(
    namespace: &str,
    channel: &str,
    epoch: &str,
    revision: i64,
    server_time: prost_types::Timestamp,
    key: &SigningKey,
) -> proto::Heartbeat {
    let claim = heartbeat_claim(namespace, channel, epoch, revision, Some(server_time));
    let signature = key.sign(Purpose::Heartbeat, &claim);
    proto::Heartbeat {
        revision,
        server_time: Some(server_time),
        key_id: signature.key_id.as_str().to_string(),
        signature: signature.bytes,
    }
}

/// Checks that `heartbeat` was signed by one of `trusted` for
/// `namespace`/`channel` in `epoch`.
pub fn verify_heartbeat(
    heartbeat: &proto::Heartbeat,
    namespace: &str,
    channel: &str,
    epoch: &str,
    trusted: &TrustedKeys,
) -> Result<(), SignatureError> {
    let claim = heartbeat_claim(
        namespace,
        channel,
        epoch,
        heartbeat.revision,
        heartbeat.server_time,
    );
    trusted.verify(
        Purpose::Heartbeat,
        &claim,
        &heartbeat.key_id,
        &heartbeat.signature,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> proto::Snapshot {
        proto::Snapshot {
            schema_version: 1,
            namespace: "live".into(),
            channel: "web".into(),
            revision: 7,
            epoch: "e1".into(),
            // Maps encode in key order, so the bytes survive a decode and
            // an encode (with a HashMap they would not).
            rules: Some(proto::ChannelRules {
                actions: (0..20)
                    .map(|i| (format!("account.action_{i}"), Default::default()))
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_snapshot_verifies_only_as_signed_and_survives_the_wire() {
        let key = SigningKey::generate().0;
        let trusted = TrustedKeys::new([key.public_key().clone()]).unwrap();
        let mut signed = snapshot();
        sign_snapshot(&mut signed, &key);
        // Through an encoding and back, as a client receives it.
        let mut received = proto::Snapshot::decode(signed.encode_to_vec().as_slice()).unwrap();
        assert_eq!(verify_snapshot(&mut received, &trusted), Ok(()));
        assert_eq!(received, signed, "verifying leaves the snapshot as it was");

        for edit in [
            (|s: &mut proto::Snapshot| s.revision = 1_000_000_000_000_000) as fn(&mut _),
            |s| s.epoch = "e2".into(),
            |s| s.start_over_from = 9,
            |s| s.rules = None,
        ] {
            let mut edited = signed.clone();
            edit(&mut edited);
            assert!(matches!(
                verify_snapshot(&mut edited, &trusted),
                Err(SignatureError::Invalid { .. })
            ));
        }
        let mut unsigned = snapshot();
        assert_eq!(
            verify_snapshot(&mut unsigned, &trusted),
            Err(SignatureError::Unsigned)
        );
        let mut other = snapshot();
        sign_snapshot(&mut other, &SigningKey::generate().0);
        assert!(matches!(
            verify_snapshot(&mut other, &trusted),
            Err(SignatureError::UnknownKey { .. })
        ));
    }

    #[test]
    fn a_heartbeat_holds_only_for_its_channel_namespace_and_epoch() {
        let key = SigningKey::generate().0;
        let trusted = TrustedKeys::new([key.public_key().clone()]).unwrap();
        let time = prost_types::Timestamp {
            seconds: 100,
            nanos: 0,
        };
        let heartbeat = signed_heartbeat("live", "web", "e1", 7, time, &key);
        assert_eq!(
            verify_heartbeat(&heartbeat, "live", "web", "e1", &trusted),
            Ok(())
        );
        for (namespace, channel, epoch) in [
            ("live", "ivr", "e1"),
            ("drill-x", "web", "e1"),
            ("live", "web", "e2"),
        ] {
            assert!(
                verify_heartbeat(&heartbeat, namespace, channel, epoch, &trusted).is_err(),
                "{namespace}/{channel}/{epoch}"
            );
        }
        let mut later = heartbeat.clone();
        later.revision = 8;
        assert!(verify_heartbeat(&later, "live", "web", "e1", &trusted).is_err());
    }
}
