//! Issue 12, item 4: `serve --check` parses every flag and reads every file,
//! prints what it would serve, and exits without binding, opening the store
//! or writing anything; a bad flag or file is one line and exit 1 or 2.

use std::process::Output;

use crate::support::{safemode, test_signing_key_file};

/// Runs `safemode serve --check args` in `dir`.
async fn check(dir: &std::path::Path, args: &[&str]) -> Output {
    let mut full = vec!["serve", "--check"];
    full.extend_from_slice(args);
    tokio::process::Command::new(env!("CARGO_BIN_EXE_safemode"))
        .args(&full)
        .current_dir(dir)
        .env_remove("SAFEMODE_SERVER")
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_check_reads_everything_and_binds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // A port in use: a check that bound it would fail.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let created = safemode(&[
        "-o",
        "json",
        "token",
        "create",
        "--principal",
        "alice",
        "--role",
        "commander",
    ])
    .await;
    let line: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(&tokens, format!("{}\n", line["line"].as_str().unwrap())).unwrap();
    let tokens = tokens.to_str().unwrap().to_string();
    let key = test_signing_key_file().display().to_string();
    let serves = format!("would serve on {listen} as replica ");
    // A self-signed certificate, elsewhere (the check must write nothing
    // in `dir`).
    let pki = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(pki.path().join("tls.crt"), certified.cert.pem()).unwrap();
    std::fs::write(
        pki.path().join("tls.key"),
        certified.signing_key.serialize_pem(),
    )
    .unwrap();
    let (cert, cert_key) = (
        pki.path().join("tls.crt").display().to_string(),
        pki.path().join("tls.key").display().to_string(),
    );

    // (arguments, exit code, what stdout or stderr must hold)
    let cases: Vec<(Vec<&str>, i32, Vec<&str>)> = vec![
        (
            vec!["--listen", &listen],
            0,
            vec![
                &serves,
                "store: embedded store in safemode-data",
                "modes: 12, runbooks: 6 (catalogue fingerprint ",
                "tokens: none",
                "a new signing key, made at safemode-data/signing.key on first start",
                "OTLP: none (no OTEL_EXPORTER_OTLP_* endpoint)",
                "check passed: nothing was bound, opened or written",
            ],
        ),
        (
            vec![
                "--listen",
                "0.0.0.0:7700",
                "--tokens",
                &tokens,
                "--store",
                "etcd",
                // Nothing listens there: a check does not connect.
                "--etcd-endpoints",
                "http://127.0.0.1:1",
                "--signing-key",
                &key,
                "--replica",
                "pod-0",
                "--advertise",
                "10.0.0.5:7700",
            ],
            0,
            vec![
                "would serve on 0.0.0.0:7700 as replica pod-0",
                "the other replicas reach it at 10.0.0.5:7700 (record renewed every 5s of a 15s lease)",
                "store: etcd at http://127.0.0.1:1 (prefix /safemode/); not contacted",
                "tokens: 1 from the tokens file",
                "signing key ed25519:",
            ],
        ),
        (vec!["--tokens", "missing.yaml"], 1, vec!["missing.yaml"]),
        // The --http-listen listener says what it speaks.
        (
            vec!["--http-listen", "127.0.0.1:8080"],
            0,
            vec![
                "HTTP: /healthz, /readyz, /metrics and the console on 127.0.0.1:8080 over plain HTTP (loopback)",
            ],
        ),
        (
            vec![
                "--tls-cert",
                &cert,
                "--tls-key",
                &cert_key,
                "--http-listen",
                "0.0.0.0:8080",
                "--tokens",
                &tokens,
            ],
            0,
            vec![
                "HTTP: /healthz, /readyz, /metrics and the console on 0.0.0.0:8080 over HTTPS with the gRPC certificate (ALPN h2, http/1.1)",
            ],
        ),
        (
            vec![
                "--http-listen",
                "0.0.0.0:8080",
                "--tokens",
                &tokens,
                "--console-plain-http",
            ],
            0,
            vec![
                "HTTP: /healthz, /readyz, /metrics and the console on 0.0.0.0:8080 over plain HTTP, behind a TLS proxy (--console-plain-http)",
            ],
        ),
        (
            vec!["--http-listen", "0.0.0.0:8080", "--tokens", &tokens],
            0,
            vec![
                "HTTP: /healthz, /readyz and /metrics on 0.0.0.0:8080 over plain HTTP; the console is refused there",
            ],
        ),
        (
            vec![
                "--tls-cert",
                &cert,
                "--tls-key",
                &cert_key,
                "--http-listen",
                "0.0.0.0:8080",
                "--tokens",
                &tokens,
                "--console-plain-http",
            ],
            1,
            vec![
                "with --tls-cert that listener speaks HTTPS itself and serves the console: drop --console-plain-http",
            ],
        ),
        (
            vec![
                "--store",
                "etcd",
                "--etcd-endpoints",
                "http://127.0.0.1:1",
                "--signing-key",
                &key,
                "--tls-cert",
                &cert,
                "--tls-key",
                &cert_key,
            ],
            1,
            vec!["with --tls-cert and --store etcd, give --peer-ca FILE"],
        ),
        (
            vec![
                "--store",
                "etcd",
                "--etcd-endpoints",
                "http://127.0.0.1:1",
                "--signing-key",
                &key,
                "--tls-cert",
                &cert,
                "--tls-key",
                &cert_key,
                "--peer-ca",
                &cert,
                "--peer-tls-name",
                "localhost",
            ],
            0,
            vec!["the other replicas reach it at 127.0.0.1:", "gRPC: TLS"],
        ),
        (
            vec![
                "--listen",
                "0.0.0.0:7700",
                "--tokens",
                &tokens,
                "--store",
                "etcd",
                "--etcd-endpoints",
                "http://127.0.0.1:1",
                "--signing-key",
                &key,
            ],
            1,
            vec!["give --advertise HOST:PORT (in Kubernetes: --advertise $(POD_IP):7700)"],
        ),
        (
            vec!["--advertise", "http://10.0.0.5:7700"],
            1,
            vec!["bad --advertise \"http://10.0.0.5:7700\": give no scheme"],
        ),
        (
            vec!["--replica-ttl", "1s"],
            1,
            vec!["--replica-ttl 1s is out of range: give 2s to 5m"],
        ),
        (
            vec!["--peer-ca", "ca.pem"],
            1,
            vec!["--peer-ca is for replicas that serve TLS"],
        ),
        (
            vec!["--listen", "0.0.0.0:7700"],
            1,
            vec!["without a tokens file"],
        ),
        (
            vec!["--store", "etcd", "--etcd-endpoints", "http://127.0.0.1:1"],
            1,
            vec!["give --signing-key FILE"],
        ),
        (
            vec![
                "--store",
                "etcd",
                "--etcd-endpoints",
                "127.0.0.1:2379",
                "--signing-key",
                &key,
            ],
            1,
            vec!["is not a URL"],
        ),
        (vec!["--modes", "no-such-dir"], 1, vec!["no-such-dir"]),
        (vec!["--tls-cert", "cert.pem"], 1, vec!["--tls-key"]),
        (vec!["--listen", "not-an-address"], 2, vec!["--listen"]),
    ];
    for (args, code, holds) in &cases {
        let output = check(dir.path(), args).await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(*code),
            "{args:?}: {stdout}{stderr}"
        );
        if *code == 0 {
            assert!(stderr.is_empty(), "{args:?}: {stderr}");
            for part in holds {
                assert!(
                    stdout.lines().any(|l| l.starts_with(part)),
                    "{args:?}: {part:?} not in {stdout}"
                );
            }
        } else {
            assert!(stdout.is_empty(), "{args:?}: {stdout}");
            assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
            for part in holds {
                assert!(stderr.contains(part), "{args:?}: {part:?} not in {stderr}");
            }
        }
        // Nothing written: the directory holds only the tokens file.
        let entries: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(entries, ["tokens.yaml"], "{args:?} wrote something");
    }
    drop(taken);
}
