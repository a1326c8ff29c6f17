//! Which bytes of a snapshot and of a heartbeat are signed, written once for
//! the controller that signs them and the client that checks them (the
//! proto says the same in words, for clients in other languages).
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

/// Signs `snapshot` with `key`: fills its `key_id` and `signature`.
pub fn sign_snapshot(snapshot: &mut proto::Snapshot, key: &SigningKey) {
    snapshot.key_id.clear();
    snapshot.signature.clear();
    let signature = key.sign(Purpose::Snapshot, &snapshot.encode_to_vec());
    snapshot.key_id = signature.key_id.as_str().to_string();
    snapshot.signature = signature.bytes;
}

/// Checks that `snapshot` is signed by one of `trusted`, as it is: a single
/// changed field, or a signature by any other key, fails.
pub fn verify_snapshot(
    snapshot: &mut proto::Snapshot,
    trusted: &TrustedKeys,
) -> Result<(), SignatureError> {
    // Taken out for the encoding, and put back whatever the outcome.
    let key_id = std::mem::take(&mut snapshot.key_id);
    let signature = std::mem::take(&mut snapshot.signature);
    let result = trusted.verify(
        Purpose::Snapshot,
        &snapshot.encode_to_vec(),
        &key_id,
        &signature,
    );
    snapshot.key_id = key_id;
    snapshot.signature = signature;
    result
}

/// Signs a replica's request for another's part of a fleet status: fills
/// its `key_id` and `signature`.
pub fn sign_replica_status_request(request: &mut proto::ReplicaStatusRequest, key: &SigningKey) {
    request.key_id.clear();
    request.signature.clear();
    let signature = key.sign(Purpose::ReplicaStatusRequest, &request.encode_to_vec());
    request.key_id = signature.key_id.as_str().to_string();
    request.signature = signature.bytes;
}

/// Checks that a replica status request is signed by one of `trusted`, as
/// it is.
pub fn verify_replica_status_request(
    request: &mut proto::ReplicaStatusRequest,
    trusted: &TrustedKeys,
) -> Result<(), SignatureError> {
    let key_id = std::mem::take(&mut request.key_id);
    let signature = std::mem::take(&mut request.signature);
    let result = trusted.verify(
        Purpose::ReplicaStatusRequest,
        &request.encode_to_vec(),
        &key_id,
        &signature,
    );
    request.key_id = key_id;
    request.signature = signature;
    result
}

/// Signs a replica's answer to another's status request.
pub fn sign_replica_status_response(response: &mut proto::ReplicaStatusResponse, key: &SigningKey) {
    response.key_id.clear();
    response.signature.clear();
    let signature = key.sign(Purpose::ReplicaStatusResponse, &response.encode_to_vec());
    response.key_id = signature.key_id.as_str().to_string();
    response.signature = signature.bytes;
}

/// Checks that a replica's answer is signed by one of `trusted`, as it is.
pub fn verify_replica_status_response(
    response: &mut proto::ReplicaStatusResponse,
    trusted: &TrustedKeys,
) -> Result<(), SignatureError> {
    let key_id = std::mem::take(&mut response.key_id);
    let signature = std::mem::take(&mut response.signature);
    let result = trusted.verify(
        Purpose::ReplicaStatusResponse,
        &response.encode_to_vec(),
        &key_id,
        &signature,
    );
    response.key_id = key_id;
    response.signature = signature;
    result
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
