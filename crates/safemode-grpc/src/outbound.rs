//! What the subscription stream sends: a `SubscribeResponse`, but one whose
//! snapshot is encoded once per revision and channel and then shared, bytes
//! and all, by every subscriber of that channel. With ten thousand
//! subscribers a change is converted and encoded a handful of times, not ten
//! thousand.
//!
//! Signing follows the same rule: a snapshot is signed when it is encoded,
//! once per revision and channel, and a heartbeat is signed once per
//! namespace, channel and revision for every stream that beats within half
//! a heartbeat interval ([`HeartbeatCache`]), never once per stream.
//!
//! `Outbound` stands in for `safemode.v1.SubscribeResponse` in the
//! subscription server that `build.rs` generates a second time (the
//! `fanout` module); on the wire it is exactly that message.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use prost::encoding::{DecodeContext, WireType};
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

use safemode_controller::NamespaceView;
use safemode_policy::{Channel, Namespace, Revision};
use safemode_signing::SigningKey;
use safemode_wire::{self as wire, proto};

/// A `SubscribeResponse`, already encoded or not.
#[derive(Clone, Debug, PartialEq)]
pub enum Outbound {
    /// The encoded body of a `SubscribeResponse` (a snapshot), shared.
    Encoded(Bytes),
    /// A message encoded when sent (a heartbeat).
    Message(proto::SubscribeResponse),
}

impl Default for Outbound {
    fn default() -> Self {
        Outbound::Message(proto::SubscribeResponse::default())
    }
}

impl Message for Outbound {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match self {
            Outbound::Encoded(bytes) => buf.put_slice(bytes),
            Outbound::Message(message) => message.encode_raw(buf),
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // Only ever decoded in tests of this type: into a message.
        if let Outbound::Encoded(bytes) = self {
            *self = Outbound::Message(proto::SubscribeResponse::decode(bytes.clone())?);
        }
        match self {
            Outbound::Message(message) => message.merge_field(tag, wire_type, buf, ctx),
            Outbound::Encoded(_) => unreachable!("turned into a message above"),
        }
    }

    fn encoded_len(&self) -> usize {
        match self {
            Outbound::Encoded(bytes) => bytes.len(),
            Outbound::Message(message) => message.encoded_len(),
        }
    }

    fn clear(&mut self) {
        *self = Outbound::default();
    }
}

/// The subscription server's codec: prost's, with per-stream buffers sized
/// for what a stream carries rather than tonic's 8 KiB each way. Every
/// stream keeps its buffers for as long as it lives, so with tens of
/// thousands of idle subscribers they are most of the memory a stream
/// costs. A larger message grows the buffer as it must.
pub struct FanoutCodec<T, U>(PhantomData<(T, U)>);

/// The send buffer: a snapshot and the heartbeat that follows it.
const ENCODE_BUFFER_BYTES: usize = 1024;
/// The receive buffer: acks of a few bytes (a reject reason, at most
/// `MAX_SUBSCRIBER_MESSAGE_BYTES`, grows it).
const DECODE_BUFFER_BYTES: usize = 128;
/// tonic's default: how much is encoded before the stream yields.
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

impl<T, U> Default for FanoutCodec<T, U> {
    fn default() -> Self {
        FanoutCodec(PhantomData)
    }
}

impl<T, U> Codec for FanoutCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(
            ENCODE_BUFFER_BYTES,
            YIELD_THRESHOLD_BYTES,
        ))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(
            DECODE_BUFFER_BYTES,
            YIELD_THRESHOLD_BYTES,
        ))
    }
}

/// The newest encoded snapshot of each channel of each namespace. An
/// entry lives as long as the view it was encoded from is in use: a
/// namespace nobody follows any more (a finished drill) leaves nothing.
/// Looked up by borrowing the namespace: a stream's lookup allocates
/// nothing.
#[derive(Debug, Default)]
pub struct SnapshotCache {
    encoded: Mutex<HashMap<Namespace, HashMap<Channel, Cached>>>,
}

#[derive(Debug)]
struct Cached {
    revision: Revision,
    view: Weak<NamespaceView>,
    bytes: Bytes,
}

impl SnapshotCache {
    /// The encoded `SubscribeResponse` carrying the snapshot of `channel`
    /// in `view`, made with `make` and signed with `key` only by the first
    /// subscriber to ask.
    pub fn get(
        &self,
        view: &Arc<NamespaceView>,
        channel: Channel,
        key: &SigningKey,
        make: impl FnOnce() -> proto::Snapshot,
    ) -> Bytes {
        // The very view, not only its revision: a re-read after compaction
        // can publish new contents under the same revision.
        if let Some(cached) = self
            .encoded
            .lock()
            .expect("snapshot cache lock")
            .get(&view.namespace)
            .and_then(|channels| channels.get(&channel))
            && cached.revision == view.revision
            && std::ptr::eq(cached.view.as_ptr(), Arc::as_ptr(view))
        {
            return cached.bytes.clone();
        }
        // Encoded outside the lock; two subscribers racing both encode,
        // and the newer revision stays.
        let bytes = encode_signed(make(), key);
        let mut encoded = self.encoded.lock().expect("snapshot cache lock");
        // Entries of views nobody holds any more go (views are replaced on
        // every change, so this also drops what a new revision replaced).
        encoded.retain(|_, channels| {
            channels.retain(|_, cached| cached.view.strong_count() > 0);
            !channels.is_empty()
        });
        let channels = encoded.entry(view.namespace.clone()).or_default();
        match channels.get(&channel) {
            Some(cached) if cached.revision > view.revision => {}
            _ => {
                channels.insert(
                    channel,
                    Cached {
                        revision: view.revision,
                        view: Arc::downgrade(view),
                        bytes: bytes.clone(),
                    },
                );
            }
        }
        bytes
    }
}

/// `snapshot`, signed with `key`, as an encoded `SubscribeResponse`.
pub fn encode_signed(mut snapshot: proto::Snapshot, key: &SigningKey) -> Bytes {
    wire::signed::sign_snapshot(&mut snapshot, key);
    Bytes::from(
        proto::SubscribeResponse {
            message: Some(proto::subscribe_response::Message::Snapshot(snapshot)),
        }
        .encode_to_vec(),
    )
}

/// The newest signed heartbeat of each channel of each namespace, shared by
/// every stream that beats while it is young: with ten thousand streams a
/// heartbeat tick costs a signature per channel, not per stream.
#[derive(Debug)]
pub struct HeartbeatCache {
    /// A heartbeat is shared for this long: half the heartbeat interval, so
    /// that one stream, which beats at most once an interval, never gets
    /// the same heartbeat twice (its client takes only newer ones).
    share_for: Duration,
    signed: Mutex<HashMap<Namespace, HashMap<Channel, Beat>>>,
}

#[derive(Debug)]
struct Beat {
    revision: Revision,
    made: Instant,
    bytes: Bytes,
}

impl HeartbeatCache {
    /// A cache for streams that beat every `interval`.
    pub fn new(interval: Duration) -> Self {
        HeartbeatCache {
            share_for: interval / 2,
            signed: Mutex::default(),
        }
    }

    /// The encoded `SubscribeResponse` with a heartbeat for `channel` of
    /// `namespace` at `revision` in `epoch`, signed with `key`: a recent one
    /// if there is one at that revision, else a new one.
    pub fn get(
        &self,
        namespace: &Namespace,
        channel: Channel,
        revision: Revision,
        epoch: &str,
        key: &SigningKey,
    ) -> Bytes {
        let mut signed = self.signed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(beat) = signed
            .get(namespace)
            .and_then(|channels| channels.get(&channel))
            && beat.revision == revision
            && beat.made.elapsed() < self.share_for
        {
            return beat.bytes.clone();
        }
        // Signed under the lock: one signature per channel and tick, and
        // a signature takes microseconds.
        let made = Instant::now();
        let heartbeat = wire::signed::signed_heartbeat(
            namespace.as_str(),
            channel.as_str(),
            epoch,
            revision,
            wire::timestamp_to_wire(jiff::Timestamp::now()),
            key,
        );
        let bytes = Bytes::from(
            proto::SubscribeResponse {
                message: Some(proto::subscribe_response::Message::Heartbeat(heartbeat)),
            }
            .encode_to_vec(),
        );
        // Channels of namespaces nobody beats for any more go.
        let keep = self.share_for * 4;
        signed.retain(|_, channels| {
            channels.retain(|_, beat| beat.made.elapsed() < keep);
            !channels.is_empty()
        });
        signed.entry(namespace.clone()).or_default().insert(
            channel,
            Beat {
                revision,
                made,
                bytes: bytes.clone(),
            },
        );
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoded_response_is_exactly_the_message() {
        let message = proto::SubscribeResponse {
            message: Some(proto::subscribe_response::Message::Heartbeat(
                proto::Heartbeat {
                    revision: 7,
                    ..Default::default()
                },
            )),
        };
        let encoded = Outbound::Encoded(Bytes::from(message.encode_to_vec()));
        assert_eq!(encoded.encoded_len(), message.encoded_len());
        assert_eq!(encoded.encode_to_vec(), message.encode_to_vec());
        let decoded = Outbound::decode(encoded.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, Outbound::Message(message));
    }

    fn snapshot(revision: Revision) -> proto::Snapshot {
        proto::Snapshot {
            revision,
            ..Default::default()
        }
    }

    #[test]
    fn the_cache_encodes_once_per_revision_and_forgets_dropped_views() {
        let cache = SnapshotCache::default();
        let key = SigningKey::generate().0;
        let trusted = safemode_signing::TrustedKeys::new([key.public_key().clone()]).unwrap();
        let web = Channel::parse("web").unwrap();
        let five = Arc::new(NamespaceView::empty_at(Namespace::live(), 5));
        let mut made = 0;
        for _ in 0..3 {
            let bytes = cache.get(&five, web, &key, || {
                made += 1;
                snapshot(5)
            });
            let Some(proto::subscribe_response::Message::Snapshot(mut sent)) =
                proto::SubscribeResponse::decode(bytes).unwrap().message
            else {
                panic!("not a snapshot");
            };
            assert_eq!(sent.revision, 5);
            assert_eq!(wire::signed::verify_snapshot(&mut sent, &trusted), Ok(()));
        }
        assert_eq!(made, 1, "encoded once, shared after");
        let six = Arc::new(NamespaceView::empty_at(Namespace::live(), 6));
        cache.get(&six, web, &key, || {
            made += 1;
            snapshot(6)
        });
        assert_eq!(made, 2);
        // An older revision asked late does not replace the newer one.
        cache.get(&five, web, &key, || snapshot(5));
        cache.get(&six, web, &key, || panic!("6 is cached"));

        // A namespace nobody follows any more leaves nothing behind.
        let drill = Arc::new(NamespaceView::empty_at(
            Namespace::parse("drill-x").unwrap(),
            3,
        ));
        cache.get(&drill, web, &key, || snapshot(3));
        let entries = |cache: &SnapshotCache| -> Vec<(Namespace, Channel)> {
            let encoded = cache.encoded.lock().unwrap();
            encoded
                .iter()
                .flat_map(|(n, channels)| channels.keys().map(|c| (n.clone(), *c)))
                .collect()
        };
        assert_eq!(entries(&cache).len(), 2);
        drop(drill);
        drop(five);
        cache.get(&six, Channel::parse("ivr").unwrap(), &key, || snapshot(6));
        let left = entries(&cache);
        assert!(
            left.iter().all(|(n, _)| *n == Namespace::live()),
            "{left:?}"
        );
    }

    #[test]
    fn a_heartbeat_is_signed_once_per_channel_and_revision_while_young() {
        let cache = HeartbeatCache::new(Duration::from_secs(3600));
        let key = SigningKey::generate().0;
        let web = Channel::parse("web").unwrap();
        let live = Namespace::live();
        let first = cache.get(&live, web, 5, "e", &key);
        assert_eq!(cache.get(&live, web, 5, "e", &key), first, "shared");
        assert_ne!(cache.get(&live, web, 6, "e", &key), first, "a new revision");
        let ivr = Channel::parse("ivr").unwrap();
        let other = cache.get(&live, ivr, 6, "e", &key);
        let Some(proto::subscribe_response::Message::Heartbeat(beat)) =
            proto::SubscribeResponse::decode(other).unwrap().message
        else {
            panic!("not a heartbeat");
        };
        let trusted = safemode_signing::TrustedKeys::new([key.public_key().clone()]).unwrap();
        assert_eq!(
            wire::signed::verify_heartbeat(&beat, "live", "ivr", "e", &trusted),
            Ok(())
        );
        // Past its sharing time a stream gets a newer one.
        let young = HeartbeatCache::new(Duration::ZERO);
        let a = young.get(&live, web, 5, "e", &key);
        assert_ne!(young.get(&live, web, 5, "e", &key), a);
    }
}
