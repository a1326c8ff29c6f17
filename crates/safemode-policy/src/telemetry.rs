//! What channels report about what they decided and saw, without ever
//! naming a customer: a decision's context reduced to a [`ContextClass`]
//! (a few coarse bands, 48 classes in all), and named signal counters
//! ([`SignalName`], such as `login.failed`). The controller aggregates them
//! into the inconsistency map, soft downtime and trigger evaluation.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::decide::Outcome;
use super::mode::Context;
use super::names::{METHODS, MethodSet, NameError};

/// How sure a channel is of the customer's identity, in three bands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfidenceBand {
    /// Below 0.5.
    Low,
    /// 0.5 up to 0.8.
    Medium,
    /// 0.8 and above.
    High,
}

impl ConfidenceBand {
    /// Every band, in order.
    pub const ALL: [ConfidenceBand; 3] = [Self::Low, Self::Medium, Self::High];

    /// The band of `confidence` (a value that is not a number is low).
    /// Two comparisons added rather than branched on: it is on the decide
    /// path of every client.
    #[inline]
    pub fn of(confidence: f64) -> Self {
        match u8::from(confidence >= 0.5) + u8::from(confidence >= 0.8) {
            0 => ConfidenceBand::Low,
            1 => ConfidenceBand::Medium,
            _ => ConfidenceBand::High,
        }
    }

    /// Its name on the wire and on screen.
    pub fn as_str(self) -> &'static str {
        match self {
            ConfidenceBand::Low => "low",
            ConfidenceBand::Medium => "medium",
            ConfidenceBand::High => "high",
        }
    }
}

/// The strongest kind of verification a customer passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MethodClass {
    /// None passed.
    None,
    /// Something known: a password, knowledge-based questions.
    Knowledge,
    /// Something held: a one-time code, a push, an authenticator, a call back.
    Possession,
    /// Phishing-resistant or in person: WebAuthn, an identity document.
    Strong,
}

impl MethodClass {
    /// Every class, weakest first.
    pub const ALL: [MethodClass; 4] = [Self::None, Self::Knowledge, Self::Possession, Self::Strong];

    /// The class of one method of [`METHODS`].
    const fn of_method(method: &str) -> Self {
        match method.as_bytes() {
            b"password" | b"kba" => MethodClass::Knowledge,
            b"webauthn" | b"id_document" => MethodClass::Strong,
            _ => MethodClass::Possession,
        }
    }

    /// The bits of [`MethodSet`] whose methods are of `class`.
    const fn mask(class: MethodClass) -> u16 {
        let mut mask = 0;
        let mut i = 0;
        while i < METHODS.len() {
            if MethodClass::of_method(METHODS[i]) as u8 == class as u8 {
                mask |= 1 << i;
            }
            i += 1;
        }
        mask
    }

    /// The strongest class among `methods`, in a few bit tests (it is on
    /// the decide path of every client).
    #[inline]
    pub fn strongest(methods: MethodSet) -> Self {
        const STRONG: u16 = MethodClass::mask(MethodClass::Strong);
        const POSSESSION: u16 = MethodClass::mask(MethodClass::Possession);
        const KNOWLEDGE: u16 = MethodClass::mask(MethodClass::Knowledge);
        let bits = methods.bits();
        if bits & STRONG != 0 {
            MethodClass::Strong
        } else if bits & POSSESSION != 0 {
            MethodClass::Possession
        } else if bits & KNOWLEDGE != 0 {
            MethodClass::Knowledge
        } else {
            MethodClass::None
        }
    }

    /// Its name on the wire and on screen.
    pub fn as_str(self) -> &'static str {
        match self {
            MethodClass::None => "none",
            MethodClass::Knowledge => "knowledge",
            MethodClass::Possession => "possession",
            MethodClass::Strong => "strong",
        }
    }
}

/// A decision's context, coarsely: what the inconsistency map compares
/// across channels ("the same action in the same class of context got
/// different outcomes"). It holds nothing that identifies a customer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContextClass {
    pub confidence: ConfidenceBand,
    pub method: MethodClass,
    /// A bot handed the session over.
    pub handoff: bool,
    /// A step-up's attempts ran out, so the action went to review.
    pub attempts_exhausted: bool,
}

impl ContextClass {
    /// How many classes there are.
    pub const COUNT: usize = ConfidenceBand::ALL.len() * MethodClass::ALL.len() * 2 * 2;

    /// The class of a decision made for `ctx` with `outcome`.
    pub fn of(ctx: &Context, outcome: &Outcome) -> Self {
        ContextClass::of_decision(ctx, outcome.is_escalated())
    }

    /// [`ContextClass::of`] for a decision whose outcome is, or is not, a
    /// review that a step-up escalated to.
    #[inline]
    pub fn of_decision(ctx: &Context, escalated: bool) -> Self {
        ContextClass {
            confidence: ConfidenceBand::of(ctx.confidence),
            method: MethodClass::strongest(ctx.methods),
            handoff: ctx.handoff_from_bot,
            attempts_exhausted: escalated && ctx.failed_attempts > 0,
        }
    }

    /// Its place in `0..COUNT`, for tables indexed by class.
    pub fn index(self) -> usize {
        let band = self.confidence as usize;
        let method = self.method as usize;
        ((band * MethodClass::ALL.len() + method) * 2 + usize::from(self.handoff)) * 2
            + usize::from(self.attempts_exhausted)
    }

    /// The class at `index` (`None` past [`Self::COUNT`]).
    pub fn from_index(index: usize) -> Option<Self> {
        if index >= Self::COUNT {
            return None;
        }
        let attempts_exhausted = index % 2 == 1;
        let handoff = (index / 2) % 2 == 1;
        let rest = index / 4;
        Some(ContextClass {
            confidence: ConfidenceBand::ALL[rest / MethodClass::ALL.len()],
            method: MethodClass::ALL[rest % MethodClass::ALL.len()],
            handoff,
            attempts_exhausted,
        })
    }

    /// Parses the parts as the wire carries them.
    pub fn parse(
        confidence: &str,
        method: &str,
        handoff: bool,
        attempts_exhausted: bool,
    ) -> Result<Self, NameError> {
        let confidence = ConfidenceBand::ALL
            .into_iter()
            .find(|b| b.as_str() == confidence)
            .ok_or_else(|| {
                NameError(format!(
                    "unknown confidence band '{confidence}'; known: low, medium, high"
                ))
            })?;
        let method = MethodClass::ALL
            .into_iter()
            .find(|m| m.as_str() == method)
            .ok_or_else(|| {
                NameError(format!(
                    "unknown method class '{method}'; known: none, knowledge, possession, strong"
                ))
            })?;
        Ok(ContextClass {
            confidence,
            method,
            handoff,
            attempts_exhausted,
        })
    }

    /// A representative context of the class, to ask a policy what it
    /// decides for it (the middle of the band; the class's weakest method).
    pub fn example(self) -> Context {
        let confidence = match self.confidence {
            ConfidenceBand::Low => 0.3,
            ConfidenceBand::Medium => 0.65,
            ConfidenceBand::High => 0.9,
        };
        let method = match self.method {
            MethodClass::None => None,
            MethodClass::Knowledge => Some("password"),
            MethodClass::Possession => Some("sms_otp"),
            MethodClass::Strong => Some("webauthn"),
        };
        Context {
            confidence,
            methods: method.map_or(MethodSet::NONE, |m| {
                MethodSet::parse(&[m]).expect("a known method")
            }),
            failed_attempts: if self.attempts_exhausted { u32::MAX } else { 0 },
            amount: None,
            handoff_from_bot: self.handoff,
            bot_flags: Vec::new(),
        }
    }
}

impl fmt::Display for ContextClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "confidence {}, {} verification",
            self.confidence.as_str(),
            self.method.as_str()
        )?;
        if self.handoff {
            f.write_str(", handed off by a bot")?;
        }
        if self.attempts_exhausted {
            f.write_str(", attempts exhausted")?;
        }
        Ok(())
    }
}

/// The name of a signal counter a channel reports, such as `login.failed`
/// or `password_reset.requested`: dot-separated segments of a-z, 0-9 and _,
/// at most [`SignalName::MAX_LEN`] bytes. Names under `safemode.` are the
/// client's own.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SignalName(Arc<str>);

impl SignalName {
    /// The longest name, in bytes.
    pub const MAX_LEN: usize = 64;
    /// Counted by the client itself: a step-up asked again after a failed
    /// attempt.
    pub const STEP_UP_FAILED: &'static str = "safemode.step_up_failed";
    /// Counted by the client itself: a step-up's attempts ran out.
    pub const ATTEMPTS_EXHAUSTED: &'static str = "safemode.attempts_exhausted";

    /// Parses a signal name.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let segment_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        if name.is_empty() || name.len() > Self::MAX_LEN || !name.split('.').all(segment_ok) {
            return Err(NameError(format!(
                "bad signal name '{}': use dot-separated words of a-z, 0-9 and _ (like login.failed), at most {} bytes",
                name.escape_debug()
                    .to_string()
                    .chars()
                    .take(80)
                    .collect::<String>(),
                Self::MAX_LEN
            )));
        }
        Ok(SignalName(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the name is under `safemode.`, the client's own counters: a
    /// service's or a script's signal may not use it.
    pub fn is_reserved(&self) -> bool {
        self.0.starts_with("safemode.")
    }
}

impl TryFrom<String> for SignalName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        SignalName::parse(&s)
    }
}

impl From<SignalName> for String {
    fn from(s: SignalName) -> String {
        s.0.to_string()
    }
}

impl fmt::Display for SignalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Bounds of what one report carries and how often it may come.
pub mod limits {
    use std::time::Duration;

    /// A subscriber reports at most this often.
    pub const REPORT_EVERY: Duration = Duration::from_secs(10);
    /// Decision rows in one report, at most.
    pub const MAX_DECISION_ROWS: usize = 1024;
    /// Signal counters in one report, at most.
    pub const MAX_SIGNALS: usize = 64;
    /// One report's encoded size, at most.
    pub const MAX_REPORT_BYTES: usize = 64 * 1024;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_has_its_own_index_and_comes_back_from_it() {
        let mut seen = std::collections::HashSet::new();
        for index in 0..ContextClass::COUNT {
            let class = ContextClass::from_index(index).unwrap();
            assert_eq!(class.index(), index);
            assert!(seen.insert(class));
        }
        assert_eq!(ContextClass::from_index(ContextClass::COUNT), None);
    }

    #[test]
    fn a_context_falls_in_its_class() {
        let methods = |m: &[&str]| MethodSet::parse(m).unwrap();
        let cases = [
            (0.0, &[][..], MethodClass::None, ConfidenceBand::Low),
            (0.49, &["kba"], MethodClass::Knowledge, ConfidenceBand::Low),
            (
                0.5,
                &["password", "sms_otp"],
                MethodClass::Possession,
                ConfidenceBand::Medium,
            ),
            (
                0.79,
                &["push"],
                MethodClass::Possession,
                ConfidenceBand::Medium,
            ),
            (
                0.8,
                &["sms_otp", "webauthn"],
                MethodClass::Strong,
                ConfidenceBand::High,
            ),
            (
                f64::NAN,
                &["id_document"],
                MethodClass::Strong,
                ConfidenceBand::Low,
            ),
        ];
        for (confidence, m, method, band) in cases {
            let ctx = Context {
                confidence,
                methods: methods(m),
                ..Context::default()
            };
            let class = ContextClass::of(&ctx, &Outcome::Allow);
            assert_eq!(
                (class.confidence, class.method),
                (band, method),
                "{confidence} {m:?}"
            );
            assert!(!class.handoff && !class.attempts_exhausted);
            // The example of a class is in the class.
            assert_eq!(ContextClass::of(&class.example(), &Outcome::Allow), class);
        }
    }

    #[test]
    fn signal_names_are_checked() {
        for good in ["login.failed", "password_reset.requested", "a", "x.y2.z_3"] {
            SignalName::parse(good).unwrap();
        }
        let long = "a".repeat(65);
        for bad in [
            "",
            "Login.failed",
            "login..failed",
            ".x",
            "x.",
            "a b",
            "ü",
            long.as_str(),
        ] {
            let e = SignalName::parse(bad).unwrap_err().to_string();
            assert!(e.contains("bad signal name"), "{bad}: {e}");
        }
    }

    #[test]
    fn every_set_of_methods_is_in_the_class_of_its_strongest() {
        for subset in 0u32..(1 << METHODS.len()) {
            let names: Vec<&str> = METHODS
                .iter()
                .enumerate()
                .filter(|(i, _)| subset & (1 << i) != 0)
                .map(|(_, m)| *m)
                .collect();
            let strongest = names
                .iter()
                .map(|m| MethodClass::of_method(m))
                .max()
                .unwrap_or(MethodClass::None);
            let set = MethodSet::parse(&names).unwrap();
            assert_eq!(MethodClass::strongest(set), strongest, "{names:?}");
        }
    }

    #[test]
    fn confidence_falls_in_its_band_at_every_edge() {
        let cases = [
            (f64::NEG_INFINITY, ConfidenceBand::Low),
            (-0.0, ConfidenceBand::Low),
            (0.5_f64.next_down(), ConfidenceBand::Low),
            (0.5, ConfidenceBand::Medium),
            (0.8_f64.next_down(), ConfidenceBand::Medium),
            (0.8, ConfidenceBand::High),
            (1.0, ConfidenceBand::High),
            (f64::INFINITY, ConfidenceBand::High),
            (f64::NAN, ConfidenceBand::Low),
        ];
        for (confidence, band) in cases {
            assert_eq!(ConfidenceBand::of(confidence), band, "{confidence}");
        }
    }

    #[test]
    fn each_method_is_in_its_class_by_name_and_by_bits() {
        for m in METHODS {
            let by_name = MethodClass::of_method(m);
            assert_ne!(by_name, MethodClass::None);
            assert_eq!(
                MethodClass::strongest(MethodSet::parse(&[m]).unwrap()),
                by_name,
                "{m}"
            );
        }
    }
}
