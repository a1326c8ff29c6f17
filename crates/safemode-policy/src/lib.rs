//! The policy core: actions, effects, modes, activations, the merge into an
//! effective policy, and decisions. It does no I/O and knows nothing of gRPC,
//! stores or files, so it can be tested and fuzzed alone; the API edge
//! converts to and from it. The YAML loaders (`mode_file`, `runbook_file`)
//! turn text into the domain's types, and [`catalog`] holds the standard
//! modes and runbooks built into every binary.
#![forbid(unsafe_code)]

pub mod activation;
pub mod catalog;
pub mod compile;
pub mod decide;
pub mod effect;
pub mod located;
pub mod mode;
pub mod mode_file;
pub mod names;
pub mod paths;
pub mod runbook;
pub mod runbook_file;
pub mod telemetry;
pub mod text;

pub use activation::{Activation, ActivationId, Change, Reason, Revision};
pub use compile::{ActionPolicy, ChannelPolicy, EffectivePolicy, Entry, StandingThrottle};
pub use decide::{Decision, Outcome, Verdict};
pub use effect::{Deny, Effect, EffectKind, ReadOnly, Review, Route, StepUp, Throttle};
pub use mode::{Condition, Context, Mode, ModeCatalog, ModeName, Rule};
pub use mode_file::{ModeFileError, parse_mode};
pub use names::{
    Action, ActionSelector, Channel, ChannelSet, MethodSet, NameError, Namespace, validate_action,
};
pub use runbook::{
    AcceptedDeadEnds, DuplicateRunbook, Expectation, ExpectationResult, Runbook, RunbookCatalog,
    RunbookName, Severity, Stage, StageMode, Transition,
};
pub use runbook_file::{
    Expectations, RunbookFileError, lint_runbook, parse_runbook, parse_runbook_checking,
};
pub use telemetry::{ConfidenceBand, ContextClass, MethodClass, SignalName};
pub use text::Text;
