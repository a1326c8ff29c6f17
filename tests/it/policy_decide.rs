//! Decisions under the standard modes: what each mode in `runbooks/modes/`
//! makes every channel do, alone and combined with others.
//!
//! One feature, one helper: a [`Case`] names the activations (standard modes,
//! optionally scoped to channels), the channel, the action and the context,
//! and what the decision must be: the outcome written as one readable line,
//! the modes behind it (its reasons) and where its customer message and agent
//! script come from. [`check`] runs every case and reports every case that
//! fails, by name.

use std::fmt::Write as _;

use jiff::Timestamp;
use safemode_policy::catalog::standard_modes;
use safemode_policy::names::ACTIONS;
use safemode_policy::{
    Activation, ActivationId, Change, Channel, ChannelSet, Context, EffectivePolicy, MethodSet,
    ModeCatalog, Outcome, Reason,
};

// === The standard modes ===

const FREEZE: &str = "freeze-credential-changes";
const STEP_UP: &str = "step-up-account-changes";
const BOTS: &str = "bots-faq-only";
const READ_ONLY: &str = "read-only-last-known-good";
const VERIFIED: &str = "verified-channels-only";
const REVIEW_PAY: &str = "review-refunds-payouts";
const THROTTLE: &str = "throttle-high-risk";
const HANDOFF: &str = "handoff-guard";
const NOTICE: &str = "incident-notice";

const ALL_MODES: [&str; 9] = [
    FREEZE, STEP_UP, BOTS, READ_ONLY, VERIFIED, REVIEW_PAY, THROTTLE, HANDOFF, NOTICE,
];

const CHANNELS: [&str; 6] = ["chatbot", "ivr", "agent-desk", "web", "mobile", "email"];

const CREDENTIAL_CHANGES: [&str; 4] = [
    "account.password_reset",
    "account.email_change",
    "account.phone_change",
    "account.mfa_reset",
];

/// The time read-only activations are applied with.
const AS_OF: &str = "2025-03-01T12:00:00Z";

const FREEZE_DENY: &str = "deny: You can still sign in as usual. We will let you know as soon as changes are possible again.";
const FREEZE_RECOVERY_MESSAGE: &str = "Your recovery request has been passed to our account security team, who will contact you on the details already on file.";
const BOTS_DENY: &str = "deny: Use the app, or ask to speak to a person.";
/// The texts of throttle-high-risk's rule for refunds over 500.
const LARGE_REFUND_MESSAGE: &str = "Larger refunds are checked by our team before they are sent; this may take a little longer than usual.";
const LARGE_REFUND_SCRIPT: &str = "Refunds over 500 go to payments review during this incident; submit the request there and do not process it directly.";
const STEP_UP_FRESH: &str =
    "step_up 0.8 [totp,push,webauthn] max_attempts 3 attempts_left 3 escalate account-review";
const HANDOFF_FRESH: &str =
    "step_up 0.9 [push,webauthn] max_attempts 2 attempts_left 2 escalate handoff-review";

// === Cases ===

/// Where a decision's customer message or agent script must come from.
#[derive(Clone, Copy, Debug)]
enum Text {
    /// No text at all.
    Nothing,
    /// The mode's customer notice (for the message) or agent script.
    OfMode(&'static str),
    /// Exactly this text.
    Exactly(&'static str),
}

/// One decision to check.
struct Case {
    name: String,
    /// Activations in id order: `mode` for every channel, or
    /// `mode@chatbot,ivr` scoped to those channels.
    setup: Vec<&'static str>,
    channel: &'static str,
    action: String,
    ctx: Context,
    outcome: Option<String>,
    /// Mode names of the activations behind the decision, in reason order.
    reasons: Vec<&'static str>,
    messages: Option<(Text, Text)>,
}

fn case(
    name: impl Into<String>,
    setup: &[&'static str],
    channel: &'static str,
    action: &str,
) -> Case {
    Case {
        name: name.into(),
        setup: setup.to_vec(),
        channel,
        action: action.to_string(),
        ctx: Context::default(),
        outcome: None,
        reasons: Vec::new(),
        messages: None,
    }
}

impl Case {
    fn confidence(mut self, confidence: f64) -> Self {
        self.ctx.confidence = confidence;
        self
    }

    fn methods(mut self, methods: &[&str]) -> Self {
        self.ctx.methods = MethodSet::parse(methods).unwrap();
        self
    }

    fn failed(mut self, attempts: u32) -> Self {
        self.ctx.failed_attempts = attempts;
        self
    }

    fn amount(mut self, amount: f64) -> Self {
        self.ctx.amount = Some(amount);
        self
    }

    fn handoff(mut self) -> Self {
        self.ctx.handoff_from_bot = true;
        self
    }

    fn flags(mut self, flags: &[&str]) -> Self {
        self.ctx.bot_flags = flags.iter().map(|f| f.to_string()).collect();
        self
    }

    /// The outcome, and the modes whose activations the reasons name.
    fn gives(mut self, outcome: impl Into<String>, reasons: &[&'static str]) -> Self {
        self.outcome = Some(outcome.into());
        self.reasons = reasons.to_vec();
        self
    }

    /// An allow that no rule is behind: no reasons, no text.
    fn untouched(self) -> Self {
        self.gives("allow", &[]).says_nothing()
    }

    /// Customer notice and agent script of `mode`.
    fn says(mut self, mode: &'static str) -> Self {
        self.messages = Some((Text::OfMode(mode), Text::OfMode(mode)));
        self
    }

    fn says_nothing(mut self) -> Self {
        self.messages = Some((Text::Nothing, Text::Nothing));
        self
    }

    fn says_text(mut self, customer: &'static str, agent_script_of: &'static str) -> Self {
        self.messages = Some((Text::Exactly(customer), Text::OfMode(agent_script_of)));
        self
    }

    /// A rule's own customer message and agent script.
    fn says_exactly(mut self, customer: &'static str, agent: &'static str) -> Self {
        self.messages = Some((Text::Exactly(customer), Text::Exactly(agent)));
        self
    }
}

// === The check ===

/// What a decision came to, in comparable, printable form.
#[derive(Debug, PartialEq)]
struct Got {
    outcome: String,
    reasons: Vec<String>,
    customer_message: Option<String>,
    agent_script: Option<String>,
}

fn check(cases: Vec<Case>) {
    let modes = standard_modes();
    let mut failures = String::new();
    for case in &cases {
        if let Err(why) = check_one(&modes, case) {
            writeln!(failures, "case '{}':\n{why}\n", case.name).unwrap();
        }
    }
    assert!(failures.is_empty(), "{failures}");
}

fn check_one(modes: &ModeCatalog, case: &Case) -> Result<(), String> {
    let activations: Vec<Activation> = case
        .setup
        .iter()
        .enumerate()
        .map(|(i, spec)| activate(modes, i, spec))
        .collect();
    let policy = EffectivePolicy::compile(&activations);
    let channel = Channel::parse(case.channel).unwrap();
    let decision = policy.decide(channel, &case.action, &case.ctx);
    // A parsed action (the client's path, through the table of known
    // actions and the merges made beforehand) decides exactly as its name
    // does, texts included.
    if let Ok(action) = safemode_policy::Action::parse(&case.action) {
        let parsed = policy.channel(channel).decide_action(&action, &case.ctx);
        if parsed.outcome != decision.outcome
            || !parsed.reasons().eq(decision.reasons())
            || parsed.customer_message() != decision.customer_message()
            || parsed.agent_script() != decision.agent_script()
        {
            return Err(format!(
                "  decide_action({}) differs from decide: {:?} against {:?}",
                case.action, parsed.outcome, decision.outcome
            ));
        }
    }
    let mode_of = |id: &ActivationId| {
        let a = activations.iter().find(|a| &a.id == id).unwrap();
        a.mode.name.to_string()
    };
    let got = Got {
        outcome: render(&decision.outcome),
        reasons: decision.reasons().map(mode_of).collect(),
        customer_message: decision.customer_message().map(str::to_string),
        agent_script: decision.agent_script().map(str::to_string),
    };
    let (customer, agent) = case
        .messages
        .unwrap_or_else(|| panic!("case '{}' says nothing about messages", case.name));
    let text = |t: Text, pick: fn(&safemode_policy::Mode) -> Option<&str>| match t {
        Text::Nothing => None,
        Text::OfMode(m) => pick(modes.get(m).unwrap()).map(str::to_string),
        Text::Exactly(s) => Some(s.to_string()),
    };
    let want = Got {
        outcome: case
            .outcome
            .clone()
            .unwrap_or_else(|| panic!("case '{}' has no expected outcome", case.name)),
        reasons: case.reasons.iter().map(|m| m.to_string()).collect(),
        customer_message: text(customer, |m| m.customer_notice.as_deref()),
        agent_script: text(agent, |m| m.agent_script.as_deref()),
    };
    if got == want {
        Ok(())
    } else {
        Err(format!("  want: {want:?}\n   got: {got:?}"))
    }
}

/// Activation number `i` of `spec` (`mode` or `mode@channel,channel`).
fn activate(modes: &ModeCatalog, i: usize, spec: &str) -> Activation {
    let (name, channels) = match spec.split_once('@') {
        Some((name, channels)) => {
            let names: Vec<&str> = channels.split(',').collect();
            (name, ChannelSet::parse_selector(&names).unwrap())
        }
        None => (spec, ChannelSet::ALL),
    };
    let mode = modes
        .get(name)
        .unwrap_or_else(|| panic!("no standard mode '{name}'"));
    let change = Change {
        principal: "ic@example.com".into(),
        reason: Reason::parse("INC-4211 account-takeover wave").unwrap(),
        at: "2025-03-01T12:30:00Z".parse().unwrap(),
        incident_id: Some("INC-4211".into()),
    };
    let as_of: Timestamp = AS_OF.parse().unwrap();
    Activation::new(
        ActivationId::from_random(i as u64 + 1),
        mode,
        channels,
        as_of,
        &change,
    )
}

/// One line per outcome, with every parameter that matters.
fn render(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Allow => "allow".into(),
        Outcome::Throttle(t) => format!("throttle {}/{}s", t.max, t.window_seconds),
        Outcome::StepUp {
            required,
            attempts_left,
        } => format!(
            "step_up {} [{}] max_attempts {} attempts_left {attempts_left} escalate {}",
            required.min_confidence,
            required.methods.names().collect::<Vec<_>>().join(","),
            required.max_attempts,
            required.escalate_queue,
        ),
        Outcome::Review { queue, escalated } => {
            format!(
                "review {queue}{}",
                if *escalated { " (escalated)" } else { "" }
            )
        }
        Outcome::ReadOnly(r) => match r.as_of {
            Some(t) => format!("read_only as_of {t}"),
            None => "read_only as_of unset".into(),
        },
        Outcome::Route(r) => format!("route to {}", r.to),
        Outcome::Deny(d) => match &d.alternative {
            Some(alt) => format!("deny: {alt}"),
            None => "deny".into(),
        },
    }
}

// === One mode at a time ===

#[test]
fn freeze_credential_changes() {
    let mut cases = Vec::new();
    for channel in CHANNELS {
        for action in CREDENTIAL_CHANGES {
            cases.push(
                case(
                    format!("{action} denied on {channel}"),
                    &[FREEZE],
                    channel,
                    action,
                )
                .gives(FREEZE_DENY, &[FREEZE])
                .says(FREEZE),
            );
        }
        cases.push(
            case(
                format!("recovery reviewed on {channel}"),
                &[FREEZE],
                channel,
                "account.recovery",
            )
            .gives("review account-recovery", &[FREEZE])
            .says_text(FREEZE_RECOVERY_MESSAGE, FREEZE),
        );
        // A verified customer is still frozen: deny does not yield to identity.
        cases.push(
            case(
                format!("verified customer still denied on {channel}"),
                &[FREEZE],
                channel,
                "account.password_reset",
            )
            .confidence(1.0)
            .methods(&["webauthn"])
            .gives(FREEZE_DENY, &[FREEZE])
            .says(FREEZE),
        );
        for action in [
            "payment.refund",
            "payment.payout",
            "order.view",
            "balance.view",
            "contact.intake",
        ] {
            cases.push(
                case(
                    format!("{action} untouched on {channel}"),
                    &[FREEZE],
                    channel,
                    action,
                )
                .untouched(),
            );
        }
    }
    check(cases);
}

#[test]
fn step_up_account_changes() {
    let mut cases = Vec::new();
    for action in ACTIONS.iter().filter(|a| a.starts_with("account.")) {
        cases.push(
            case(
                format!("{action}: no verification yet"),
                &[STEP_UP],
                "ivr",
                action,
            )
            .gives(STEP_UP_FRESH, &[STEP_UP])
            .says(STEP_UP),
        );
        cases.push(
            case(
                format!("{action}: push at 0.9 passes"),
                &[STEP_UP],
                "agent-desk",
                action,
            )
            .confidence(0.9)
            .methods(&["push"])
            .gives("allow", &[STEP_UP])
            // A passed step-up: nothing to tell the customer.
            .says_nothing(),
        );
    }
    cases.extend([
        case("confidence too low, right method", &[STEP_UP], "web", "account.email_change")
            .confidence(0.79)
            .methods(&["webauthn"])
            .gives(STEP_UP_FRESH, &[STEP_UP])
            .says(STEP_UP),
        case("enough confidence, method not listed (sms_otp)", &[STEP_UP], "web", "account.email_change")
            .confidence(0.95)
            .methods(&["sms_otp"])
            .gives(STEP_UP_FRESH, &[STEP_UP])
            .says(STEP_UP),
        case("enough confidence, only knowledge questions", &[STEP_UP], "ivr", "account.phone_change")
            .confidence(0.95)
            .methods(&["kba", "password"])
            .gives(STEP_UP_FRESH, &[STEP_UP])
            .says(STEP_UP),
        case("confidence exactly at the minimum passes", &[STEP_UP], "mobile", "account.mfa_reset")
            .confidence(0.8)
            .methods(&["totp"])
            .gives("allow", &[STEP_UP])
            // A passed step-up: nothing to tell the customer.
            .says_nothing(),
        case("one listed method among others passes", &[STEP_UP], "mobile", "account.mfa_reset")
            .confidence(0.85)
            .methods(&["sms_otp", "kba", "webauthn"])
            .gives("allow", &[STEP_UP])
            // A passed step-up: nothing to tell the customer.
            .says_nothing(),
        case("one failed attempt leaves two", &[STEP_UP], "chatbot", "account.password_reset")
            .confidence(0.5)
            .failed(1)
            .gives(
                "step_up 0.8 [totp,push,webauthn] max_attempts 3 attempts_left 2 escalate account-review",
                &[STEP_UP],
            )
            .says(STEP_UP),
        case("two failed attempts leave one", &[STEP_UP], "chatbot", "account.password_reset")
            .failed(2)
            .gives(
                "step_up 0.8 [totp,push,webauthn] max_attempts 3 attempts_left 1 escalate account-review",
                &[STEP_UP],
            )
            .says(STEP_UP),
        case("three failed attempts escalate to review", &[STEP_UP], "chatbot", "account.password_reset")
            .failed(3)
            .gives("review account-review (escalated)", &[STEP_UP])
            .says(STEP_UP),
        // Once max_attempts is reached, even a good verification goes to a
        // human: the attempt limit is a hard stop, not a hurdle.
        case("attempts exhausted, then verified: still review", &[STEP_UP], "web", "account.recovery")
            .failed(5)
            .confidence(1.0)
            .methods(&["push"])
            .gives("review account-review (escalated)", &[STEP_UP])
            .says(STEP_UP),
        case("payments untouched", &[STEP_UP], "web", "payment.refund").untouched(),
        case("order view untouched", &[STEP_UP], "chatbot", "order.view").untouched(),
        case("bot intents untouched", &[STEP_UP], "chatbot", "bot.intent.faq").untouched(),
    ]);
    check(cases);
}

#[test]
fn bots_faq_only() {
    let mut cases = Vec::new();
    for channel in ["chatbot", "ivr"] {
        for action in ACTIONS
            .iter()
            .filter(|a| {
                a.starts_with("account.") || a.starts_with("payment.") || **a == "balance.view"
            })
            .copied()
            .chain(["bot.intent.refund_request", "bot.intent.change_address"])
        {
            cases.push(
                case(
                    format!("{action} refused on {channel}"),
                    &[BOTS],
                    channel,
                    action,
                )
                .gives(BOTS_DENY, &[BOTS])
                .says(BOTS),
            );
        }
        for action in [
            "bot.intent.faq",
            "bot.intent.order_status",
            "bot.intent.escalate",
            "order.view",
            "contact.intake",
            "handoff.ai_to_human",
        ] {
            cases.push(
                case(
                    format!("{action} still served on {channel}"),
                    &[BOTS],
                    channel,
                    action,
                )
                .untouched(),
            );
        }
    }
    for channel in ["agent-desk", "web", "mobile", "email"] {
        for action in [
            "account.password_reset",
            "payment.refund",
            "bot.intent.refund_request",
        ] {
            cases.push(
                case(
                    format!("{action} untouched on {channel}"),
                    &[BOTS],
                    channel,
                    action,
                )
                .untouched(),
            );
        }
    }
    check(cases);
}

#[test]
fn read_only_last_known_good() {
    let read_only = format!("read_only as_of {AS_OF}");
    let mut cases = Vec::new();
    for channel in CHANNELS {
        for action in ACTIONS
            .iter()
            .filter(|a| !["contact.intake", "handoff.ai_to_human"].contains(a))
            .copied()
            .chain(["bot.intent.order_status", "bot.intent.refund_request"])
        {
            cases.push(
                case(
                    format!("{action} read-only on {channel}"),
                    &[READ_ONLY],
                    channel,
                    action,
                )
                .gives(&read_only, &[READ_ONLY])
                .says(READ_ONLY),
            );
        }
        for action in [
            "contact.intake",
            "handoff.ai_to_human",
            "bot.intent.faq",
            "bot.intent.escalate",
        ] {
            cases.push(
                case(
                    format!("{action} still allowed on {channel}"),
                    &[READ_ONLY],
                    channel,
                    action,
                )
                .untouched(),
            );
        }
    }
    check(cases);
}

#[test]
fn verified_channels_only() {
    let mut cases = Vec::new();
    for channel in ["chatbot", "ivr", "email", "agent-desk"] {
        for action in ACTIONS
            .iter()
            .filter(|a| a.starts_with("account.") || a.starts_with("payment."))
        {
            cases.push(
                case(
                    format!("{action} routed from {channel}"),
                    &[VERIFIED],
                    channel,
                    action,
                )
                .gives("route to mobile", &[VERIFIED])
                .says(VERIFIED),
            );
        }
        // A strong verification on a weak channel does not make it verified.
        cases.push(
            case(
                format!("verified customer still routed from {channel}"),
                &[VERIFIED],
                channel,
                "payment.refund",
            )
            .confidence(1.0)
            .methods(&["webauthn"])
            .gives("route to mobile", &[VERIFIED])
            .says(VERIFIED),
        );
        for action in [
            "order.view",
            "balance.view",
            "contact.intake",
            "bot.intent.faq",
        ] {
            cases.push(
                case(
                    format!("{action} untouched on {channel}"),
                    &[VERIFIED],
                    channel,
                    action,
                )
                .untouched(),
            );
        }
    }
    for channel in ["web", "mobile"] {
        for action in [
            "account.password_reset",
            "account.recovery",
            "payment.refund",
            "payment.payout",
        ] {
            cases.push(
                case(
                    format!("{action} untouched on {channel}"),
                    &[VERIFIED],
                    channel,
                    action,
                )
                .untouched(),
            );
        }
    }
    check(cases);
}

#[test]
fn review_refunds_payouts() {
    let mut cases = Vec::new();
    for channel in CHANNELS {
        for action in ["payment.refund", "payment.payout"] {
            cases.push(
                case(
                    format!("{action} reviewed on {channel}"),
                    &[REVIEW_PAY],
                    channel,
                    action,
                )
                .amount(10.0)
                .gives("review payments-review", &[REVIEW_PAY])
                .says(REVIEW_PAY),
            );
        }
        for action in ["account.password_reset", "order.view", "balance.view"] {
            cases.push(
                case(
                    format!("{action} untouched on {channel}"),
                    &[REVIEW_PAY],
                    channel,
                    action,
                )
                .untouched(),
            );
        }
    }
    check(cases);
}

#[test]
fn throttle_high_risk() {
    let mut cases = Vec::new();
    for action in ACTIONS.iter().filter(|a| a.starts_with("account.")) {
        cases.push(
            case(format!("{action} 3 per hour"), &[THROTTLE], "web", action)
                .gives("throttle 3/3600s", &[THROTTLE])
                .says(THROTTLE),
        );
    }
    cases.extend([
        case(
            // A channel that does not say how much is involved gets the
            // stricter rule: an unknown amount may be over 500.
            "refund without an amount: reviewed",
            &[THROTTLE],
            "agent-desk",
            "payment.refund",
        )
        .gives("review payments-review", &[THROTTLE, THROTTLE])
        .says_exactly(LARGE_REFUND_MESSAGE, LARGE_REFUND_SCRIPT),
        case(
            "refund of 499.99: 5 a day",
            &[THROTTLE],
            "agent-desk",
            "payment.refund",
        )
        .amount(499.99)
        .gives("throttle 5/86400s", &[THROTTLE])
        .says(THROTTLE),
        case(
            "refund of exactly 500 is not over 500",
            &[THROTTLE],
            "agent-desk",
            "payment.refund",
        )
        .amount(500.0)
        .gives("throttle 5/86400s", &[THROTTLE])
        .says(THROTTLE),
        // The base entry and the amount entry both apply, so the activation
        // is named once per entry.
        case(
            "refund of 500.01 goes to review",
            &[THROTTLE],
            "agent-desk",
            "payment.refund",
        )
        .amount(500.01)
        .gives("review payments-review", &[THROTTLE, THROTTLE])
        .says_exactly(LARGE_REFUND_MESSAGE, LARGE_REFUND_SCRIPT),
        case(
            "refund of 10000 goes to review",
            &[THROTTLE],
            "mobile",
            "payment.refund",
        )
        .amount(10_000.0)
        .gives("review payments-review", &[THROTTLE, THROTTLE])
        .says_exactly(LARGE_REFUND_MESSAGE, LARGE_REFUND_SCRIPT),
        case(
            "payouts untouched, whatever the amount",
            &[THROTTLE],
            "web",
            "payment.payout",
        )
        .amount(10_000.0)
        .untouched(),
        case("order view untouched", &[THROTTLE], "web", "order.view").untouched(),
    ]);
    check(cases);
}

#[test]
fn handoff_guard() {
    let mut cases = Vec::new();
    for action in ACTIONS
        .iter()
        .filter(|a| a.starts_with("account.") || a.starts_with("payment."))
    {
        cases.extend([
            case(
                format!("{action}: hand-off needs fresh verification"),
                &[HANDOFF],
                "agent-desk",
                action,
            )
            .handoff()
            .confidence(0.7)
            .gives(HANDOFF_FRESH, &[HANDOFF])
            .says(HANDOFF),
            case(
                format!("{action}: hand-off verified by push"),
                &[HANDOFF],
                "agent-desk",
                action,
            )
            .handoff()
            .confidence(0.95)
            .methods(&["push"])
            .gives("allow", &[HANDOFF])
            // A passed step-up: nothing to tell the customer.
            .says_nothing(),
            case(
                format!("{action}: no hand-off"),
                &[HANDOFF],
                "agent-desk",
                action,
            )
            .untouched(),
            case(
                format!("{action}: chatbot unaffected"),
                &[HANDOFF],
                "chatbot",
                action,
            )
            .handoff()
            .untouched(),
        ]);
    }
    cases.extend([
        case(
            "totp does not count on a hand-off",
            &[HANDOFF],
            "agent-desk",
            "account.email_change",
        )
        .handoff()
        .confidence(0.95)
        .methods(&["totp"])
        .gives(HANDOFF_FRESH, &[HANDOFF])
        .says(HANDOFF),
        case(
            "0.85 is not enough on a hand-off",
            &[HANDOFF],
            "agent-desk",
            "account.email_change",
        )
        .handoff()
        .confidence(0.85)
        .methods(&["webauthn"])
        .gives(HANDOFF_FRESH, &[HANDOFF])
        .says(HANDOFF),
        case(
            "one failure leaves one attempt",
            &[HANDOFF],
            "agent-desk",
            "payment.refund",
        )
        .handoff()
        .failed(1)
        .gives(
            "step_up 0.9 [push,webauthn] max_attempts 2 attempts_left 1 escalate handoff-review",
            &[HANDOFF],
        )
        .says(HANDOFF),
        case(
            "two failures go to hand-off review",
            &[HANDOFF],
            "agent-desk",
            "payment.refund",
        )
        .handoff()
        .failed(2)
        .gives("review handoff-review (escalated)", &[HANDOFF])
        .says(HANDOFF),
        // Both conditional entries hold (hand-off; hand-off and flag), so the
        // activation is named once per entry.
        case(
            "flagged session reviewed despite high confidence",
            &[HANDOFF],
            "agent-desk",
            "account.password_reset",
        )
        .handoff()
        .flags(&["suspected_takeover"])
        .confidence(0.99)
        .methods(&["webauthn"])
        .gives("review handoff-review", &[HANDOFF, HANDOFF])
        .says(HANDOFF),
        case(
            "any listed flag counts",
            &[HANDOFF],
            "agent-desk",
            "payment.payout",
        )
        .handoff()
        .flags(&["marketing_opt_in", "identity_mismatch"])
        .gives("review handoff-review", &[HANDOFF, HANDOFF])
        .says(HANDOFF),
        case(
            "an unlisted flag only needs the step-up",
            &[HANDOFF],
            "agent-desk",
            "payment.payout",
        )
        .handoff()
        .flags(&["marketing_opt_in"])
        .gives(HANDOFF_FRESH, &[HANDOFF])
        .says(HANDOFF),
        case(
            "flag without hand-off: untouched",
            &[HANDOFF],
            "agent-desk",
            "payment.payout",
        )
        .flags(&["suspected_takeover"])
        .untouched(),
        case(
            "order view on a hand-off untouched",
            &[HANDOFF],
            "agent-desk",
            "order.view",
        )
        .handoff()
        .untouched(),
        case(
            "contact intake on a flagged hand-off untouched",
            &[HANDOFF],
            "agent-desk",
            "contact.intake",
        )
        .handoff()
        .flags(&["suspected_takeover"])
        .untouched(),
    ]);
    check(cases);
}

#[test]
fn incident_notice() {
    let mut cases = Vec::new();
    for channel in CHANNELS {
        for action in ACTIONS.iter().copied().chain(["bot.intent.faq"]) {
            cases.push(
                case(
                    format!("{action} allowed with notice on {channel}"),
                    &[NOTICE],
                    channel,
                    action,
                )
                .gives("allow", &[NOTICE])
                .says(NOTICE),
            );
        }
    }
    check(cases);
}

/// No activations: everything allowed, nothing said.
#[test]
fn no_activation_allows_everything() {
    let mut cases = Vec::new();
    for channel in CHANNELS {
        for action in ACTIONS.iter().copied().chain(["bot.intent.faq"]) {
            cases.push(case(format!("{action} on {channel}"), &[], channel, action).untouched());
        }
    }
    check(cases);
}

// === Combinations ===

#[test]
fn combinations() {
    check(vec![
        // freeze + step-up: deny beats step_up for the frozen changes...
        case(
            "freeze+step-up: password reset denied",
            &[FREEZE, STEP_UP],
            "web",
            "account.password_reset",
        )
        .confidence(1.0)
        .methods(&["webauthn"])
        .gives(FREEZE_DENY, &[FREEZE, STEP_UP])
        .says(FREEZE),
        case(
            "freeze+step-up: mfa reset denied",
            &[STEP_UP, FREEZE],
            "ivr",
            "account.mfa_reset",
        )
        // Reasons list the rule that names the action exactly first.
        .gives(FREEZE_DENY, &[FREEZE, STEP_UP])
        .says(FREEZE),
        // ...and review beats step_up for recovery: a passed step-up does not
        // let recovery skip the human, and the review is the freeze's own
        // (queue account-recovery, not escalated), with the freeze's message.
        case(
            "freeze+step-up: verified recovery still reviewed",
            &[FREEZE, STEP_UP],
            "web",
            "account.recovery",
        )
        .confidence(1.0)
        .methods(&["push"])
        .gives("review account-recovery", &[FREEZE, STEP_UP])
        .says_text(FREEZE_RECOVERY_MESSAGE, FREEZE),
        case(
            "freeze+step-up: failed recovery reviewed by freeze's queue",
            &[FREEZE, STEP_UP],
            "web",
            "account.recovery",
        )
        .failed(3)
        .gives("review account-recovery", &[FREEZE, STEP_UP])
        .says_text(FREEZE_RECOVERY_MESSAGE, FREEZE),
        case(
            "freeze+step-up: payments untouched",
            &[FREEZE, STEP_UP],
            "web",
            "payment.refund",
        )
        .untouched(),
        // step-up + throttle: a satisfied step-up leaves the throttle, and
        // the throttle's texts, not the step-up's "confirm it is you".
        case(
            "step-up+throttle: satisfied step-up is throttled",
            &[STEP_UP, THROTTLE],
            "mobile",
            "account.email_change",
        )
        .confidence(0.9)
        .methods(&["push"])
        .gives("throttle 3/3600s", &[STEP_UP, THROTTLE])
        .says(THROTTLE),
        case(
            "step-up+throttle: unsatisfied is a step-up",
            &[THROTTLE, STEP_UP],
            "mobile",
            "account.email_change",
        )
        .confidence(0.9)
        .gives(STEP_UP_FRESH, &[THROTTLE, STEP_UP])
        .says(STEP_UP),
        case(
            "step-up+throttle: exhausted goes to review",
            &[STEP_UP, THROTTLE],
            "mobile",
            "account.email_change",
        )
        .failed(3)
        .gives("review account-review (escalated)", &[STEP_UP, THROTTLE])
        .says(STEP_UP),
        case(
            "step-up+throttle: small refund only throttled",
            &[STEP_UP, THROTTLE],
            "mobile",
            "payment.refund",
        )
        .amount(20.0)
        .gives("throttle 5/86400s", &[THROTTLE])
        .says(THROTTLE),
        // Hand-off guard on top of step-up: the stricter limits of both
        // (0.9, push or webauthn, 2 attempts); the hand-off rule holds for
        // the more specific circumstance, so it leads: the escalation queue
        // and texts are the hand-off guard's.
        case(
            "step-up+handoff: limits merge toward safety",
            &[STEP_UP, HANDOFF],
            "agent-desk",
            "account.phone_change",
        )
        .handoff()
        .confidence(0.85)
        .methods(&["totp"])
        .gives(
            "step_up 0.9 [push,webauthn] max_attempts 2 attempts_left 2 escalate handoff-review",
            &[HANDOFF, STEP_UP],
        )
        .says(HANDOFF),
        case(
            "step-up+handoff: two failures escalate",
            &[HANDOFF, STEP_UP],
            "agent-desk",
            "account.phone_change",
        )
        .handoff()
        .failed(2)
        .gives("review handoff-review (escalated)", &[HANDOFF, STEP_UP])
        .says(HANDOFF),
        case(
            "step-up+handoff: without hand-off only step-up",
            &[STEP_UP, HANDOFF],
            "agent-desk",
            "account.phone_change",
        )
        .confidence(0.85)
        .methods(&["totp"])
        .gives("allow", &[STEP_UP])
        // A passed step-up: nothing to tell the customer.
        .says_nothing(),
        // Channel scope of an activation.
        case(
            "freeze on chatbot only: chatbot denied",
            &["freeze-credential-changes@chatbot"],
            "chatbot",
            "account.password_reset",
        )
        .gives(FREEZE_DENY, &[FREEZE])
        .says(FREEZE),
        case(
            "freeze on chatbot only: ivr untouched",
            &["freeze-credential-changes@chatbot"],
            "ivr",
            "account.password_reset",
        )
        .untouched(),
        case(
            "freeze on chatbot,ivr: agent desk untouched",
            &["freeze-credential-changes@chatbot,ivr"],
            "agent-desk",
            "account.password_reset",
        )
        .untouched(),
        case(
            "freeze on chatbot, step-up everywhere: ivr steps up",
            &["freeze-credential-changes@chatbot", STEP_UP],
            "ivr",
            "account.password_reset",
        )
        .gives(STEP_UP_FRESH, &[STEP_UP])
        .says(STEP_UP),
        // The scope narrows the rules, it never widens them: verified
        // channels scoped to web covers nothing at all.
        case(
            "verified-channels scoped to web: nothing routed",
            &["verified-channels-only@web"],
            "web",
            "payment.refund",
        )
        .untouched(),
        case(
            "verified-channels scoped to ivr: ivr routed",
            &["verified-channels-only@ivr"],
            "ivr",
            "payment.refund",
        )
        .gives("route to mobile", &[VERIFIED])
        .says(VERIFIED),
        // Route beats read-only where both apply; read-only alone elsewhere.
        case(
            "verified+read-only: chatbot account change routed",
            &[READ_ONLY, VERIFIED],
            "chatbot",
            "account.email_change",
        )
        .gives("route to mobile", &[VERIFIED, READ_ONLY])
        .says(VERIFIED),
        case(
            "verified+read-only: mobile is read-only",
            &[READ_ONLY, VERIFIED],
            "mobile",
            "account.email_change",
        )
        .gives(format!("read_only as_of {AS_OF}"), &[READ_ONLY])
        .says(READ_ONLY),
        // Bots and read-only: order status is served, read-only.
        case(
            "bots+read-only: order status read-only",
            &[BOTS, READ_ONLY],
            "chatbot",
            "bot.intent.order_status",
        )
        .gives(format!("read_only as_of {AS_OF}"), &[READ_ONLY])
        .says(READ_ONLY),
        case(
            "bots+read-only: other intents denied",
            &[BOTS, READ_ONLY],
            "chatbot",
            "bot.intent.refund_request",
        )
        .gives(BOTS_DENY, &[BOTS, READ_ONLY])
        .says(BOTS),
        // Review of refunds with the throttle: review wins. The message comes
        // from the winning rule (review-refunds), not from the first rule in
        // canonical order (the throttle's).
        case(
            "throttle+review: small refund reviewed, review's message",
            &[THROTTLE, REVIEW_PAY],
            "web",
            "payment.refund",
        )
        .amount(20.0)
        .gives("review payments-review", &[THROTTLE, REVIEW_PAY])
        .says(REVIEW_PAY),
        case(
            "throttle+review: large refund reviewed",
            &[THROTTLE, REVIEW_PAY],
            "web",
            "payment.refund",
        )
        .amount(900.0)
        // The conditional rule (amount over 500) leads with its own texts.
        .gives("review payments-review", &[THROTTLE, THROTTLE, REVIEW_PAY])
        .says_exactly(LARGE_REFUND_MESSAGE, LARGE_REFUND_SCRIPT),
        // Incident notice restricts nothing and yields its texts to any rule
        // that restricts, but speaks where nothing else does.
        case(
            "notice+freeze: denied with the freeze's texts",
            &[NOTICE, FREEZE],
            "web",
            "account.password_reset",
        )
        .gives(FREEZE_DENY, &[FREEZE, NOTICE])
        .says(FREEZE),
        case(
            "notice+freeze: recovery rule's own message",
            &[NOTICE, FREEZE],
            "web",
            "account.recovery",
        )
        .gives("review account-recovery", &[FREEZE, NOTICE])
        .says_text(FREEZE_RECOVERY_MESSAGE, FREEZE),
        case(
            "notice+freeze: order view allowed with the notice",
            &[FREEZE, NOTICE],
            "web",
            "order.view",
        )
        .gives("allow", &[NOTICE])
        .says(NOTICE),
        case(
            "notice+bots: faq allowed with the notice",
            &[BOTS, NOTICE],
            "chatbot",
            "bot.intent.faq",
        )
        .gives("allow", &[NOTICE])
        .says(NOTICE),
        // Two denies: the alternative and the texts come from the rule that
        // names the action most specifically (freeze names the password
        // reset; bots-faq-only covers `*`), whatever the order of the
        // activations or their random ids.
        case(
            "freeze then bots: freeze's deny on chatbot",
            &[FREEZE, BOTS],
            "chatbot",
            "account.password_reset",
        )
        .gives(FREEZE_DENY, &[FREEZE, BOTS])
        .says(FREEZE),
        case(
            "bots then freeze: still freeze's deny on chatbot",
            &[BOTS, FREEZE],
            "chatbot",
            "account.password_reset",
        )
        .gives(FREEZE_DENY, &[FREEZE, BOTS])
        .says(FREEZE),
        // Every standard mode at once: the strictest effect wins everywhere.
        case(
            "all modes: password reset on web denied",
            &ALL_MODES,
            "web",
            "account.password_reset",
        )
        .gives(FREEZE_DENY, &[FREEZE, STEP_UP, THROTTLE, READ_ONLY, NOTICE])
        .says(FREEZE),
        case(
            "all modes: refund on chatbot denied by bots",
            &ALL_MODES,
            "chatbot",
            "payment.refund",
        )
        .gives(
            BOTS_DENY,
            // No amount given: the large-refund rule holds too.
            &[
                THROTTLE, VERIFIED, THROTTLE, REVIEW_PAY, BOTS, READ_ONLY, NOTICE,
            ],
        )
        .says(BOTS),
        case(
            "all modes: refund on email routed",
            &ALL_MODES,
            "email",
            "payment.refund",
        )
        .gives(
            "route to mobile",
            &[THROTTLE, VERIFIED, THROTTLE, REVIEW_PAY, READ_ONLY, NOTICE],
        )
        .says(VERIFIED),
        case(
            "all modes: contact intake allowed with notice",
            &ALL_MODES,
            "ivr",
            "contact.intake",
        )
        .gives("allow", &[NOTICE])
        .says(NOTICE),
    ]);
}

/// Reasons are activation ids (the cases above show them as mode names):
/// the ids of the activations behind the decision, in canonical order.
#[test]
fn reasons_are_activation_ids() {
    let modes = standard_modes();
    let activations = [
        activate(&modes, 1, THROTTLE),
        activate(&modes, 0, STEP_UP),
        activate(&modes, 2, REVIEW_PAY),
    ];
    let policy = EffectivePolicy::compile(&activations);
    let web = Channel::parse("web").unwrap();
    // A small known amount, so only the unconditional refund rules apply.
    let ctx = Context {
        amount: Some(20.0),
        ..Context::default()
    };
    let ids = |action: &str| -> Vec<String> {
        let d = policy.decide(web, action, &ctx);
        d.reasons().map(|id| id.as_str().to_string()).collect()
    };
    assert_eq!(
        ids("account.email_change"),
        ["act_000000000001", "act_000000000002"]
    );
    assert_eq!(
        ids("payment.refund"),
        ["act_000000000002", "act_000000000003"]
    );
    assert_eq!(ids("order.view"), Vec::<String>::new());
}

/// A channel service parses its actions once; a misspelt one is an error
/// there, not a silent `allow` on every request.
#[test]
fn actions_are_checked_when_parsed() {
    use safemode_policy::Action;
    for good in [
        "account.password_reset",
        "bot.intent.faq",
        "handoff.ai_to_human",
    ] {
        assert_eq!(Action::parse(good).unwrap().as_str(), good);
    }
    for bad in [
        "account.password-reset",
        "Account.Password_Reset",
        "account.pasword_reset",
        "account",
        "bot.intent.",
        "",
    ] {
        let error = Action::parse(bad).unwrap_err();
        assert!(error.0.contains(&format!("'{bad}'")), "{bad}: {error}");
    }
}
