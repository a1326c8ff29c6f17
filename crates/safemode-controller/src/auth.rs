//! Who may do what: bearer tokens, principals, roles, and the one table
//! that says which role may do which operation in which namespace.
//!
//! Tokens are stored hashed (SHA-256) in a tokens file given to
//! `safemode serve --tokens FILE`, one YAML entry per token:
//!
//! ```yaml
//! - {principal: alice, roles: [commander], sha256: 9f86d081884c7d65...}
//! ```
//!
//! `safemode token create` prints a new token once, with the line to add.
//! A running server re-reads the file when it changes ([`TokensFile`]), so a
//! token is revoked by removing its line.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};
use sha2::{Digest, Sha256};

use safemode_policy::Namespace;
use safemode_policy::located::LocatedError;

/// A role a principal holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Reads status, incidents, requests and the audit log.
    Viewer,
    /// Subscribes to a channel's policy, and nothing else.
    Subscriber,
    /// Applies and lifts modes, declares, escalates and resolves incidents.
    Commander,
    /// Approves a change another principal requested.
    Approver,
    /// Does everything a commander and an approver do, in drill namespaces
    /// only.
    Drill,
    /// Everything.
    Admin,
    /// Raises proposals, and nothing else: the token an external detector
    /// (a monitoring alert calling a webhook) holds. A proposal never
    /// declares anything; a commander turns it into an incident.
    Detector,
}

/// Every role, in order.
pub const ROLES: [Role; 7] = [
    Role::Viewer,
    Role::Subscriber,
    Role::Commander,
    Role::Approver,
    Role::Drill,
    Role::Admin,
    Role::Detector,
];

impl Role {
    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Subscriber => "subscriber",
            Role::Commander => "commander",
            Role::Approver => "approver",
            Role::Drill => "drill",
            Role::Admin => "admin",
            Role::Detector => "detector",
        }
    }

    /// Parses a role name.
    pub fn parse(name: &str) -> Result<Role, String> {
        ROLES
            .into_iter()
            .find(|r| r.as_str() == name)
            .ok_or_else(|| {
                format!(
                    "unknown role '{name}'; roles are {}",
                    ROLES.map(Role::as_str).join(", ")
                )
            })
    }

    /// Whether this role allows `operation` in `namespace` (`None`: an
    /// operation on no namespace, such as reading the mode catalogue).
    fn allows(self, operation: Operation, namespace: Option<&Namespace>) -> bool {
        use Operation::*;
        match self {
            Role::Admin => true,
            Role::Viewer => matches!(operation, Subscribe | Read | ReadAudit),
            Role::Subscriber => matches!(operation, Subscribe | Report),
            Role::Commander => {
                matches!(operation, Subscribe | Read | ReadAudit | Change | Propose)
            }
            Role::Approver => matches!(operation, Subscribe | Read | ReadAudit | Approve),
            // Reads of no namespace (the catalogue) are harmless; a write
            // always names its namespace, and it must be a drill's.
            Role::Drill => match operation {
                Subscribe | Read => namespace.is_none_or(Namespace::is_drill),
                Report => namespace.is_some_and(Namespace::is_drill),
                Change | Approve | Propose => namespace.is_some_and(Namespace::is_drill),
                ReadAudit => false,
            },
            Role::Detector => matches!(operation, Propose),
        }
    }
}

/// The roles that allow `operation` in `namespace`, in [`ROLES`] order:
/// who may approve a request there, for instance.
pub fn roles_allowed(operation: Operation, namespace: Option<&Namespace>) -> Vec<Role> {
    ROLES
        .into_iter()
        .filter(|role| role.allows(operation, namespace))
        .collect()
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a request does, for permission checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Subscribe to a channel's policy.
    Subscribe,
    /// Read status, modes, runbooks, incidents, requests.
    Read,
    /// Read or verify the audit log.
    ReadAudit,
    /// Apply or lift modes; declare, escalate or resolve incidents.
    Change,
    /// Approve another principal's request.
    Approve,
    /// Report what a channel decided and saw (counts and signals) over a
    /// subscription: they feed insights and early-warning proposals, so
    /// only channel services may (not a viewer watching the policy).
    Report,
    /// Raise a proposal to declare an incident (an external detector).
    Propose,
}

impl Operation {
    /// Whether the operation changes state (its refusals are audited).
    pub fn writes(self) -> bool {
        matches!(
            self,
            Operation::Change | Operation::Approve | Operation::Propose
        )
    }

    fn describe(self) -> &'static str {
        match self {
            Operation::Subscribe => "subscribe",
            Operation::Read => "read status, insights or proposals",
            Operation::ReadAudit => "read the audit log",
            Operation::Change => "change modes or incidents",
            Operation::Approve => "approve requests",
            Operation::Report => "report decisions and signals",
            Operation::Propose => "raise proposals",
        }
    }
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// Who.
    pub name: String,
    /// What they may do.
    pub roles: Vec<Role>,
}

/// A principal lacks the role for an operation.
#[derive(Debug, thiserror::Error)]
#[error("{principal} (roles: {roles}) may not {what}{scope}; that needs {needs}")]
pub struct Denied {
    /// Who.
    pub principal: String,
    /// Their roles, joined.
    pub roles: String,
    what: &'static str,
    scope: String,
    needs: String,
}

impl Principal {
    /// The caller of a server without a tokens file: it serves loopback only,
    /// and whoever reaches it may do everything.
    pub fn local() -> Self {
        Principal {
            name: "local".into(),
            roles: vec![Role::Admin],
        }
    }

    /// The role names, for audit entries.
    pub fn role_names(&self) -> Vec<String> {
        self.roles.iter().map(|r| r.as_str().to_string()).collect()
    }

    /// Whether the principal may do `operation` in `namespace`.
    pub fn may(&self, operation: Operation, namespace: Option<&Namespace>) -> Result<(), Denied> {
        if self.roles.iter().any(|r| r.allows(operation, namespace)) {
            return Ok(());
        }
        let needs: Vec<&str> = ROLES
            .into_iter()
            .filter(|r| *r != Role::Admin && r.allows(operation, namespace))
            .map(Role::as_str)
            .collect();
        Err(Denied {
            principal: self.name.clone(),
            roles: self.role_names().join(","),
            what: operation.describe(),
            scope: namespace
                .map(|n| format!(" in namespace {n}"))
                .unwrap_or_default(),
            needs: if needs.is_empty() {
                "the admin role".to_string()
            } else {
                format!("the {} role", needs.join(" or "))
            },
        })
    }
}

/// A tokens file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// The file cannot be read.
    #[error("cannot read tokens file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// An entry is wrong: a [`LocatedError`], as mode and runbook files
    /// report theirs.
    #[error("{file}:{line}:{column}: {message}")]
    Invalid {
        /// The file.
        file: String,
        /// 1-based line.
        line: u64,
        /// 1-based column.
        column: u64,
        /// What is wrong.
        message: String,
    },
    /// A principal's name breaks the naming rule.
    #[error("{0}")]
    Principal(String),
    /// The file lists no token: nobody could call the server.
    #[error("the tokens file {path} lists no token; add one with `safemode token create`")]
    Empty {
        /// The file.
        path: String,
    },
}

impl From<LocatedError> for TokensError {
    fn from(e: LocatedError) -> Self {
        TokensError::Invalid {
            file: e.file,
            line: e.line.into(),
            column: e.column.into(),
            message: e.message,
        }
    }
}

/// An entry that is wrong, its message without the bearer tokens it quotes:
/// errors quote the text they trip on, which may be a token pasted where its
/// hash belongs, and the error goes to logs.
fn invalid_entry(e: LocatedError) -> TokensError {
    LocatedError {
        message: redact_tokens(&e.message),
        ..e
    }
    .into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenSpec {
    principal: Spanned<String>,
    roles: Spanned<Vec<Spanned<String>>>,
    sha256: Spanned<String>,
}

/// The tokens a server accepts, by hash.
#[derive(Debug, Default)]
pub struct Tokens {
    by_hash: HashMap<String, Arc<Principal>>,
}

impl Tokens {
    /// Parses tokens file text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Tokens, TokensError> {
        let invalid =
            |at: Location, message: String| invalid_entry(LocatedError::new(file, at, message));
        if text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            return Ok(Tokens::default());
        }
        let options = safemode_policy::mode_file::yaml_options();
        let specs: Vec<TokenSpec> = serde_saphyr::from_str_with_options(text, options)
            .map_err(|e| invalid_entry(LocatedError::from_yaml(file, &e)))?;
        let mut by_hash = HashMap::new();
        for spec in specs {
            let name = principal_name(&spec.principal.value).map_err(|rule| {
                let shown: String = spec.principal.value.trim().chars().take(64).collect();
                invalid(
                    spec.principal.referenced,
                    format!("bad principal '{}': {rule}", shown.escape_debug()),
                )
            })?;
            if spec.roles.value.is_empty() {
                return Err(invalid(
                    spec.roles.referenced,
                    "a token needs at least one role".into(),
                ));
            }
            let mut roles = Vec::new();
            for role in &spec.roles.value {
                let parsed = Role::parse(&role.value).map_err(|m| invalid(role.referenced, m))?;
                if !roles.contains(&parsed) {
                    roles.push(parsed);
                }
            }
            roles.sort();
            let hash = spec.sha256.value.to_ascii_lowercase();
            let l = spec.sha256.referenced;
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(
                    l,
                    "sha256 must be 64 hex digits, as `safemode token create` prints".into(),
                ));
            }
            let principal = Arc::new(Principal { name, roles });
            if by_hash.insert(hash, principal).is_some() {
                return Err(invalid(l, "this token is listed twice".into()));
            }
        }
        Ok(Tokens { by_hash })
    }

    /// The principal a bearer token belongs to.
    pub fn authenticate(&self, token: &str) -> Option<Arc<Principal>> {
        self.principal_of(&hash_token(token))
    }

    /// The principal the token with hash `sha256` belongs to.
    pub fn principal_of(&self, sha256: &str) -> Option<Arc<Principal>> {
        self.by_hash.get(sha256).cloned()
    }

    /// The principals, by name, with the number of tokens each holds.
    fn principals(&self) -> std::collections::BTreeMap<&str, usize> {
        let mut names = std::collections::BTreeMap::new();
        for principal in self.by_hash.values() {
            *names.entry(principal.name.as_str()).or_default() += 1;
        }
        names
    }

    /// What changed from `before` to `self`, for the log: e.g. "3 tokens;
    /// principals added: bob; removed: alice".
    pub fn describe_change(&self, before: &Tokens) -> String {
        let (old, new) = (before.principals(), self.principals());
        let added: Vec<&str> = new
            .keys()
            .filter(|n| !old.contains_key(*n))
            .copied()
            .collect();
        let removed: Vec<&str> = old
            .keys()
            .filter(|n| !new.contains_key(*n))
            .copied()
            .collect();
        let revoked = before
            .by_hash
            .keys()
            .filter(|h| !self.by_hash.contains_key(*h))
            .count();
        let mut text = format!("{} tokens, {revoked} revoked", self.len());
        if !added.is_empty() {
            text.push_str(&format!("; principals added: {}", added.join(", ")));
        }
        if !removed.is_empty() {
            text.push_str(&format!("; principals removed: {}", removed.join(", ")));
        }
        text
    }

    /// How many tokens the file lists.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether the file lists no token.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

/// The tokens file a server was given, re-read when its contents change.
/// A change is applied once two reads in a row agree (a file rewritten in
/// place can be read half-written, and its first half may parse). A file
/// that became unusable (unreadable, invalid, empty) changes nothing: the
/// server keeps the tokens it has and says why.
#[derive(Debug)]
pub struct TokensFile {
    path: PathBuf,
    /// The contents last taken, valid or not.
    seen: Vec<u8>,
    /// Why `seen` cannot be used, if it cannot.
    seen_problem: Option<String>,
    /// New contents read once, to be taken if the next read agrees.
    pending: Option<Vec<u8>>,
}

/// What a re-read of the tokens file found.
#[derive(Debug)]
pub enum Reload {
    /// The contents taken last time, which were usable.
    Unchanged,
    /// New contents, read once: read again shortly to take them.
    Settling,
    /// New contents, read twice alike: the tokens to accept from now on.
    Changed(Tokens),
    /// The file cannot be used (it is unreadable, or its contents are
    /// invalid or list no token): keep the tokens in force.
    Unusable(String),
}

impl TokensFile {
    /// Reads `path`, which must list at least one token.
    pub fn open(path: &Path) -> Result<(TokensFile, Tokens), TokensError> {
        let seen = read_file(path)?;
        let tokens = parse_file(path, &seen)?;
        let file = TokensFile {
            path: path.to_path_buf(),
            seen,
            seen_problem: None,
            pending: None,
        };
        Ok((file, tokens))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file again.
    pub fn reload(&mut self) -> Reload {
        let bytes = match read_file(&self.path) {
            Ok(bytes) => bytes,
            Err(e) => return Reload::Unusable(e.to_string()),
        };
        if bytes == self.seen {
            self.pending = None;
            return match &self.seen_problem {
                None => Reload::Unchanged,
                Some(problem) => Reload::Unusable(problem.clone()),
            };
        }
        if self.pending.as_ref() != Some(&bytes) {
            self.pending = Some(bytes);
            return Reload::Settling;
        }
        self.pending = None;
        let parsed = parse_file(&self.path, &bytes);
        self.seen = bytes;
        match parsed {
            Ok(tokens) => {
                self.seen_problem = None;
                Reload::Changed(tokens)
            }
            Err(e) => {
                let problem = e.to_string();
                self.seen_problem = Some(problem.clone());
                Reload::Unusable(problem)
            }
        }
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TokensError> {
    std::fs::read(path).map_err(|source| TokensError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// The tokens in `bytes`, read from `path`: at least one.
fn parse_file(path: &Path, bytes: &[u8]) -> Result<Tokens, TokensError> {
    let name = path.display().to_string();
    let text = std::str::from_utf8(bytes)
        .map_err(|e| LocatedError::at_start(name.as_str(), format!("not UTF-8 text: {e}")))?;
    let tokens = Tokens::parse(&name, text)?;
    if tokens.is_empty() {
        return Err(TokensError::Empty { path: name });
    }
    Ok(tokens)
}

/// `text` with every bearer token in it (`smt_` and hex digits) cut to its
/// prefix.
fn redact_tokens(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(TOKEN_PREFIX) {
        let after = &rest[at + TOKEN_PREFIX.len()..];
        let secret = after.len()
            - after
                .trim_start_matches(|c: char| c.is_ascii_hexdigit())
                .len();
        out.push_str(&rest[..at + TOKEN_PREFIX.len()]);
        if secret > 0 {
            out.push_str("(redacted)");
        }
        rest = &after[secret..];
    }
    out.push_str(rest);
    out
}

/// How every token starts.
const TOKEN_PREFIX: &str = "smt_";

/// The hash a tokens file stores for `token`.
pub fn hash_token(token: &str) -> String {
    format!("{:x}", Sha256::digest(token.as_bytes()))
}

/// The rule for a principal's name, said to whoever gave a bad one.
pub const PRINCIPAL_NAME_RULE: &str = "use 1 to 64 letters, digits and - _ . @";

/// A principal's name as safemode keeps it: trimmed and lower-cased, so
/// that "Cmd1" and "cmd1" are one person everywhere (four-eyes included).
/// Names are 1 to 64 ASCII letters, digits and `- _ . @`.
pub fn principal_name(raw: &str) -> Result<String, &'static str> {
    let name = raw.trim();
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
    if ok {
        Ok(name.to_ascii_lowercase())
    } else {
        Err(PRINCIPAL_NAME_RULE)
    }
}

/// A token made by [`create_token`]: shown once, stored only hashed.
#[derive(Clone, Debug)]
pub struct NewToken {
    /// The principal, as it is kept (lower-cased).
    pub principal: String,
    /// The bearer token to hand to the principal.
    pub token: String,
    /// The line to add to the tokens file.
    pub line: String,
}

/// Makes a new random token for `principal` with `roles`.
pub fn create_token(principal: &str, roles: &[Role]) -> Result<NewToken, TokensError> {
    let principal = principal_name(principal)
        .map_err(|rule| TokensError::Principal(format!("--principal: {rule}")))?;
    let mut roles = roles.to_vec();
    roles.sort();
    roles.dedup();
    let role_names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    let bytes: [u8; 32] = rand::random();
    let token = format!(
        "{TOKEN_PREFIX}{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let line = format!(
        "- {{principal: {principal}, roles: [{}], sha256: {}}}",
        role_names.join(", "),
        hash_token(&token)
    );
    // The line must be one the server accepts.
    Tokens::parse("token create", &line)?;
    Ok(NewToken {
        principal,
        token,
        line,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(roles: &[Role]) -> Principal {
        Principal {
            name: "p".into(),
            roles: roles.to_vec(),
        }
    }

    #[test]
    fn a_created_token_authenticates_as_its_principal_and_only_as_that() {
        let new = create_token("alice", &[Role::Commander, Role::Viewer]).unwrap();
        let tokens = Tokens::parse("tokens.yaml", &new.line).unwrap();
        let alice = tokens.authenticate(&new.token).unwrap();
        assert_eq!(alice.name, "alice");
        assert_eq!(alice.roles, [Role::Viewer, Role::Commander]);
        assert!(tokens.authenticate("smt_wrong").is_none());
        assert!(
            !new.line.contains(&new.token),
            "the file never holds the token"
        );
    }

    #[test]
    fn bad_tokens_files_are_refused_where_they_go_wrong() {
        let check = |text: &str, expected: &str| {
            let error = Tokens::parse("t.yaml", text).unwrap_err().to_string();
            assert!(error.starts_with(expected), "{text:?}: {error}");
        };
        let hash = "a".repeat(64);
        check(
            &format!("- {{principal: bob, roles: [wizard], sha256: {hash}}}"),
            "t.yaml:1:28: unknown role 'wizard'",
        );
        check(
            &format!("- {{principal: bob, roles: [viewer], sha256: {hash}, extra: 1}}"),
            "t.yaml:1:",
        );
        check(
            "- {principal: bob, roles: [viewer], sha256: abc}",
            "t.yaml:1:45: sha256 must be 64 hex digits",
        );
        check(
            &format!("- {{principal: '', roles: [viewer], sha256: {hash}}}"),
            "t.yaml:1:15: bad principal ''",
        );
        check(
            &format!(
                "- {{principal: a, roles: [viewer], sha256: {hash}}}\n- {{principal: b, roles: [viewer], sha256: {hash}}}"
            ),
            "t.yaml:2:43: this token is listed twice",
        );
    }

    #[test]
    fn the_permission_table() {
        use Operation::*;
        let live = Namespace::live();
        let drill = Namespace::parse("drill-7").unwrap();
        let cases: &[(&[Role], Operation, Option<&Namespace>, bool)] = &[
            (&[Role::Subscriber], Subscribe, Some(&live), true),
            (&[Role::Subscriber], Read, Some(&live), false),
            (&[Role::Subscriber], Change, Some(&live), false),
            (&[Role::Viewer], Read, Some(&live), true),
            (&[Role::Viewer], ReadAudit, None, true),
            (&[Role::Viewer], Change, Some(&live), false),
            (&[Role::Commander], Change, Some(&live), true),
            (&[Role::Commander], Approve, Some(&live), false),
            (&[Role::Approver], Approve, Some(&live), true),
            (&[Role::Approver], Change, Some(&live), false),
            (&[Role::Drill], Change, Some(&drill), true),
            (&[Role::Drill], Approve, Some(&drill), true),
            (&[Role::Drill], Change, Some(&live), false),
            (&[Role::Drill], Subscribe, Some(&live), false),
            (&[Role::Drill], Read, None, true),
            (&[Role::Drill], ReadAudit, None, false),
            (&[Role::Admin], Approve, Some(&live), true),
            (&[Role::Viewer, Role::Commander], Change, Some(&live), true),
            // Proposals: a detector raises them and does nothing else; a
            // commander raises and decides them (Change).
            (&[Role::Detector], Propose, Some(&live), true),
            (&[Role::Detector], Change, Some(&live), false),
            (&[Role::Detector], Read, Some(&live), false),
            (&[Role::Detector], Subscribe, Some(&live), false),
            (&[Role::Commander], Propose, Some(&live), true),
            (&[Role::Viewer], Propose, Some(&live), false),
            (&[Role::Approver], Propose, Some(&live), false),
            (&[Role::Drill], Propose, Some(&drill), true),
            (&[Role::Drill], Propose, Some(&live), false),
        ];
        for (roles, operation, namespace, allowed) in cases {
            let got = principal(roles).may(*operation, *namespace).is_ok();
            assert_eq!(got, *allowed, "{roles:?} {operation:?} {namespace:?}");
        }
        let denied = principal(&[Role::Viewer])
            .may(Change, Some(&live))
            .unwrap_err();
        assert_eq!(
            denied.to_string(),
            "p (roles: viewer) may not change modes or incidents in namespace live; that needs the commander role"
        );
    }

    #[test]
    fn a_tokens_file_is_taken_again_once_a_change_settles_and_only_if_usable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        let alice = create_token("alice", &[Role::Commander]).unwrap();
        let bob = create_token("bob", &[Role::Viewer]).unwrap();
        // Reads until the file's current contents are taken.
        let settle = |file: &mut TokensFile| {
            assert!(matches!(file.reload(), Reload::Settling));
            file.reload()
        };

        std::fs::write(&path, "# nobody yet\n").unwrap();
        let empty = TokensFile::open(&path).unwrap_err();
        assert!(matches!(empty, TokensError::Empty { .. }), "{empty}");

        std::fs::write(&path, &alice.line).unwrap();
        let (mut file, tokens) = TokensFile::open(&path).unwrap();
        assert!(tokens.authenticate(&alice.token).is_some());
        assert!(matches!(file.reload(), Reload::Unchanged));

        // Half a file, then the whole: only the whole is taken.
        let whole = format!("{}\n{}\n", alice.line, bob.line);
        std::fs::write(&path, &whole[..whole.len() / 2]).unwrap();
        assert!(matches!(file.reload(), Reload::Settling));
        std::fs::write(&path, &whole).unwrap();
        let Reload::Changed(both) = settle(&mut file) else {
            panic!("the whole file is taken once two reads agree");
        };
        assert!(both.authenticate(&bob.token).is_some());
        assert_eq!(
            both.describe_change(&tokens),
            "2 tokens, 0 revoked; principals added: bob"
        );

        std::fs::write(&path, &bob.line).unwrap();
        let Reload::Changed(only_bob) = settle(&mut file) else {
            panic!("changed");
        };
        assert!(only_bob.authenticate(&alice.token).is_none());
        assert_eq!(
            only_bob.describe_change(&both),
            "1 tokens, 1 revoked; principals removed: alice"
        );

        // Broken, empty or gone: unusable, with no tokens to replace the
        // ones in force, for as long as the file stays so.
        std::fs::write(&path, "- {principal: [unclosed").unwrap();
        let Reload::Unusable(broken) = settle(&mut file) else {
            panic!("a broken file is unusable");
        };
        assert!(broken.contains("tokens.yaml:1:"), "{broken}");
        assert!(matches!(file.reload(), Reload::Unusable(again) if again == broken));
        std::fs::write(&path, "").unwrap();
        assert!(matches!(settle(&mut file), Reload::Unusable(e) if e.contains("lists no token")));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(file.reload(), Reload::Unusable(e) if e.contains("cannot read")));
    }

    #[test]
    fn a_token_pasted_into_the_tokens_file_is_not_repeated_in_the_error() {
        let new = create_token("alice", &[Role::Commander]).unwrap();
        let error = Tokens::parse("t.yaml", &format!("{}\n", new.token))
            .unwrap_err()
            .to_string();
        assert!(!error.contains(&new.token[4..]), "{error}");
    }
}
