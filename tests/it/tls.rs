//! Tokens on the wire: `serve --tls-cert/--tls-key` serves gRPC over TLS;
//! the command line and subscribers reach `https://` controllers with the
//! platform's CA certificates or `--ca-cert`, and refuse a certificate
//! nobody they trust vouched for; a token never goes in plain text to a host
//! that is not loopback unless `--insecure` says a service mesh encrypts the
//! hop. Certificates are made fresh by each test (rcgen).

use std::path::{Path, PathBuf};
use std::process::Output;

use safemode_client::{Subscriber, SubscriberConfig};
use safemode_grpc::server::{EtcdTls, ServeConfig, StoreConfig};
use safemode_policy::{Action, Channel, Context, EffectKind, Namespace};
use safemode_wire::proto;

use crate::etcd::{ClientTls, EtcdCluster};
use crate::support::{Principals, ServeProcess, TestServer, safemode, wait_until};

// === certificates ===

/// A private CA and a server certificate it signed for `localhost` and
/// `127.0.0.1`, a client certificate it signed, plus a second CA that signed
/// nothing here, as PEM files: `ca.pem`, `ca.key`, `server.pem`,
/// `server.key`, `client.pem`, `client.key`, `other-ca.pem`, and the server
/// key's SubjectPublicKeyInfo in DER, `server.spki.der`.
pub(crate) struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (ca_cert, ca_key, ca) = new_ca("safemode test CA");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        params
            .extended_key_usages
            .push(rcgen::ExtendedKeyUsagePurpose::ServerAuth);
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server_cert = params.signed_by(&server_key, &ca).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "safemode replica");
        params
            .extended_key_usages
            .push(rcgen::ExtendedKeyUsagePurpose::ClientAuth);
        let client_key = rcgen::KeyPair::generate().unwrap();
        let client_cert = params.signed_by(&client_key, &ca).unwrap();
        let (other_ca, _, _) = new_ca("a CA nobody here asked for");
        // The server key's SubjectPublicKeyInfo (DER), which a browser can
        // be told to trust (the console's browser test).
        std::fs::write(
            dir.path().join("server.spki.der"),
            rcgen::PublicKeyData::subject_public_key_info(&server_key),
        )
        .unwrap();
        let files = [
            ("ca.pem", ca_cert.pem()),
            ("ca.key", ca_key),
            ("server.pem", server_cert.pem()),
            ("server.key", server_key.serialize_pem()),
            ("client.pem", client_cert.pem()),
            ("client.key", client_key.serialize_pem()),
            ("other-ca.pem", other_ca.pem()),
        ];
        for (name, pem) in files {
            std::fs::write(dir.path().join(name), pem).unwrap();
        }
        Pki { dir }
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

/// A self-signed CA: its certificate, its key in PEM, and the issuer that
/// signs with it.
fn new_ca(
    name: &str,
) -> (
    rcgen::Certificate,
    String,
    rcgen::Issuer<'static, rcgen::KeyPair>,
) {
    let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let key_pem = key.serialize_pem();
    (cert, key_pem, rcgen::Issuer::new(params, key))
}

// === servers ===

/// A controller that requires tokens and serves TLS with the certificate of
/// `pki`.
struct TlsServer {
    server: TestServer,
    pki: Pki,
    principals: Principals,
    _data: tempfile::TempDir,
}

impl TlsServer {
    async fn start() -> Self {
        let pki = Pki::new();
        let principals = Principals::new();
        let data = tempfile::tempdir().expect("temp dir");
        let server = TestServer::start_with(ServeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            store: StoreConfig::Embedded {
                data_dir: data.path().to_path_buf(),
            },
            tokens: Some(principals.file.path().to_path_buf()),
            tls_cert: Some(pki.path("server.pem")),
            tls_key: Some(pki.path("server.key")),
            ..ServeConfig::default()
        })
        .await;
        TlsServer {
            server,
            pki,
            principals,
            _data: data,
        }
    }

    /// `https://127.0.0.1:PORT`.
    fn url(&self) -> String {
        format!("https://{}", self.server.addr())
    }

    fn token(&self, name: &str) -> &str {
        self.principals.token(name)
    }

    fn trusted_keys(&self) -> safemode_signing::TrustedKeys {
        self.server.trusted_keys()
    }
}

// === the binary ===

/// Runs the `safemode` binary with `args`, with `platform_ca` standing in
/// for the platform's CA certificates (`SSL_CERT_FILE`), so that no test
/// depends on the certificates of the machine it runs on, and with no other
/// safemode setting from the environment but `env` (and the public key of
/// the controller named by `--server`, as its operator would set it).
async fn run(platform_ca: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let keys = crate::support::key_file_for(args);
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let platform_ca = platform_ca.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_safemode"));
        for name in [
            "SAFEMODE_SERVER",
            "SAFEMODE_TOKEN",
            "SAFEMODE_TOKEN_FILE",
            "SAFEMODE_CA_CERT",
            "SAFEMODE_INSECURE",
            "SAFEMODE_TLS_CERT",
            "SAFEMODE_TLS_KEY",
            "SAFEMODE_TOKENS",
            "SAFEMODE_STORE",
            "SAFEMODE_ETCD_ENDPOINTS",
            "SAFEMODE_ETCD_CA_CERT",
            "SAFEMODE_ETCD_CERT",
            "SAFEMODE_ETCD_KEY",
            "SSL_CERT_DIR",
            "RUST_LOG",
            "SAFEMODE_TRUSTED_KEYS",
            "SAFEMODE_SIGNING_KEY",
        ] {
            command.env_remove(name);
        }
        command.env("SAFEMODE_TRUSTED_KEYS", keys);
        // Replicas on etcd share a signing key (`serve --signing-key`).
        if args.iter().any(|a| a == "etcd") {
            command.env(
                "SAFEMODE_SIGNING_KEY",
                crate::support::test_signing_key_file(),
            );
        }
        command
            .env("SSL_CERT_FILE", &platform_ca)
            .envs(env)
            .args(&args)
            .output()
            .expect("the safemode binary runs")
    })
    .await
    .unwrap()
}

/// The standard output of a command that must succeed.
fn succeeded(args: &[&str], output: &Output) -> String {
    assert_eq!(
        output.status.code(),
        Some(0),
        "{args:?} should succeed; stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// Checks a command failed with exit 1, nothing on stdout, and one line on
/// stderr containing every part of `expected`; returns that line.
fn refused(args: &[&str], output: &Output, expected: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(
        output.status.code(),
        Some(1),
        "{args:?} should fail with exit 1; stderr: {stderr}"
    );
    assert!(
        output.stdout.is_empty(),
        "{args:?} printed to stdout: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "{args:?} should print one line, printed: {stderr}"
    );
    assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    for part in expected {
        assert!(
            stderr.contains(part),
            "{args:?}: expected {part:?} in {stderr:?}"
        );
    }
    stderr
}

/// The namespace and revision of `status --output json`.
fn status_revision(stdout: &str) -> i64 {
    let status: serde_json::Value = serde_json::from_str(stdout.trim()).expect("status is JSON");
    assert_eq!(status["namespace"], "live", "{status}");
    status["revision"].as_i64().expect("a revision")
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_and_subscribers_reach_a_tls_controller() {
    let tls = TlsServer::start().await;
    let url = tls.url();
    let ca = tls.pki.path("ca.pem");
    let other_ca = tls.pki.path("other-ca.pem");
    let ca_arg = tls.pki.arg("ca.pem");

    // The command line, trusting the private CA with --ca-cert.
    let args = [
        "--server",
        &url,
        "--ca-cert",
        &ca_arg,
        "--token",
        tls.token("viewer"),
        "--output",
        "json",
        "status",
    ];
    let before = status_revision(&succeeded(&args, &run(&other_ca, &[], &args).await));

    // The same CA given as SAFEMODE_CA_CERT, and by name rather than address.
    let localhost = format!("https://localhost:{}", tls.server.addr().port());
    let args = [
        "--server",
        &localhost,
        "--token",
        tls.token("viewer"),
        "--output",
        "json",
        "status",
    ];
    let output = run(&other_ca, &[("SAFEMODE_CA_CERT", &ca_arg)], &args).await;
    status_revision(&succeeded(&args, &output));

    // A CA among the platform's certificates needs no --ca-cert.
    let args = [
        "--server",
        &url,
        "--token",
        tls.token("viewer"),
        "--output",
        "json",
        "status",
    ];
    status_revision(&succeeded(&args, &run(&ca, &[], &args).await));

    // A subscriber over TLS gets its snapshot...
    let mut config = SubscriberConfig::new(
        [url.clone()],
        Namespace::live(),
        Channel::parse("chatbot").unwrap(),
        "tls-chatbot",
    );
    config.trusted_keys = Some(tls.trusted_keys());
    config.token = Some(tls.token("subscriber").to_string());
    config.ca_cert = Some(ca.clone());
    let subscriber = Subscriber::connect(config)
        .await
        .expect("the subscriber connects over TLS");
    let first = subscriber.current().expect("a snapshot");
    assert_eq!(first.revision, before);

    // ...and the next one, applied by a commander over TLS.
    let args = [
        "--server",
        &url,
        "--ca-cert",
        &ca_arg,
        "--token",
        tls.token("commander"),
        "--output",
        "json",
        "mode",
        "apply",
        "freeze-credential-changes",
        "--reason",
        "ATO wave, INC-1",
    ];
    let applied: serde_json::Value =
        serde_json::from_str(succeeded(&args, &run(&other_ca, &[], &args).await).trim()).unwrap();
    let revision = applied["revision"].as_i64().expect("a revision");
    wait_until("the subscriber applies the freeze", || {
        let current = subscriber.current().map(|s| s.revision);
        async move { current >= Some(revision) }
    })
    .await;
    let reset = Action::parse("account.password_reset").unwrap();
    let decision = subscriber.decide(&reset, &Context::default());
    assert_eq!(decision.effect().as_str(), "deny");

    // The TLS port speaks nothing but TLS.
    let plain = format!("http://{}", tls.server.addr());
    let args = ["--server", &plain, "--token", tls.token("viewer"), "status"];
    refused(&args, &run(&ca, &[], &args).await, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_nobody_trusted_vouched_for_is_refused() {
    let tls = TlsServer::start().await;
    let url = tls.url();
    let other_ca = tls.pki.path("other-ca.pem");
    let other_ca_arg = tls.pki.arg("other-ca.pem");
    let untrusted = [
        "the controller at https://127.0.0.1:",
        "presented a certificate this client does not trust",
        "--ca-cert",
    ];

    // Neither the platform's certificates nor --ca-cert vouch for it; the
    // command line and a subscriber say so the same way.
    let cases: &[&[&str]] = &[
        &["--server", &url, "--token", tls.token("viewer"), "status"],
        &[
            "--server",
            &url,
            "--ca-cert",
            &other_ca_arg,
            "--token",
            tls.token("viewer"),
            "status",
        ],
        &[
            "--server",
            &url,
            "--token",
            tls.token("subscriber"),
            "decide",
            "--channel",
            "chatbot",
            "--action",
            "order.view",
        ],
    ];
    for args in cases {
        refused(args, &run(&other_ca, &[], args).await, &untrusted);
    }

    let mut config = SubscriberConfig::new(
        [url.clone()],
        Namespace::live(),
        Channel::parse("chatbot").unwrap(),
        "tls-untrusting",
    );
    config.trusted_keys = Some(tls.trusted_keys());
    config.token = Some(tls.token("subscriber").to_string());
    config.ca_cert = Some(other_ca.clone());
    let error = Subscriber::connect(config)
        .await
        .err()
        .expect("an untrusted certificate is refused")
        .to_string();
    assert!(error.contains("does not trust"), "{error}");

    // A --ca-cert that is missing or holds no certificate is named.
    let missing = tls.pki.arg("missing.pem");
    let key = tls.pki.arg("server.key");
    for (file, expected) in [(&missing, "No such file"), (&key, "holds no certificate")] {
        let args = [
            "--server",
            &url,
            "--ca-cert",
            file,
            "--token",
            tls.token("viewer"),
            "status",
        ];
        refused(
            &args,
            &run(&other_ca, &[], &args).await,
            &[
                &format!("cannot use the CA certificate file {file}"),
                expected,
            ],
        );
    }

    // https:// to a controller without TLS fails as TLS, not as "down".
    let principals = Principals::new();
    let plain = TestServer::with_tokens(&principals).await;
    let https = format!("https://{}", plain.addr());
    let ca = tls.pki.arg("ca.pem");
    let args = [
        "--server",
        &https,
        "--ca-cert",
        &ca,
        "--token",
        principals.token("viewer"),
        "status",
    ];
    refused(
        &args,
        &run(&other_ca, &[], &args).await,
        &["TLS with the controller at https://", "does it serve TLS"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_never_goes_in_plain_text_off_this_machine() {
    let pki = Pki::new();
    let platform = pki.path("other-ca.pem");
    let refusal = [
        "refusing to send the token in plain text to http://10.255.255.1:7700",
        "use https://",
        "--insecure",
        "service mesh",
    ];
    let far = "http://10.255.255.1:7700";

    // Every way the command line connects refuses before connecting.
    let cases: &[&[&str]] = &[
        &["--server", far, "--token", "smt_x", "status"],
        &["--server", far, "--token", "smt_x", "mode", "list"],
        &["--server", far, "--token", "smt_x", "incident", "list"],
        &[
            "--server",
            far,
            "--token",
            "smt_x",
            "decide",
            "--channel",
            "chatbot",
            "--action",
            "order.view",
        ],
        &[
            "--server",
            far,
            "--token",
            "smt_x",
            "watch",
            "--channel",
            "ivr",
        ],
        // One plain-text replica among TLS ones is enough to refuse.
        &[
            "--server",
            "https://127.0.0.1:1,http://10.255.255.1:7700",
            "--token",
            "smt_x",
            "status",
        ],
    ];
    for args in cases {
        refused(args, &run(&platform, &[], args).await, &refusal);
    }
    let insecure = ["--insecure", "--server", far, "--token", "smt_x", "status"];
    let stderr = String::from_utf8_lossy(&run(&platform, &[], &insecure).await.stderr).to_string();
    assert!(
        !stderr.contains("refusing to send the token"),
        "--insecure still refused: {stderr}"
    );

    // With --insecure (or SAFEMODE_INSECURE) it tries, and says what
    // happened; a `.invalid` name never resolves, so that is "cannot reach".
    let nowhere = "http://safemode.invalid:7700";
    let args = ["--server", nowhere, "--token", "smt_x", "status"];
    refused(
        &args,
        &run(&platform, &[], &args).await,
        &["refusing to send the token in plain text to http://safemode.invalid:7700"],
    );
    let unreachable = ["cannot reach the safemode controller at http://safemode.invalid:7700"];
    let args = [
        "--insecure",
        "--server",
        nowhere,
        "--token",
        "smt_x",
        "status",
    ];
    let stderr = refused(&args, &run(&platform, &[], &args).await, &unreachable);
    assert!(!stderr.contains("refusing"), "{stderr}");
    let args = ["--server", nowhere, "--token", "smt_x", "status"];
    let output = run(&platform, &[("SAFEMODE_INSECURE", "1")], &args).await;
    refused(&args, &output, &unreachable);
    let args = [
        "--insecure",
        "--server",
        nowhere,
        "--token",
        "smt_x",
        "decide",
        "--channel",
        "chatbot",
        "--action",
        "order.view",
    ];
    refused(&args, &run(&platform, &[], &args).await, &unreachable);
    // Without a token there is nothing to protect.
    let args = ["--server", nowhere, "status"];
    refused(&args, &run(&platform, &[], &args).await, &unreachable);

    // Only http:// and https:// are spoken.
    for (server, expected) in [
        ("ftp://127.0.0.1:7700", "the scheme ftp: is not supported"),
        ("127.0.0.1:7700", "it has no scheme"),
    ] {
        let args = ["--server", server, "--token", "smt_x", "status"];
        refused(
            &args,
            &run(&platform, &[], &args).await,
            &[&format!("bad server address '{server}'"), expected],
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_still_goes_in_plain_text_to_loopback() {
    let pki = Pki::new();
    let platform = pki.path("other-ca.pem");
    let principals = Principals::new();
    let server = TestServer::with_tokens(&principals).await;
    let port = server.addr().port();
    for url in [
        format!("http://127.0.0.1:{port}"),
        format!("http://localhost:{port}"),
    ] {
        let args = [
            "--server",
            &url,
            "--token",
            principals.token("viewer"),
            "--output",
            "json",
            "status",
        ];
        status_revision(&succeeded(&args, &run(&platform, &[], &args).await));
    }
    let mut config = SubscriberConfig::new(
        [server.url.clone()],
        Namespace::live(),
        Channel::parse("ivr").unwrap(),
        "loopback-ivr",
    );
    config.trusted_keys = Some(server.trusted_keys());
    config.token = Some(principals.token("subscriber").to_string());
    let subscriber = Subscriber::connect(config)
        .await
        .expect("a token goes in plain text to loopback");
    assert!(subscriber.current().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_names_the_tls_file_it_cannot_use() {
    let pki = Pki::new();
    let platform = pki.path("other-ca.pem");
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("store");
    let data_arg = data_dir.display().to_string();
    let (cert, key, ca_key) = (
        pki.arg("server.pem"),
        pki.arg("server.key"),
        pki.arg("ca.key"),
    );
    let missing = pki.arg("missing.pem");
    let serve = ["serve", "--listen", "127.0.0.1:0", "--data-dir", &data_arg];
    let cases: Vec<(Vec<&str>, Vec<String>)> = vec![
        (
            vec!["--tls-cert", &cert],
            vec!["--tls-cert needs --tls-key".into()],
        ),
        (
            vec!["--tls-key", &key],
            vec!["--tls-key needs --tls-cert".into()],
        ),
        (
            vec!["--tls-cert", &missing, "--tls-key", &key],
            vec![format!("cannot read the TLS certificate {missing}")],
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &missing],
            vec![format!("cannot read the TLS key {missing}")],
        ),
        (
            vec!["--tls-cert", &key, "--tls-key", &key],
            vec![format!("the TLS certificate {key} holds no certificate")],
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &cert],
            vec![format!("the TLS key {cert} holds no usable private key")],
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &ca_key],
            vec![
                format!("cannot serve TLS with the certificate {cert} and the key {ca_key}"),
                "is the key the certificate's?".into(),
            ],
        ),
    ];
    for (tls_args, expected) in &cases {
        let args: Vec<&str> = serve.iter().chain(tls_args).copied().collect();
        let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
        refused(&args, &run(&platform, &[], &args).await, &expected);
    }
    assert!(
        !data_dir.exists(),
        "a bad TLS file must stop serve before it opens the store"
    );
}

// === TLS to etcd ===

impl Pki {
    /// A one-member etcd that serves clients over TLS with `server.pem` and
    /// asks for a certificate `ca.pem` signed.
    async fn etcd(&self) -> EtcdCluster {
        let read = |name: &str| std::fs::read(self.path(name)).unwrap();
        let client = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read("ca.pem")))
            .identity(etcd_client::Identity::from_pem(
                read("client.pem"),
                read("client.key"),
            ));
        EtcdCluster::start_tls(
            1,
            ClientTls {
                ca: self.path("ca.pem"),
                cert: self.path("server.pem"),
                key: self.path("server.key"),
                client,
            },
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_keeps_its_state_in_an_etcd_that_speaks_only_tls() {
    let pki = Pki::new();
    let etcd = pki.etcd().await;
    let server = TestServer::start_with(ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        signing_key: safemode_grpc::server::SigningKeySource::Key(
            crate::support::test_signing_key(),
        ),
        store: StoreConfig::Etcd {
            endpoints: etcd.endpoints(),
            prefix: "/safemode/".into(),
            tls: EtcdTls {
                ca_cert: Some(pki.path("ca.pem")),
                cert: Some(pki.path("client.pem")),
                key: Some(pki.path("client.key")),
            },
        },
        ..ServeConfig::default()
    })
    .await;
    let subscriber = server.subscriber("web", "web-tls").await;
    let mut control = server.control().await;
    let applied = control
        .apply_modes(proto::ApplyModesRequest {
            namespace: "live".into(),
            modes: vec!["freeze-credential-changes".into()],
            reason: "etcd over TLS".into(),
            ..Default::default()
        })
        .await
        .expect("a change commits to etcd over TLS")
        .into_inner();
    wait_until("the subscriber applies the change", || async {
        subscriber
            .current()
            .is_some_and(|s| s.revision == applied.revision)
    })
    .await;
    let reset = Action::parse("account.password_reset").unwrap();
    assert_eq!(
        subscriber.decide(&reset, &Context::default()).effect(),
        EffectKind::Deny
    );

    // The change is in etcd, read back by another TLS client.
    let mut reader = etcd_client::Client::connect(
        etcd.endpoints(),
        Some(
            etcd_client::ConnectOptions::new().with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(
                        std::fs::read(pki.path("ca.pem")).unwrap(),
                    ))
                    .identity(etcd_client::Identity::from_pem(
                        std::fs::read(pki.path("client.pem")).unwrap(),
                        std::fs::read(pki.path("client.key")).unwrap(),
                    )),
            ),
        ),
    )
    .await
    .unwrap();
    let stored = reader
        .get(
            "/safemode/ns/live/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert!(
        stored.kvs().iter().any(|kv| kv
            .value_str()
            .unwrap_or_default()
            .contains("freeze-credential-changes")),
        "the activation is stored in etcd"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_etcd_ca_the_platforms_certificates_vouch_for_etcd() {
    let pki = Pki::new();
    let etcd = pki.etcd().await;
    let endpoint = etcd.endpoints()[0].clone();
    let (cert, key, ca) = (
        pki.arg("client.pem"),
        pki.arg("client.key"),
        pki.arg("ca.pem"),
    );
    let signing_key = crate::support::test_signing_key_file()
        .display()
        .to_string();
    // The platform's CA file is the one that signed etcd's certificate.
    let server = ServeProcess::start(
        &[
            "--store",
            "etcd",
            "--etcd-endpoints",
            &endpoint,
            "--etcd-cert",
            &cert,
            "--etcd-key",
            &key,
        ],
        &[
            ("SSL_CERT_FILE", &ca),
            ("SSL_CERT_DIR", "/nonexistent"),
            ("SAFEMODE_SIGNING_KEY", &signing_key),
        ],
    );
    let applied = safemode(&[
        "--server",
        &server.url,
        "mode",
        "apply",
        "incident-notice",
        "--reason",
        "etcd trusted through the platform's CAs",
    ])
    .await;
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_says_why_it_cannot_use_etcd_over_tls() {
    let pki = Pki::new();
    let etcd = pki.etcd().await;
    let endpoint = etcd.endpoints()[0].clone();
    let plain = endpoint.replace("https://", "http://");
    let (ca, other_ca, cert, key) = (
        pki.arg("ca.pem"),
        pki.arg("other-ca.pem"),
        pki.arg("client.pem"),
        pki.arg("client.key"),
    );
    let mixed = format!("{endpoint},{plain}");
    let serve = ["serve", "--listen", "127.0.0.1:0", "--store", "etcd"];
    let cases: Vec<(Vec<&str>, Vec<String>)> = vec![
        // Settings that cannot work, refused before anything connects.
        (
            vec!["--etcd-endpoints", &plain, "--etcd-ca-cert", &ca],
            vec!["are for TLS to etcd: write the endpoints as https://".into()],
        ),
        (
            vec!["--etcd-endpoints", &mixed, "--etcd-ca-cert", &ca],
            vec!["mixes http:// and https://".into()],
        ),
        (
            vec!["--etcd-endpoints", &endpoint, "--etcd-cert", &cert],
            vec!["--etcd-cert needs --etcd-key".into()],
        ),
        (
            vec!["--etcd-endpoints", &endpoint, "--etcd-ca-cert", &key],
            vec![format!(
                "the etcd CA certificate {key} holds no certificate"
            )],
        ),
        (
            vec![
                "--etcd-endpoints",
                &endpoint,
                "--etcd-ca-cert",
                &ca,
                "--etcd-cert",
                &cert,
                "--etcd-key",
                &cert,
            ],
            vec![format!(
                "the etcd client key {cert} holds no usable private key"
            )],
        ),
        // A cluster vouched for by a CA we do not trust (here: the
        // platform's, without --etcd-ca-cert), or one that wants our
        // certificate when we have none.
        (
            vec![
                "--etcd-endpoints",
                &endpoint,
                "--etcd-cert",
                &cert,
                "--etcd-key",
                &key,
            ],
            vec![
                format!("cannot reach etcd at {endpoint}"),
                "UnknownIssuer".into(),
                "give --etcd-ca-cert the CA".into(),
            ],
        ),
        (
            vec![
                "--etcd-endpoints",
                &endpoint,
                "--etcd-ca-cert",
                &other_ca,
                "--etcd-cert",
                &cert,
                "--etcd-key",
                &key,
            ],
            vec![
                format!("cannot reach etcd at {endpoint}"),
                "UnknownIssuer".into(),
                "give --etcd-ca-cert the CA".into(),
            ],
        ),
        (
            vec!["--etcd-endpoints", &endpoint, "--etcd-ca-cert", &ca],
            // rustls sees etcd's refusal as an alert or as a closed
            // stream, depending on timing: only the first gets a hint.
            vec![format!("cannot reach etcd at {endpoint}")],
        ),
    ];
    let platform = pki.path("other-ca.pem");
    for (etcd_args, expected) in &cases {
        let args: Vec<&str> = serve.iter().chain(etcd_args).copied().collect();
        let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
        refused(&args, &run(&platform, &[], &args).await, &expected);
    }
    // The embedded store has no use for them.
    let args = ["serve", "--listen", "127.0.0.1:0", "--etcd-ca-cert", &ca];
    refused(
        &args,
        &run(&platform, &[], &args).await,
        &["need --store etcd"],
    );
}
