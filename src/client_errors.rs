//! The client crate's errors, said in the command line's terms.
//!
//! `safemode-client` speaks to a service author: what to do is a field of
//! `SubscriberConfig`. A person running `safemode` (a command, or a drill
//! whose report they read) sets flags instead, so before an error is printed
//! or reported every `ClientError` in it is said again with the flag (and
//! the environment variable) that does the same.

use safemode_client::ClientError;

use crate::drill::DrillError;

/// `error` rendered as one line, causes joined by ": " as `{:#}` does, with
/// each client error said in flags.
pub fn render(error: &anyhow::Error) -> String {
    error
        .chain()
        .map(|cause| match client_error(cause) {
            Some(client) => in_flags(client),
            None => cause.to_string(),
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// The client error `cause` is, or wraps transparently (a drill's).
fn client_error<'a>(cause: &'a (dyn std::error::Error + 'static)) -> Option<&'a ClientError> {
    match cause.downcast_ref::<DrillError>() {
        Some(DrillError::Client(client)) => Some(client),
        _ => cause.downcast_ref::<ClientError>(),
    }
}

/// What `error` says, with the command line's flags where the client names
/// a `SubscriberConfig` field.
pub(crate) fn in_flags(error: &ClientError) -> String {
    match error {
        ClientError::PlaintextToken { server } => format!(
            "refusing to send the token in plain text to {server}, which is not a loopback address: use https:// (with --ca-cert FILE for a private CA), or --insecure (SAFEMODE_INSECURE) if a service mesh already encrypts this hop"
        ),
        ClientError::CaCert { path, reason } => format!(
            "cannot use the CA certificate file {}: {reason}; give a PEM file of the CA certificates that signed the controller's certificate (--ca-cert / SAFEMODE_CA_CERT)",
            path.display()
        ),
        ClientError::TlsSetup { server, reason } => format!(
            "cannot set up TLS for {server}: {reason}; install the platform's CA certificates (e.g. the ca-certificates package) or give --ca-cert FILE"
        ),
        ClientError::Untrusted { server, reason } => format!(
            "the controller at {server} presented a certificate this client does not trust ({reason}); give the CA that signed it with --ca-cert FILE (SAFEMODE_CA_CERT), and check that --server names a host the certificate is for"
        ),
        ClientError::Unreachable { server, reason } => format!(
            "cannot reach the safemode controller at {server}: {reason}; is `safemode serve` running there? (--server / SAFEMODE_SERVER point elsewhere)"
        ),
        ClientError::NotTrusted {
            server,
            what,
            reason,
        } => format!(
            "the controller at {server} sent {what} this client does not trust: {reason}; nothing of it was used. If {server} is your controller, give its public key with --trusted-keys FILE (SAFEMODE_TRUSTED_KEYS): signing.pub in its data directory, or `safemode key public`"
        ),
        ClientError::Tls { server, reason } => format!(
            "TLS with the controller at {server} failed: {reason}; does it serve TLS (safemode serve --tls-cert/--tls-key)? a controller without TLS takes http://"
        ),
        ClientError::NotSafemode { server, reason } => format!(
            "{server} is not a safemode controller: check --server (SAFEMODE_SERVER) ({reason})"
        ),
        ClientError::PlaintextToTls { server } => format!(
            "{server} serves TLS, and this command spoke plain text to it: use https:// in --server (with --ca-cert FILE for a private CA)"
        ),
        ClientError::TokenRefused { server, reason } => format!(
            "the controller at {server} refused the token: {reason}; give a token it accepts with --token-file FILE (SAFEMODE_TOKEN_FILE) or --token (SAFEMODE_TOKEN)"
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_error_in_a_chain_is_said_in_flags_and_its_context_kept() {
        let error = anyhow::Error::new(ClientError::PlaintextToken {
            server: "http://10.0.0.7:7700".into(),
        })
        .context("cannot watch");
        let line = render(&error);
        assert!(
            line.starts_with("cannot watch: refusing to send the token"),
            "{line}"
        );
        assert!(line.contains("--insecure (SAFEMODE_INSECURE)"), "{line}");
        assert!(!line.contains("SubscriberConfig"), "{line}");
    }

    #[test]
    fn other_errors_read_as_they_are() {
        let error = anyhow::anyhow!("no such incident").context("cannot resolve");
        assert_eq!(render(&error), format!("{error:#}"));
    }
}
