//! What the subscription stream sends: a `SubscribeResponse`, but one whose
//! snapshot is encoded once per revision and channel and then shared, bytes
//! and all, by every subscriber of that channel. With ten thousand
//! subscribers a change is converted and encoded a handful of times, not ten
//! thousand.
//!
//! `Outbound` stands in for `safemode.v1.SubscribeResponse` in the
//! subscription server that `build.rs` generates a second time (the
//! `fanout` module); on the wire it is exactly that message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use prost::encoding::{DecodeContext, WireType};

use crate::controller::NamespaceView;
use crate::policy::{Channel, Namespace, Revision};
use crate::wire::proto;

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

/// The newest encoded snapshot of each channel of each namespace. An
/// entry lives as long as the view it was encoded from is in use: a
/// namespace nobody follows any more (a finished drill) leaves nothing.
#[derive(Debug, Default)]
pub struct SnapshotCache {
    encoded: Mutex<HashMap<(Namespace, Channel), Cached>>,
}

#[derive(Debug)]
struct Cached {
    revision: Revision,
    view: Weak<NamespaceView>,
    bytes: Bytes,
}

impl SnapshotCache {
    /// The encoded snapshot of `channel` in `view`, made with `make` only by
    /// the first subscriber to ask.
    pub fn get(
        &self,
        view: &Arc<NamespaceView>,
        channel: Channel,
        make: impl FnOnce() -> proto::SubscribeResponse,
    ) -> Bytes {
        let key = (view.namespace.clone(), channel);
        // The very view, not only its revision: a re-read after compaction
        // can publish new contents under the same revision.
        if let Some(cached) = self.encoded.lock().expect("snapshot cache lock").get(&key)
            && cached.revision == view.revision
            && std::ptr::eq(cached.view.as_ptr(), Arc::as_ptr(view))
        {
            return cached.bytes.clone();
        }
        // Encoded outside the lock; two subscribers racing both encode,
        // and the newer revision stays.
        let bytes = Bytes::from(make().encode_to_vec());
        let mut encoded = self.encoded.lock().expect("snapshot cache lock");
        // Entries of views nobody holds any more go (views are replaced on
        // every change, so this also drops what a new revision replaced).
        encoded.retain(|_, cached| cached.view.strong_count() > 0);
        match encoded.get(&key) {
            Some(cached) if cached.revision > view.revision => {}
            _ => {
                encoded.insert(
                    key,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoded_response_is_exactly_the_message() {
        let message = proto::SubscribeResponse {
            message: Some(proto::subscribe_response::Message::Heartbeat(
                proto::Heartbeat {
                    revision: 7,
                    server_time: None,
                },
            )),
        };
        let encoded = Outbound::Encoded(Bytes::from(message.encode_to_vec()));
        assert_eq!(encoded.encoded_len(), message.encoded_len());
        assert_eq!(encoded.encode_to_vec(), message.encode_to_vec());
        let decoded = Outbound::decode(encoded.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, Outbound::Message(message));
    }

    fn heartbeat(revision: Revision) -> proto::SubscribeResponse {
        proto::SubscribeResponse {
            message: Some(proto::subscribe_response::Message::Heartbeat(
                proto::Heartbeat {
                    revision,
                    server_time: None,
                },
            )),
        }
    }

    #[test]
    fn the_cache_encodes_once_per_revision_and_forgets_dropped_views() {
        let cache = SnapshotCache::default();
        let web = Channel::parse("web").unwrap();
        let five = Arc::new(NamespaceView::empty_at(Namespace::live(), 5));
        let mut made = 0;
        for _ in 0..3 {
            let bytes = cache.get(&five, web, || {
                made += 1;
                heartbeat(5)
            });
            assert_eq!(bytes, heartbeat(5).encode_to_vec());
        }
        assert_eq!(made, 1, "encoded once, shared after");
        let six = Arc::new(NamespaceView::empty_at(Namespace::live(), 6));
        cache.get(&six, web, || {
            made += 1;
            heartbeat(6)
        });
        assert_eq!(made, 2);
        // An older revision asked late does not replace the newer one.
        cache.get(&five, web, || heartbeat(5));
        cache.get(&six, web, || panic!("6 is cached"));

        // A namespace nobody follows any more leaves nothing behind.
        let drill = Arc::new(NamespaceView::empty_at(
            Namespace::parse("drill-x").unwrap(),
            3,
        ));
        cache.get(&drill, web, || heartbeat(3));
        assert_eq!(cache.encoded.lock().unwrap().len(), 2);
        drop(drill);
        drop(five);
        cache.get(&six, Channel::parse("ivr").unwrap(), || heartbeat(6));
        let left: Vec<_> = cache.encoded.lock().unwrap().keys().cloned().collect();
        assert!(
            left.iter().all(|(n, _)| *n == Namespace::live()),
            "{left:?}"
        );
    }
}
