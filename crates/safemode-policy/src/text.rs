//! [`Text`]: a review queue's name or a deny's alternative, as effects and
//! outcomes carry it.
//!
//! Every decision that sends an action to review names the queue, and
//! every refusal that offers an alternative names it, so these texts are
//! copied into decisions on the decide path. As `Arc<str>`, each copy was an
//! atomic increment of a reference count and the decision's drop an atomic
//! decrement, and two threads deciding the same review passed the count's
//! cache line between their cores. A `Text` is interned instead: the first
//! time a process meets a text, it is stored once for the life of the
//! process; every `Text` of it is then a pointer, and copying one touches
//! no shared memory.
//!
//! Interned texts are never freed, so the store is bounded:
//! [`INTERNED_BYTES`] of texts and table entries (the allocator's own
//! rounding comes on top, up to about twice that), and texts met after it
//! is full are reference-counted as before: still correct, only slower to
//! copy. Texts are made from mode files (after they are validated), from
//! snapshots a subscriber has verified, and in the controller from the
//! activations and proposals it reads back from its store, which only the
//! controller writes. Operators write all of them, so a process meets tens,
//! not thousands; a store written to by someone else can fill a
//! controller's table, which costs it at most the bound and copies that
//! count references again, nothing else. [`Text::intern`] is the one way to
//! make a `Text` (serde's `Deserialize` calls it), so that interning stays
//! a visible, deliberate step; the store is touched only then, never while
//! deciding.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What the process-wide store of interned texts may hold, in bytes: each
/// text's length plus [`OVERHEAD`] for its place in the table.
pub const INTERNED_BYTES: usize = 1 << 20;

/// What one interned text costs the store beyond its bytes (its entry in
/// the table), so that many short texts are bounded as well as long ones.
const OVERHEAD: usize = 32;

/// A queue name or an alternative: a string that is cheap to copy.
/// Compares, orders, hashes, prints and serializes as the string it holds.
#[derive(Clone)]
pub struct Text(Repr);

#[derive(Clone)]
enum Repr {
    /// Stored for the life of the process.
    Interned(&'static str),
    /// Met after the store was full: reference-counted.
    Shared(Arc<str>),
}

/// Interned texts and what they cost, up to a bound.
struct Store {
    texts: HashSet<&'static str>,
    bytes: usize,
    limit: usize,
}

impl Store {
    fn new(limit: usize) -> Store {
        Store {
            texts: HashSet::new(),
            bytes: 0,
            limit,
        }
    }

    /// `text` stored for the life of the process; `None` when there is no
    /// room for it.
    fn intern(&mut self, text: &str) -> Option<&'static str> {
        if let Some(&interned) = self.texts.get(text) {
            return Some(interned);
        }
        let cost = text.len() + OVERHEAD;
        if self.bytes + cost > self.limit {
            return None;
        }
        let interned: &'static str = Box::leak(Box::from(text));
        self.texts.insert(interned);
        self.bytes += cost;
        Some(interned)
    }
}

/// The process's store.
fn store() -> &'static Mutex<Store> {
    static STORE: OnceLock<Mutex<Store>> = OnceLock::new();
    STORE.get_or_init(|| Mutex::new(Store::new(INTERNED_BYTES)))
}

impl Text {
    /// The text `text`, interned for the life of the process unless the
    /// store is full (then reference-counted).
    pub fn intern(text: &str) -> Text {
        // A panic while holding the lock cannot leave the table half
        // written (an insert either happened or not), so a poisoned lock is
        // still sound to use.
        Text::in_store(
            &mut store().lock().unwrap_or_else(PoisonError::into_inner),
            text,
        )
    }

    /// A text as it is made once the store is full (reference-counted),
    /// and how many hold it: for tests of what owns texts.
    #[cfg(test)]
    pub(crate) fn shared(text: &str) -> (Text, impl Fn() -> usize) {
        let held = Arc::<str>::from(text);
        let weak = Arc::downgrade(&held);
        (Text(Repr::Shared(held)), move || weak.strong_count())
    }

    fn in_store(store: &mut Store, text: &str) -> Text {
        match store.intern(text) {
            Some(interned) => Text(Repr::Interned(interned)),
            None => Text(Repr::Shared(Arc::from(text))),
        }
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Interned(text) => text,
            Repr::Shared(text) => text,
        }
    }

    /// Whether the text is interned (the store had room when it was made).
    pub fn is_interned(&self) -> bool {
        matches!(self.0, Repr::Interned(_))
    }
}

impl Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Text {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Text) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Text {}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialOrd for Text {
    fn partial_cmp(&self, other: &Text) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Text {
    fn cmp(&self, other: &Text) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl Hash for Text {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl Serialize for Text {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Text, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Ok(Text::intern(&text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_text_is_stored_once() {
        let a = Text::intern("text-test-account-review");
        let b = Text::intern(&String::from("text-test-account-review"));
        assert!(a.is_interned() && b.is_interned());
        assert!(
            std::ptr::eq(a.as_str(), b.as_str()),
            "one copy in the store"
        );
        assert_eq!(a, b);
        assert_eq!(a, "text-test-account-review");
    }

    #[test]
    fn it_reads_as_the_string_it_holds() {
        let text = Text::intern("Use the app.");
        assert_eq!(text.to_string(), "Use the app.");
        assert_eq!(format!("{text:?}"), "\"Use the app.\"");
        assert_eq!(serde_json::to_string(&text).unwrap(), "\"Use the app.\"");
        let back: Text = serde_json::from_str("\"Use the app.\"").unwrap();
        assert_eq!(back, text);
        assert_eq!(text.len(), 12, "derefs to str");
        assert!(Text::intern("a") < Text::intern("b"));
    }

    #[test]
    fn a_full_store_interns_nothing_more() {
        // A store of its own, so that the process's stays empty for the
        // other tests.
        let mut store = Store::new(3 * (10 + OVERHEAD));
        let first = store.intern("queue-0001").expect("room");
        for i in 2..=3 {
            assert!(store.intern(&format!("queue-{i:04}")).is_some(), "room");
        }
        assert_eq!(store.intern("queue-0004"), None, "the store is bounded");
        assert!(
            std::ptr::eq(store.intern("queue-0001").expect("still there"), first),
            "a text interned before the store filled is still found"
        );
    }

    #[test]
    fn a_text_past_a_full_store_is_shared_and_reads_as_its_string() {
        let mut full = Store::new(0);
        let shared = Text::in_store(&mut full, "fraud-review");
        let interned = Text::intern("fraud-review");
        assert!(!shared.is_interned() && interned.is_interned());
        assert_eq!(shared, interned);
        assert_eq!(shared.to_string(), "fraud-review");
        assert_eq!(format!("[{shared:>14}]"), "[  fraud-review]", "pads");
        let mut texts = HashSet::new();
        texts.insert(interned);
        assert!(texts.contains(&shared), "hashes as its string");
        assert!(texts.contains("fraud-review"));
    }
}
