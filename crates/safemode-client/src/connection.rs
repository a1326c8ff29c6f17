//! Reaching the controllers: checked addresses, TLS, the bearer token, and
//! the rule that a token never crosses the network in plain text.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Uri};

use super::ClientError;
use safemode_support::errors::error_chain;
use tracing::debug;

/// How [`endpoints`] prepares the connections to the controllers.
#[derive(Clone, Copy, Debug)]
pub struct EndpointOptions<'a> {
    /// Requests will carry a bearer token, which must not cross the network
    /// in plain text.
    pub sends_token: bool,
    /// A PEM file of CA certificates to trust for `https://`, besides the
    /// platform's.
    pub ca_cert: Option<&'a Path>,
    /// A token may go over plain `http://` to a host that is not loopback (a
    /// service mesh encrypts the hop).
    pub allow_plaintext_token: bool,
    /// Limit on connecting, and on the TLS handshake.
    pub connect_timeout: Duration,
}

/// Checks and prepares the controllers' addresses: `http://` or `https://`
/// only; TLS for `https://`; and no token in plain text to a host that is
/// not loopback unless `options` allow it. Connects to nothing, so a
/// refusal here comes before any byte is sent.
pub fn endpoints(
    servers: &[String],
    options: &EndpointOptions<'_>,
) -> Result<Vec<(String, Endpoint)>, ClientError> {
    if servers.is_empty() {
        return Err(ClientError::BadServer {
            server: String::new(),
            reason: "no controller address given".into(),
        });
    }
    let targets = servers
        .iter()
        .map(|server| Target::parse(server, options))
        .collect::<Result<Vec<_>, _>>()?;
    // The CA file is read once, and only when some controller needs TLS.
    let tls = if targets.iter().any(|t| t.tls) {
        Some(tls_config(options)?)
    } else {
        None
    };
    targets
        .into_iter()
        .map(|target| {
            let mut endpoint = Endpoint::from(target.uri)
                .connect_timeout(options.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10));
            if let (true, Some(tls)) = (target.tls, &tls) {
                endpoint = with_tls(endpoint, tls, &target.host, options.ca_cert.is_some())
                    .map_err(|e| ClientError::TlsSetup {
                        server: target.server.clone(),
                        reason: error_chain(&e),
                    })?;
            }
            Ok((target.server, endpoint))
        })
        .collect()
}

/// One checked controller address.
struct Target {
    server: String,
    uri: Uri,
    /// `https://`.
    tls: bool,
    /// The host, without the brackets of an IPv6 address.
    host: String,
}

impl Target {
    fn parse(server: &str, options: &EndpointOptions<'_>) -> Result<Target, ClientError> {
        let bad = |reason: String| ClientError::BadServer {
            server: server.to_string(),
            reason,
        };
        let uri: Uri = server.parse().map_err(|e| bad(error_chain(&e)))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            Some(other) => {
                return Err(bad(format!(
                    "the scheme {other}: is not supported, only http:// and https://"
                )));
            }
            None => {
                return Err(bad("it has no scheme (http:// or https://)".into()));
            }
        };
        let host = match uri.host() {
            Some(host) if !host.is_empty() => host,
            _ => return Err(bad("it names no host".into())),
        };
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .to_string();
        if !tls && options.sends_token && !options.allow_plaintext_token && !is_loopback(&host) {
            return Err(ClientError::PlaintextToken {
                server: server.to_string(),
            });
        }
        Ok(Target {
            server: server.to_string(),
            uri,
            tls,
            host,
        })
    }
}

/// Whether `host` (without IPv6 brackets) is this machine: `localhost`,
/// 127.0.0.0/8, `::1` (also written as an IPv4-mapped address).
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// TLS settings shared by every `https://` controller: the handshake limit
/// and the extra CA certificates, checked here so that a wrong file is
/// named instead of every certificate seeming untrusted.
fn tls_config(options: &EndpointOptions<'_>) -> Result<ClientTlsConfig, ClientError> {
    let config = ClientTlsConfig::new().timeout(options.connect_timeout);
    let Some(path) = options.ca_cert else {
        return Ok(config);
    };
    let bad = |reason: String| ClientError::CaCert {
        path: path.to_path_buf(),
        reason,
    };
    let pem = safemode_support::pem::certificates(path).map_err(|e| bad(format!("it {e}")))?;
    Ok(config.ca_certificate(Certificate::from_pem(pem)))
}

/// `endpoint` over TLS to `host`, trusting the platform's CA certificates
/// and those of `tls`. A machine without CA certificates (a slim container)
/// still works when an extra CA was given.
fn with_tls(
    endpoint: Endpoint,
    tls: &ClientTlsConfig,
    host: &str,
    has_extra_ca: bool,
) -> Result<Endpoint, tonic::transport::Error> {
    // tonic would take the host from the URI, brackets of IPv6 included,
    // which is not a valid server name.
    let tls = tls.clone().domain_name(host);
    match endpoint.clone().tls_config(tls.clone().with_native_roots()) {
        Ok(endpoint) => Ok(endpoint),
        Err(e) if has_extra_ca => {
            debug!(error = %error_chain(&e), "no platform CA certificates; trusting ca_cert only");
            endpoint.tls_config(tls)
        }
        Err(e) => Err(e),
    }
}

/// What a failed connection to `server` means for a person: a certificate
/// this client does not trust, a TLS handshake that failed otherwise, or a
/// controller that cannot be reached.
pub fn connect_failed(server: &str, error: &tonic::transport::Error) -> ClientError {
    let server = server.to_string();
    match tls_error(error) {
        // rustls says it best ("invalid peer certificate: UnknownIssuer");
        // the transport's wrapping adds nothing.
        Some(tls @ rustls::Error::InvalidCertificate(_)) => ClientError::Untrusted {
            server,
            reason: tls.to_string(),
        },
        Some(_) => ClientError::Tls {
            server,
            reason: error_chain(error),
        },
        None => ClientError::Unreachable {
            server,
            reason: error_chain(error),
        },
    }
}

/// The rustls error in `error`'s chain, if TLS failed. tokio-rustls wraps it
/// in an `io::Error`, whose `source()` skips it, so look inside those too.
fn tls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(inner);
        }
        next = e.source();
    }
    None
}

/// Adds `authorization: Bearer <token>` to every request, when there is a
/// token; and, for a server without tokens, the name the caller goes by.
#[derive(Clone)]
pub struct Bearer {
    header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    principal: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl Bearer {
    /// The interceptor for `token` (`None`: send no header).
    pub fn new(token: Option<&str>) -> Result<Self, ClientError> {
        let header = token
            .map(|t| {
                let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                    format!("Bearer {}", t.trim()).parse().map_err(|_| {
                        ClientError::Refused(
                            "the token has characters a header cannot carry".into(),
                        )
                    })?;
                // Kept out of debug output, and out of HTTP/2 header
                // compression tables (HPACK never indexes it).
                value.set_sensitive(true);
                Ok(value)
            })
            .transpose()?;
        Ok(Bearer {
            header,
            principal: None,
        })
    }

    /// Also names the caller `principal`: a server without a tokens file
    /// acts under that name (a server with one ignores it).
    pub fn as_principal(mut self, principal: Option<&str>) -> Result<Self, ClientError> {
        self.principal = principal
            .map(|p| {
                p.trim().parse().map_err(|_| {
                    ClientError::Refused(
                        "the principal has characters a header cannot carry".into(),
                    )
                })
            })
            .transpose()?;
        Ok(self)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        if let Some(principal) = &self.principal {
            request
                .metadata_mut()
                .insert(safemode_wire::PRINCIPAL_HEADER, principal.clone());
        }
        Ok(request)
    }
}

/// Connects to the first of `servers` that answers (each checked by
/// [`endpoints`] first); the error names them all if none does, and says
/// more than "unreachable" when a certificate was not trusted.
pub async fn connect_any(
    servers: &[String],
    options: &EndpointOptions<'_>,
    request_timeout: Duration,
) -> Result<tonic::transport::Channel, ClientError> {
    Ok(connect_first(servers, options, request_timeout).await?.1)
}

/// As [`connect_any`], with the address of the server it connected to, so
/// that a later failed call can be explained ([`explain`]) for it.
pub async fn connect_first(
    servers: &[String],
    options: &EndpointOptions<'_>,
    request_timeout: Duration,
) -> Result<(String, tonic::transport::Channel), ClientError> {
    let mut errors = Vec::new();
    for (server, endpoint) in endpoints(servers, options)? {
        match endpoint.timeout(request_timeout).connect().await {
            Ok(channel) => return Ok((server, channel)),
            Err(e) => errors.push(match probe(&server).await {
                Some(error) => error,
                None => connect_failed(&server, &e),
            }),
        }
    }
    Err(super::first_failure(errors))
}

/// What a failed call to `server` means when it is not the controller's own
/// refusal of the request: the token refused (UNAUTHENTICATED or
/// PERMISSION_DENIED), something that is not a safemode controller at the
/// address, or plain text sent to a TLS port. `None`: the status says it
/// best (the controller's message, or a transport failure).
pub async fn explain(server: &str, status: &tonic::Status) -> Option<ClientError> {
    use tonic::Code;
    let server = server.to_string();
    // A status with a source was made on this side from a transport
    // failure: what is at the address is found out by asking it.
    if std::error::Error::source(status).is_some() {
        return probe(&server).await;
    }
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => Some(ClientError::TokenRefused {
            server,
            reason: status.message().to_string(),
        }),
        // tonic makes this status when an HTTP response carries no gRPC
        // status: a web server, a proxy's error page.
        _ if status.message().starts_with("grpc-status header missing") => {
            Some(ClientError::NotSafemode {
                server,
                reason: format!("it answered in HTTP, not gRPC: {}", status.message()),
            })
        }
        // A gRPC server without the safemode services. A safemode
        // controller never answers UNIMPLEMENTED itself.
        Code::Unimplemented => Some(ClientError::NotSafemode {
            server,
            reason: if status.message().is_empty() {
                "it is a gRPC server without the safemode services".into()
            } else {
                format!(
                    "it is a gRPC server without the safemode services: {}",
                    status.message()
                )
            },
        }),
        _ => None,
    }
}

/// How long [`probe`] waits for a connection and for the first bytes.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What listens at the `http://` address `server`, when HTTP/2 with it
/// failed: a TLS server (it answers plain text with a TLS alert), or an
/// HTTP/1 server (it answers with a status line). `None` when it is
/// neither, cannot be reached, or `server` is not `http://`.
pub(crate) async fn probe(server: &str) -> Option<ClientError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let uri: Uri = server.parse().ok()?;
    if uri.scheme_str() != Some("http") {
        return None;
    }
    let host = uri.host()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = uri.port_u16().unwrap_or(80);
    let first = tokio::time::timeout(PROBE_TIMEOUT, async {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        // The HTTP/2 preface: what this client sends first anyway.
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .ok()?;
        let mut first = [0u8; 5];
        stream.read_exact(&mut first).await.ok()?;
        Some(first)
    })
    .await
    .ok()??;
    let server = server.to_string();
    match first {
        // A TLS record (an alert, or a handshake) of TLS 1.x.
        [0x15 | 0x16, 0x03, ..] => Some(ClientError::PlaintextToTls { server }),
        _ if first.starts_with(b"HTTP/") => Some(ClientError::NotSafemode {
            server,
            reason: "it answered in HTTP/1, not gRPC".into(),
        }),
        // Text without a status line: an old web server's error page
        // (HTTP/0.9 style). HTTP/2 answers with binary frames.
        _ if first
            .iter()
            .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace()) =>
        {
            Some(ClientError::NotSafemode {
                server,
                reason: format!(
                    "it answered with text, not gRPC (\"{}...\")",
                    String::from_utf8_lossy(&first)
                ),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `endpoints` says about `server`: `Ok` or the error message.
    fn check(server: &str, sends_token: bool, insecure: bool, expected: Result<(), &str>) {
        let options = EndpointOptions {
            sends_token,
            ca_cert: None,
            allow_plaintext_token: insecure,
            connect_timeout: Duration::from_secs(1),
        };
        let actual = endpoints(&[server.to_string()], &options)
            .map(|_| ())
            .map_err(|e| e.to_string());
        match (&actual, expected) {
            (Ok(()), Ok(())) => {}
            (Err(message), Err(part)) if message.contains(part) => {}
            _ => panic!(
                "{server} (token: {sends_token}, insecure: {insecure}): expected {expected:?}, got {actual:?}"
            ),
        }
    }

    #[tokio::test]
    async fn a_status_from_the_peer_is_explained_when_it_says_more_than_its_message() {
        use tonic::{Code, Status};
        let server = "http://127.0.0.1:7700";
        let cases: &[(Status, Option<&str>)] = &[
            (
                Status::unauthenticated("unknown token"),
                Some("refused the token: unknown token"),
            ),
            (
                Status::permission_denied("may not subscribe"),
                Some("refused the token: may not subscribe"),
            ),
            (
                Status::unimplemented(""),
                Some("is not a safemode controller"),
            ),
            (
                Status::new(
                    Code::Unimplemented,
                    "grpc-status header missing, mapped from HTTP status code 404",
                ),
                Some("it answered in HTTP, not gRPC"),
            ),
            // The controller's own refusals say what to do themselves.
            (Status::failed_precondition("no such incident"), None),
            (Status::unavailable("store unavailable"), None),
        ];
        for (status, expected) in cases {
            let explained = explain(server, status).await.map(|e| e.to_string());
            match (&explained, expected) {
                (None, None) => {}
                (Some(said), Some(part)) if said.contains(part) && said.contains(server) => {}
                _ => panic!("{status:?}: expected {expected:?}, got {explained:?}"),
            }
        }
    }

    #[test]
    fn a_token_goes_in_plain_text_only_to_loopback_unless_allowed() {
        const REFUSED: &str = "refusing to send the token in plain text";
        let cases: &[(&str, bool, bool, Result<(), &str>)] = &[
            ("http://127.0.0.1:7700", true, false, Ok(())),
            ("http://127.1.2.3:7700", true, false, Ok(())),
            ("http://localhost:7700", true, false, Ok(())),
            ("http://LocalHost:7700", true, false, Ok(())),
            ("http://[::1]:7700", true, false, Ok(())),
            ("http://[::ffff:127.0.0.1]:7700", true, false, Ok(())),
            ("http://10.255.255.1:7700", true, false, Err(REFUSED)),
            ("http://[2001:db8::1]:7700", true, false, Err(REFUSED)),
            ("http://controller.example:7700", true, false, Err(REFUSED)),
            ("http://localhost.example:7700", true, false, Err(REFUSED)),
            ("http://0.0.0.0:7700", true, false, Err(REFUSED)),
            // Nothing secret to protect without a token.
            ("http://10.255.255.1:7700", false, false, Ok(())),
            // A service mesh encrypts the hop.
            ("http://10.255.255.1:7700", true, true, Ok(())),
        ];
        for (server, token, insecure, expected) in cases {
            check(server, *token, *insecure, *expected);
        }
    }

    #[test]
    fn only_http_and_https_are_spoken() {
        let cases: &[(&str, &str)] = &[
            (
                "ftp://127.0.0.1:7700",
                "the scheme ftp: is not supported, only http:// and https://",
            ),
            (
                "unix:/tmp/safemode.sock",
                "bad server address 'unix:/tmp/safemode.sock'",
            ),
            ("127.0.0.1:7700", "it has no scheme"),
            ("http://", "bad server address"),
            ("", "bad server address"),
        ];
        for (server, expected) in cases {
            check(server, false, false, Err(expected));
            check(server, true, true, Err(expected));
        }
    }

    #[test]
    fn the_extra_ca_file_is_checked_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let missing = dir.path().join("missing.pem");
        for (path, expected) in [
            (&not_pem, "holds no certificate"),
            (&missing, "cannot use the CA certificate file"),
        ] {
            let options = EndpointOptions {
                sends_token: true,
                ca_cert: Some(path),
                allow_plaintext_token: false,
                connect_timeout: Duration::from_secs(1),
            };
            let error = endpoints(&["https://127.0.0.1:7700".into()], &options)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                error.contains(expected) && error.contains(&path.display().to_string()),
                "{}: {error}",
                path.display()
            );
        }
    }
}
