//! Issue 13, item 3: every replica has a name of its own. Two replicas
//! started as the README shows (no `--replica`) on one host and one etcd
//! answer with different names, each its host and listen port, so a
//! commander can tell which one answered; a bad `--replica` is refused
//! before anything starts.

use crate::etcd::EtcdCluster;
use crate::support::{
    ServeProcess, register_key, safemode, test_signing_key, test_signing_key_file,
};

/// `safemode status --output json` against `url`: the replica that answered.
async fn replica_of(url: &str) -> String {
    let output = safemode(&["--server", url, "--output", "json", "status"]).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    status["replica"]
        .as_str()
        .unwrap_or_else(|| panic!("no replica in {status}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_host_have_names_of_their_own() {
    let etcd = EtcdCluster::start(1).await;
    let endpoints = etcd.endpoints().join(",");
    let key = test_signing_key_file().display().to_string();
    let args = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        &endpoints,
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

    let (name_a, name_b) = (replica_of(&a.url).await, replica_of(&b.url).await);
    assert_ne!(name_a, name_b, "both replicas answer as {name_a}");
    for (name, url) in [(&name_a, &a.url), (&name_b, &b.url)] {
        let port = url.rsplit(':').next().unwrap();
        assert!(
            name.ends_with(&format!(":{port}")),
            "{name} is not named after its port {port}"
        );
    }

    // Every answer names the replica that gave it: its last line in text,
    // a `replica` field in JSON, reads or writes.
    for (name, url) in [(&name_a, &a.url), (&name_b, &b.url)] {
        let reason = format!("through {name}");
        let applied = safemode(&[
            "--server",
            url,
            "mode",
            "apply",
            "incident-notice",
            "--channels",
            if *name == name_a { "web" } else { "ivr" },
            "--reason",
            &reason,
        ])
        .await;
        assert_eq!(applied.status.code(), Some(0), "{applied:?}");
        let text = String::from_utf8_lossy(&applied.stdout);
        assert_eq!(
            text.lines().last(),
            Some(format!("answered by replica {name}").as_str()),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("namespace live at revision ")),
            "{text}"
        );
        for args in [
            &["mode", "list"][..],
            &["requests"][..],
            &["incident", "list"][..],
            &["runbook", "list"][..],
            &["audit", "--namespace", "live"][..],
        ] {
            let mut full = vec!["--server", url.as_str(), "-o", "json"];
            full.extend_from_slice(args);
            let output = safemode(&full).await;
            assert_eq!(output.status.code(), Some(0), "{args:?}: {output:?}");
            let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            assert_eq!(json["replica"], name.as_str(), "{args:?}: {json}");
            if args[0] != "audit" {
                let mut text_args = vec!["--server", url.as_str()];
                text_args.extend_from_slice(args);
                let text = safemode(&text_args).await;
                let text = String::from_utf8_lossy(&text.stdout);
                assert_eq!(
                    text.lines().last(),
                    Some(format!("answered by replica {name}").as_str()),
                    "{args:?}: {text}"
                );
            }
        }
    }
}

#[tokio::test]
async fn a_bad_replica_name_is_refused_before_anything_starts() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().display().to_string();
    for bad in ["", "two words", "line\nbreak"] {
        let output = safemode(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &dir,
            "--replica",
            bad,
        ])
        .await;
        assert_eq!(output.status.code(), Some(1), "{bad:?}: {output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{bad:?}: {stderr}");
        assert!(stderr.starts_with("error: bad --replica"), "{stderr}");
        // Nothing started: no store, no key.
        assert!(
            std::fs::read_dir(data.path()).unwrap().next().is_none(),
            "{bad:?} left files in the data directory"
        );
    }
}
