//! Issue 13, item 4: `status` shows the store's health, and a write that
//! fails because the store is unreachable says so and that nothing changed.
//!
//! Two replicas on a real etcd, started as the README shows. Healthy, status
//! names the store, says it is reachable and that the replica is caught up.
//! With etcd stopped (SIGKILL, by pid), every command, through both
//! replicas, exits 1 with one line on stderr naming etcd and its endpoint,
//! the cause in plain words and "nothing changed"; status exits 1 too and
//! shows the store's problem, and reads say the store is unreachable. Restarted on the same data, nothing changed:
//! status and the audit log are what they were before.

use crate::etcd::EtcdCluster;
use crate::support::{
    ServeProcess, TestServer, register_key, safemode, test_signing_key, test_signing_key_file,
    wait_for, wait_until,
};

/// `safemode --server SERVER -o json status`: its exit code, JSON and
/// stderr.
async fn status_json(server: &str) -> (Option<i32>, serde_json::Value, String) {
    let output = safemode(&["--server", server, "-o", "json", "status"]).await;
    let json = serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    (output.status.code(), json, stderr)
}

/// What must not change while the store is down: the namespace's revision
/// and activations as status shows them, and the whole audit log.
async fn state(server: &str) -> (serde_json::Value, serde_json::Value) {
    let (code, status, stderr) = status_json(server).await;
    assert_eq!(code, Some(0), "{stderr}");
    let audit = safemode(&["--server", server, "-o", "json", "audit"]).await;
    assert_eq!(audit.status.code(), Some(0), "{audit:?}");
    let mut audit: serde_json::Value = serde_json::from_slice(&audit.stdout).unwrap();
    // The log as stored, whichever replica answered.
    audit.as_object_mut().unwrap().remove("replica");
    (
        serde_json::json!({
            "revision": status["revision"],
            "activations": status["activations"],
        }),
        audit,
    )
}

/// Whether a replica's status says the store is reachable, with no lag
/// and no problem.
fn healthy(json: &serde_json::Value) -> bool {
    json["store"]["reachable"] == true
        && json["store"]["lag_revisions"] == 0
        && json["store"]["follower_error"].is_null()
        && json["problems"].as_array().is_some_and(Vec::is_empty)
}

fn run(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_down_status_says_so_and_every_write_changes_nothing() {
    let mut etcd = EtcdCluster::start(1).await;
    let endpoint = etcd.endpoints()[0].clone();
    let key = test_signing_key_file().display().to_string();
    let args = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        &endpoint,
        "--signing-key",
        &key,
    ]
    .map(String::from);
    let start = || {
        let args = args.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ServeProcess::start(&args, &[])
        })
    };
    let (a, b) = (start().await.unwrap(), start().await.unwrap());
    let pem = test_signing_key().public_key().to_pem();
    register_key(&a.url, &pem);
    register_key(&b.url, &pem);
    let both = format!("{},{}", a.url, b.url);

    // Something to lift, escalate and resolve.
    let applied = safemode(&[
        "--server",
        &both,
        "mode",
        "apply",
        "incident-notice",
        "--reason",
        "by hand",
    ])
    .await;
    assert_eq!(applied.status.code(), Some(0), "{applied:?}");
    let declared = safemode(&[
        "--server",
        &both,
        "-o",
        "json",
        "incident",
        "declare",
        "credential-stuffing",
        "--severity",
        "sev3",
        "--reason",
        "login failures x40",
    ])
    .await;
    assert_eq!(declared.status.code(), Some(0), "{declared:?}");
    let declared: serde_json::Value = serde_json::from_slice(&declared.stdout).unwrap();
    let incident = declared["incident"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no incident id in {declared}"))
        .to_string();

    // Healthy: both replicas name the store, reachable and caught up.
    for url in [&a.url, &b.url] {
        let json = wait_for("the replica is caught up with etcd", || async {
            let (code, json, _) = status_json(url).await;
            (code == Some(0) && healthy(&json)).then_some(json)
        })
        .await;
        let store = &json["store"];
        assert_eq!(store["kind"], "etcd", "{json}");
        assert_eq!(store["endpoints"], serde_json::json!([endpoint]), "{json}");
        assert_eq!(
            store["applied_revision"], store["namespace_revision"],
            "{json}"
        );
        assert!(store["store_revision"].as_i64() >= store["applied_revision"].as_i64());
        let text = safemode(&["--server", url, "status"]).await;
        assert_eq!(text.status.code(), Some(0), "{text:?}");
        let text = String::from_utf8_lossy(&text.stdout);
        let line = text
            .lines()
            .find(|l| l.starts_with("STORE "))
            .unwrap_or_else(|| panic!("no STORE line in:\n{text}"));
        assert_eq!(
            line,
            format!(
                "STORE etcd at {endpoint}: reachable, at revision {}; this replica is up to date in namespace live (revision {})",
                store["store_revision"], store["applied_revision"]
            )
        );
    }
    let before = state(&a.url).await;

    etcd.kill(0);
    let unreachable = format!("the store (etcd at {endpoint}) is unreachable: connection refused");
    // Each replica notices (the first call after the kill may still see the
    // old connection break rather than a refusal).
    for url in [&a.url, &b.url] {
        wait_until("the replica finds etcd refusing connections", || async {
            let (_, json, _) = status_json(url).await;
            json["store"]["error"] == "connection refused"
        })
        .await;
    }

    let (code, json, stderr) = status_json(&a.url).await;
    assert_eq!(code, Some(1), "{json} {stderr}");
    let replica = json["replica"].as_str().unwrap().to_string();
    assert_eq!(
        stderr,
        format!(
            "error: {unreachable}; status shows what replica {replica} last read, and no change can be made until the store is back\n"
        )
    );
    let revision = json["revision"].as_i64().unwrap();
    assert_eq!(
        json["problems"],
        serde_json::json!([format!(
            "{unreachable}; this replica shows what it last read (revision {revision}), and every change fails, changing nothing, until the store is back"
        )]),
    );
    assert_eq!(json["store"]["reachable"], false);
    assert_eq!(
        json["activations"], before.0["activations"],
        "it still shows what it last read"
    );
    let text = safemode(&["--server", &a.url, "status"]).await;
    assert_eq!(text.status.code(), Some(1));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines().any(|l| l
            == format!(
                "STORE etcd at {endpoint}: UNREACHABLE (connection refused); showing what this replica last read (revision {revision})"
            )),
        "{text}"
    );

    let nothing_changed = format!("error: {unreachable}; nothing changed, retry when it is back\n");
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "mode apply",
            run(&["mode", "apply", "freeze-phone-changes", "--reason", "x"]),
        ),
        (
            "mode lift",
            run(&["mode", "lift", "incident-notice", "--reason", "x"]),
        ),
        (
            "incident declare",
            run(&[
                "incident",
                "declare",
                "fraud-spike",
                "--severity",
                "sev3",
                "--reason",
                "x",
            ]),
        ),
        (
            "incident escalate",
            run(&[
                "incident",
                "escalate",
                &incident,
                "--severity",
                "sev2",
                "--reason",
                "x",
            ]),
        ),
        (
            "incident resolve",
            run(&["incident", "resolve", &incident, "--reason", "x"]),
        ),
    ];
    for (what, args) in &cases {
        let mut full = vec!["--server", both.as_str()];
        full.extend(args.iter().map(String::as_str));
        let output = safemode(&full).await;
        assert_eq!(output.status.code(), Some(1), "{what}: {output:?}");
        assert_eq!(
            String::from_utf8_lossy(&output.stderr),
            nothing_changed,
            "{what}"
        );
        assert!(output.stdout.is_empty(), "{what}: {output:?}");
    }

    // Reads say the same, without "nothing changed": there was nothing to
    // change.
    let retry = format!("error: {unreachable}; retry when it is back\n");
    let reads: Vec<(&str, Vec<String>)> = vec![
        ("audit", run(&["audit"])),
        ("incident show", run(&["incident", "show", &incident])),
        ("requests", run(&["requests"])),
    ];
    for (what, args) in &reads {
        let mut full = vec!["--server", a.url.as_str()];
        full.extend(args.iter().map(String::as_str));
        let output = safemode(&full).await;
        assert_eq!(output.status.code(), Some(1), "{what}: {output:?}");
        assert_eq!(String::from_utf8_lossy(&output.stderr), retry, "{what}");
    }

    // Back on the same data: nothing changed, and both replicas catch up.
    etcd.restart(0).await;
    for url in [&a.url, &b.url] {
        wait_until("the replica finds etcd back", || async {
            let (code, json, _) = status_json(url).await;
            code == Some(0) && healthy(&json)
        })
        .await;
        assert_eq!(state(url).await, before, "{url}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_is_named_and_always_caught_up() {
    let server = TestServer::start().await;
    let url = server.url.as_str();
    let applied = safemode(&[
        "--server",
        url,
        "mode",
        "apply",
        "incident-notice",
        "--reason",
        "by hand",
    ])
    .await;
    assert_eq!(applied.status.code(), Some(0), "{applied:?}");
    let (code, json, stderr) = status_json(url).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(healthy(&json), "{json}");
    let store = &json["store"];
    assert_eq!(store["kind"], "embedded", "{json}");
    let path = store["endpoints"][0].as_str().unwrap().to_string();
    assert!(path.ends_with("store.redb"), "{json}");
    assert_eq!(store["applied_revision"], json["revision"], "{json}");
    let text = safemode(&["--server", url, "status"]).await;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines().any(|l| l
            == format!(
                "STORE embedded store at {path}: reachable, at revision {}; this replica is up to date in namespace live (revision {})",
                store["store_revision"], json["revision"]
            )),
        "{text}"
    );
}

/// Below the controller: a stopped etcd is named, and every call says
/// "connection refused" rather than tonic's chain of transport errors; a
/// transaction refused that way was never sent, so it changed nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_etcd_is_refusal_in_plain_words_for_every_call() {
    use safemode_store::{Error, Op, Txn};
    let mut etcd = EtcdCluster::start(1).await;
    let endpoint = etcd.endpoints()[0].clone();
    let store = etcd.store().await;
    assert_eq!(store.place().to_string(), format!("etcd at {endpoint}"));
    let within = std::time::Duration::from_secs(2);
    store.probe("/ux-store/key", within).await.unwrap();

    etcd.kill(0);
    wait_until("the probe finds etcd refusing connections", || async {
        matches!(
            store.probe("/ux-store/key", within).await,
            Err(Error::Unavailable(cause)) if cause.message() == "connection refused"
        )
    })
    .await;
    let read = store.range("/ux-store/").await.unwrap_err();
    let write = store
        .txn(Txn {
            compares: Vec::new(),
            ops: vec![Op::Put {
                key: "/ux-store/key".into(),
                value: b"v".to_vec(),
            }],
        })
        .await
        .unwrap_err();
    for error in [read, write] {
        assert_eq!(error.to_string(), "store unavailable: connection refused");
        assert!(!error.may_have_applied(), "{error:?}");
    }

    etcd.restart(0).await;
    let after = store.range("/ux-store/").await.unwrap();
    assert!(after.kvs.is_empty(), "the refused write changed something");
}
