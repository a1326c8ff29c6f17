//! Issue 12, item 1: the fleet in one view. Two replicas on one real etcd,
//! subscribers on each: `safemode status` from either lists every
//! subscriber of the namespace with its replica and state (SYNCED,
//! NOT_ACKED, STALE, REJECTED with the reason) and a summary per channel;
//! `--channel` and `--state` filter; `--wait-synced` exits 0 once everyone
//! acked the current revision and 1 naming who did not; a replica that does
//! not answer is named and the answer is partial. Replicas find each other
//! through one leased record each (nothing per subscriber), and ask each
//! other with requests signed by the fleet's key, which nobody else can
//! forge.

use std::process::Output;

use serde_json::Value;
use tonic::transport::Channel;

use crate::etcd::EtcdCluster;
use crate::support::{
    RawSubscriber, ServeProcess, register_key, safemode, test_signing_key, test_signing_key_file,
    wait_for, wait_until,
};
use safemode_wire::proto::{self, fleet_service_client::FleetServiceClient};

/// A replica named `name` on `endpoints`, whose record outlives a SIGKILL
/// for the length of the test.
pub(crate) fn replica(name: &str, endpoints: &str) -> ServeProcess {
    let key = test_signing_key_file().display().to_string();
    let process = ServeProcess::start(
        &[
            "--store",
            "etcd",
            "--etcd-endpoints",
            endpoints,
            "--signing-key",
            &key,
            "--replica",
            name,
            "--replica-ttl",
            "5m",
        ],
        &[],
    );
    register_key(&process.url, &test_signing_key().public_key().to_pem());
    process
}

async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .expect("the replica accepts connections")
}

/// `safemode --server URL ARGS...`.
async fn on(url: &str, args: &[&str]) -> Output {
    let mut all = vec!["--server", url];
    all.extend_from_slice(args);
    safemode(&all).await
}

/// `safemode status --output json ARGS...` on `url`, which must succeed.
async fn status_json(url: &str, args: &[&str]) -> Value {
    let mut all = vec!["--output", "json", "status"];
    all.extend_from_slice(args);
    let output = on(url, &all).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    serde_json::from_slice(&output.stdout).expect("status prints JSON")
}

/// (subscriber, replica, state) of every subscriber in a status, sorted.
fn subscribers(status: &Value) -> Vec<Row> {
    let mut rows: Vec<Row> = status["subscribers"]
        .as_array()
        .expect("subscribers")
        .iter()
        .map(|s| {
            (
                s["subscriber_id"].as_str().unwrap().to_string(),
                s["replica"].as_str().unwrap().to_string(),
                s["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    rows.sort();
    rows
}

/// (channel, [synced, not_acked, stale, rejected]) per channel.
fn summary(status: &Value) -> Vec<(String, [u64; 4])> {
    status["channels"]
        .as_array()
        .expect("channels")
        .iter()
        .map(|c| {
            (
                c["channel"].as_str().unwrap().to_string(),
                ["synced", "not_acked", "stale", "rejected"].map(|k| c[k].as_u64().unwrap()),
            )
        })
        .collect()
}

/// (subscriber, replica, state).
type Row = (String, String, String);

/// What a refused fleet call must say: its code and words in its message.
type Refusal = Option<(tonic::Code, &'static str)>;

fn rows(list: &[(&str, &str, &str)]) -> Vec<Row> {
    list.iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect()
}

fn stderr_line(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(stderr.lines().count(), 1, "one line on stderr: {stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_from_either_replica_shows_the_whole_fleet() {
    let etcd = EtcdCluster::start(1).await;
    let endpoints = etcd.endpoints().join(",");
    let store = etcd.store().await;
    let (a, b) = (replica("r-a", &endpoints), replica("r-b", &endpoints));
    let (to_a, to_b) = (channel(&a.url).await, channel(&b.url).await);

    // Before anyone subscribes: the store's keys and revision, which no
    // number of subscribers may change.
    wait_until("both replicas' records", || async {
        store
            .range("/safemode/replicas/")
            .await
            .is_ok_and(|r| r.kvs.len() == 2)
    })
    .await;
    let before = store.range("/safemode/").await.unwrap();

    let web = RawSubscriber::connect(to_a.clone(), "live", "web", "a-web", 0)
        .await
        .unwrap();
    let ivr = RawSubscriber::connect(to_b.clone(), "live", "ivr", "b-ivr", 0)
        .await
        .unwrap();
    let mut crowd = Vec::new();
    for i in 0..20 {
        let to = if i % 2 == 0 { &to_a } else { &to_b };
        crowd.push(
            RawSubscriber::connect(to.clone(), "live", "email", &format!("crowd-{i:02}"), 0)
                .await
                .unwrap(),
        );
    }
    wait_until("22 subscribers in the fleet's status", || async {
        status_json(&a.url, &[]).await["subscriber_count"] == 22
    })
    .await;
    let after = store.range("/safemode/").await.unwrap();
    assert_eq!(
        (after.revision, after.kvs.len()),
        (before.revision, before.kvs.len()),
        "subscribing wrote to the store"
    );
    drop(crowd);

    // A flip, then every acking subscriber on both replicas is SYNCED.
    let applied = on(
        &a.url,
        &["mode", "apply", "bots-faq-only", "--reason", "fleet test"],
    )
    .await;
    assert_eq!(applied.status.code(), Some(0), "{applied:?}");
    let synced = on(&b.url, &["status", "--wait-synced", "--timeout", "30s"]).await;
    assert_eq!(synced.status.code(), Some(0), "{synced:?}");
    let text = String::from_utf8_lossy(&synced.stdout);
    assert!(
        text.starts_with("namespace live at revision ")
            && text.contains(": 1 active, 2 subscribers on 2 replicas, 2 SYNCED\n"),
        "{text}"
    );
    let revision = status_json(&a.url, &[]).await["revision"].as_i64().unwrap();
    assert!(web.revisions().contains(&revision) && ivr.revisions().contains(&revision));

    // One subscriber rejects the snapshot, another never answers.
    let bot = RawSubscriber::connect_silent(to_b.clone(), "live", "chatbot", "b-bot")
        .await
        .unwrap();
    let mobile = RawSubscriber::connect_silent(to_a.clone(), "live", "mobile", "a-mobile")
        .await
        .unwrap();
    let rejected = wait_for("the chatbot's snapshot", || async { bot.latest() }).await;
    bot.reject(rejected.revision, "rule 7: unknown action kind")
        .await;
    wait_for("the mobile snapshot", || async { mobile.latest() }).await;

    let everyone = rows(&[
        ("a-mobile", "r-a", "NOT_ACKED"),
        ("a-web", "r-a", "SYNCED"),
        ("b-bot", "r-b", "REJECTED"),
        ("b-ivr", "r-b", "SYNCED"),
    ]);
    for url in [&a.url, &b.url] {
        let status = wait_for("the rejection in the fleet's status", || async {
            let status = status_json(url, &[]).await;
            (subscribers(&status) == everyone).then_some(status)
        })
        .await;
        assert_eq!(status["partial"], false, "{status}");
        assert_eq!(
            summary(&status),
            vec![
                ("web".to_string(), [1, 0, 0, 0]),
                ("ivr".to_string(), [1, 0, 0, 0]),
                ("chatbot".to_string(), [0, 0, 0, 1]),
                ("mobile".to_string(), [0, 1, 0, 0]),
            ]
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .collect::<Vec<_>>(),
            "{status}"
        );
        let bot_row = status["subscribers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["subscriber_id"] == "b-bot")
            .unwrap();
        assert_eq!(bot_row["reject_reason"], "rule 7: unknown action kind");
        assert_eq!(bot_row["rejected_revision"], revision);
        let names: Vec<&str> = status["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                assert_eq!(r["answered"], true, "{r}");
                r["replica"].as_str().unwrap()
            })
            .collect();
        assert_eq!(names, ["r-a", "r-b"]);
    }

    // The filters, from the replica that does not hold what they select.
    let filters: [(&[&str], Vec<Row>, Vec<&str>); 4] = [
        (
            &["--state", "rejected"],
            rows(&[("b-bot", "r-b", "REJECTED")]),
            vec!["chatbot", "ivr", "mobile", "web"],
        ),
        (
            &["--state", "not-acked"],
            rows(&[("a-mobile", "r-a", "NOT_ACKED")]),
            vec!["chatbot", "ivr", "mobile", "web"],
        ),
        (
            &["--channel", "web"],
            rows(&[("a-web", "r-a", "SYNCED")]),
            vec!["web"],
        ),
        (
            &["--channel", "chatbot", "--state", "synced"],
            rows(&[]),
            vec!["chatbot"],
        ),
    ];
    for (args, want, channels) in filters {
        let status = status_json(&b.url, args).await;
        assert_eq!(subscribers(&status), want, "{args:?}: {status}");
        let shown: Vec<String> = summary(&status).into_iter().map(|(c, _)| c).collect();
        assert_eq!(shown, channels, "{args:?}: the summary");
    }

    // --wait-synced names who is not synced, and why.
    let waited = on(&a.url, &["status", "--wait-synced", "--timeout", "1s"]).await;
    assert_eq!(waited.status.code(), Some(1), "{waited:?}");
    let line = stderr_line(&waited);
    for needed in [
        "not synced after 1s: 2 subscribers are not SYNCED at revision",
        "a-mobile (mobile on r-a) NOT_ACKED",
        "b-bot (chatbot on r-b) REJECTED: rule 7: unknown action kind",
    ] {
        assert!(line.contains(needed), "{needed:?} in {line}");
    }
    // Only the web channel's subscribers: synced.
    let web_only = on(
        &a.url,
        &[
            "status",
            "--channel",
            "web",
            "--wait-synced",
            "--timeout",
            "30s",
        ],
    )
    .await;
    assert_eq!(web_only.status.code(), Some(0), "{web_only:?}");

    // A replica that dies is named as not answering, and the answer is
    // partial: its subscribers are missing, not silently dropped.
    drop((bot, ivr));
    b.kill();
    let status = status_json(&a.url, &[]).await;
    assert_eq!(status["partial"], true, "{status}");
    assert_eq!(
        subscribers(&status),
        rows(&[("a-mobile", "r-a", "NOT_ACKED"), ("a-web", "r-a", "SYNCED")])
    );
    let silent: Vec<&Value> = status["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["answered"] == false)
        .collect();
    assert_eq!(silent.len(), 1, "{status}");
    assert_eq!(silent[0]["replica"], "r-b");
    assert!(
        !silent[0]["error"].as_str().unwrap_or_default().is_empty(),
        "{status}"
    );
    assert!(
        status["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().starts_with("replica r-b (")),
        "{status}"
    );
    let text = on(&a.url, &["status"]).await;
    assert_eq!(text.status.code(), Some(0), "{text:?}");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .next()
            .unwrap()
            .ends_with("; PARTIAL: 1 replica did not answer"),
        "{text}"
    );
    drop(mobile);
    let waited = on(&a.url, &["status", "--wait-synced", "--timeout", "1s"]).await;
    assert_eq!(waited.status.code(), Some(1), "{waited:?}");
    let line = stderr_line(&waited);
    assert!(line.contains("replica r-b ("), "{line}");
    assert!(line.contains("did not answer"), "{line}");

    // A replica that stops says goodbye: its record goes at once.
    drop(web);
    let mut a = a;
    stop_gracefully(&mut a);
    wait_until("r-a's record removed on a clean stop", || async {
        store
            .range("/safemode/replicas/")
            .await
            .is_ok_and(|r| r.kvs.iter().all(|kv| !kv.key.ends_with("/r-a")))
    })
    .await;
}

/// SIGTERM, as Kubernetes stops a pod, and wait for the process to end.
fn stop_gracefully(process: &mut ServeProcess) {
    let pid = process.pid().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    process.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_fleet_can_ask_a_replica_for_its_part() {
    let etcd = EtcdCluster::start(1).await;
    let endpoints = etcd.endpoints().join(",");
    let a = replica("r-solo", &endpoints);
    let mut fleet = FleetServiceClient::new(channel(&a.url).await);
    let signed = |mutate: &dyn Fn(&mut proto::ReplicaStatusRequest),
                  key: &safemode_signing::SigningKey| {
        let mut request = proto::ReplicaStatusRequest {
            namespace: "live".into(),
            current_revision: 0,
            page_size: 10,
            asker: "r-other".into(),
            target: "r-solo".into(),
            issued_at: Some(safemode_wire::timestamp_to_wire(jiff::Timestamp::now())),
            ..Default::default()
        };
        mutate(&mut request);
        safemode_wire::signed::sign(&mut request, key);
        request
    };
    let fleet_key = test_signing_key();
    let stranger = safemode_signing::SigningKey::generate().0;
    let cases: Vec<(&str, proto::ReplicaStatusRequest, Refusal)> = vec![
        (
            "signed by the fleet's key",
            signed(&|_| {}, &fleet_key),
            None,
        ),
        (
            "signed by another key",
            signed(&|_| {}, &stranger),
            Some((tonic::Code::Unauthenticated, "not a replica of this fleet")),
        ),
        (
            "unsigned",
            proto::ReplicaStatusRequest {
                namespace: "live".into(),
                target: "r-solo".into(),
                ..Default::default()
            },
            Some((tonic::Code::Unauthenticated, "not a replica of this fleet")),
        ),
        (
            "edited after signing",
            {
                let mut request = signed(&|_| {}, &fleet_key);
                request.page_size = 5000;
                request
            },
            Some((tonic::Code::Unauthenticated, "not a replica of this fleet")),
        ),
        (
            "for another replica",
            signed(&|r| r.target = "r-elsewhere".into(), &fleet_key),
            Some((tonic::Code::FailedPrecondition, "this is replica r-solo")),
        ),
        (
            "signed long ago",
            signed(
                &|r| {
                    r.issued_at = Some(safemode_wire::timestamp_to_wire(
                        jiff::Timestamp::now() - jiff::SignedDuration::from_secs(600),
                    ))
                },
                &fleet_key,
            ),
            Some((
                tonic::Code::Unauthenticated,
                "away from this replica's clock",
            )),
        ),
        (
            "an unknown state",
            signed(&|r| r.state = "happy".into(), &fleet_key),
            Some((tonic::Code::InvalidArgument, "state")),
        ),
        (
            "too large a page",
            signed(&|r| r.page_size = 5001, &fleet_key),
            Some((tonic::Code::InvalidArgument, "page_size")),
        ),
    ];
    for (case, request, refusal) in cases {
        let answer = fleet.replica_status(request).await;
        match (answer, refusal) {
            (Ok(answer), None) => assert_eq!(answer.into_inner().replica, "r-solo", "{case}"),
            (Err(status), Some((code, words))) => {
                assert_eq!(status.code(), code, "{case}: {status:?}");
                assert!(status.message().contains(words), "{case}: {status:?}");
            }
            (answer, refusal) => panic!("{case}: {answer:?}, expected {refusal:?}"),
        }
    }
}

/// A server at an address a forged fleet record names: it answers the
/// fleet's call with a subscriber that does not exist, signed by a key the
/// fleet does not trust (or not at all).
struct RogueReplica {
    key: Option<safemode_signing::SigningKey>,
}

#[tonic::async_trait]
impl proto::fleet_service_server::FleetService for RogueReplica {
    async fn replica_status(
        &self,
        request: tonic::Request<proto::ReplicaStatusRequest>,
    ) -> Result<tonic::Response<proto::ReplicaStatusResponse>, tonic::Status> {
        let request = request.into_inner();
        let mut answer = proto::ReplicaStatusResponse {
            replica: request.target,
            channels: vec![proto::ChannelSummary {
                channel: "web".into(),
                synced: 1,
                ..Default::default()
            }],
            subscribers: vec![proto::SubscriberStatus {
                subscriber_id: "ghost".into(),
                channel: "web".into(),
                state: "SYNCED".into(),
                ..Default::default()
            }],
            cursors: vec!["0:ghost".into()],
            subscriber_count: 1,
            request_signature: request.signature,
            ..Default::default()
        };
        if let Some(key) = &self.key {
            safemode_wire::signed::sign(&mut answer, key);
        }
        Ok(tonic::Response::new(answer))
    }

    /// Claims a flood of failed logins, to raise a proposal or skew the
    /// insights.
    async fn replica_reports(
        &self,
        request: tonic::Request<proto::ReplicaReportsRequest>,
    ) -> Result<tonic::Response<proto::ReplicaReportsResponse>, tonic::Status> {
        let request = request.into_inner();
        let mut answer = proto::ReplicaReportsResponse {
            replica: request.target,
            signals: vec![proto::SignalTally {
                channel: "web".into(),
                name: "login.failed".into(),
                count: 100_000,
            }],
            request_signature: request.signature,
            ..Default::default()
        };
        if let Some(key) = &self.key {
            safemode_wire::signed::sign(&mut answer, key);
        }
        Ok(tonic::Response::new(answer))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_fleet_record_shows_nothing_it_says() {
    let etcd = EtcdCluster::start(1).await;
    let endpoints = etcd.endpoints().join(",");
    let store = etcd.store().await;
    let solo = replica("r-solo", &endpoints);
    for (name, key) in [
        ("r-unsigned", None),
        (
            "r-stranger",
            Some(safemode_signing::SigningKey::generate().0),
        ),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(proto::fleet_service_server::FleetServiceServer::new(
                    RogueReplica { key },
                ))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .expect("the rogue serves");
        });
        // Written straight to etcd, as someone with the store's credentials
        // could.
        let record = serde_json::json!({
            "replica": name,
            "address": address,
            "tls": false,
            "started_at": "2026-01-01T00:00:00Z",
            "version": "0.1.0",
        });
        store
            .txn(safemode_store::Txn {
                compares: vec![],
                ops: vec![safemode_store::Op::Put {
                    key: format!("/safemode/replicas/{name}"),
                    value: serde_json::to_vec(&record).unwrap(),
                }],
            })
            .await
            .unwrap();
    }
    // A copy of the real replica's record under another key: its
    // subscribers must not count twice.
    let copied = wait_for("r-solo's record", || async {
        store
            .range("/safemode/replicas/r-solo")
            .await
            .ok()
            .filter(|r| !r.kvs.is_empty())
    })
    .await;
    store
        .txn(safemode_store::Txn {
            compares: vec![],
            ops: vec![safemode_store::Op::Put {
                key: "/safemode/replicas/r-copy".into(),
                value: copied.kvs[0].value.clone(),
            }],
        })
        .await
        .unwrap();
    let _subscriber = RawSubscriber::connect(channel(&solo.url).await, "live", "web", "w-1", 0)
        .await
        .unwrap();
    let status = wait_for("the subscriber in the status", || async {
        let status = status_json(&solo.url, &[]).await;
        (status["subscriber_count"] != 0).then_some(status)
    })
    .await;
    assert_eq!(
        subscribers(&status),
        rows(&[("w-1", "r-solo", "SYNCED")]),
        "{status}"
    );
    assert_eq!(status["subscriber_count"], 1, "{status}");
    assert_eq!(status["partial"], true, "{status}");
    for (name, why) in [
        ("r-stranger", "its answer is not signed by this fleet's key"),
        ("r-unsigned", "its answer is not signed by this fleet's key"),
    ] {
        let answer = status["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["replica"] == name)
            .unwrap_or_else(|| panic!("{name} in {status}"));
        assert_eq!(answer["answered"], false, "{answer}");
        assert!(
            answer["error"].as_str().unwrap().starts_with(why),
            "{answer}"
        );
    }

    // Nor does a rogue's claim of a flood of failed logins count.
    let insights = on(&solo.url, &["insights", "--output", "json"]).await;
    assert!(
        insights.status.success(),
        "{}",
        String::from_utf8_lossy(&insights.stderr)
    );
    let insights: Value = serde_json::from_slice(&insights.stdout).unwrap();
    assert_eq!(insights["signals"], serde_json::json!([]), "{insights}");
    assert_eq!(insights["partial"], true, "{insights}");
    for name in ["r-stranger", "r-unsigned"] {
        let answer = insights["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["replica"] == name)
            .unwrap_or_else(|| panic!("{name} in {insights}"));
        assert_eq!(answer["answered"], false, "{answer}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .starts_with("its answer is not signed by this fleet's key"),
            "{answer}"
        );
    }

    // The copy (a record not where its name puts it) is not asked at all.
    assert!(
        status["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["replica"] == "r-solo")
            .count()
            == 1,
        "{status}"
    );

    // More records than a status asks (73 sound ones: the copy is not one):
    // the rest are named, and the answer is partial.
    let ops = (0..70)
        .map(|i| safemode_store::Op::Put {
            key: format!("/safemode/replicas/a-flood-{i:02}"),
            value: serde_json::to_vec(&serde_json::json!({
                "replica": format!("a-flood-{i:02}"),
                "address": format!("127.0.0.1:{}", 1 + i),
                "tls": false,
                "started_at": "2026-01-01T00:00:00Z",
                "version": "0.1.0",
            }))
            .unwrap(),
        })
        .collect();
    store
        .txn(safemode_store::Txn {
            compares: vec![],
            ops,
        })
        .await
        .unwrap();
    let status = status_json(&solo.url, &[]).await;
    assert_eq!(status["partial"], true, "{status}");
    assert!(
        status["problems"].as_array().unwrap().iter().any(|p| p
            .as_str()
            .unwrap()
            .starts_with("the store holds 9 more replica records than the 64 a status asks")),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_nobody_is_not_synced() {
    let server = crate::support::TestServer::start().await;
    for (args, says) in [
        (
            &["status", "--wait-synced", "--timeout", "1s"][..],
            "error: not synced after 1s: no subscriber is connected to any replica in namespace live: nothing has applied revision 0\n",
        ),
        (
            &[
                "status",
                "--channel",
                "ivr",
                "--wait-synced",
                "--timeout",
                "1s",
            ][..],
            "error: not synced after 1s: no subscriber of channel ivr is connected to any replica in namespace live: nothing has applied revision 0\n",
        ),
    ] {
        let output = on(&server.url, args).await;
        assert_eq!(output.status.code(), Some(1), "{args:?}: {output:?}");
        assert_eq!(String::from_utf8_lossy(&output.stderr), says, "{args:?}");
    }
}

/// POSTs `body` to etcd's JSON gateway at `endpoint` (`http://HOST:PORT`)
/// and answers the JSON it returns.
fn etcd_gateway(endpoint: &str, path: &str, body: &Value) -> Value {
    use std::io::{Read, Write};
    let host = endpoint.strip_prefix("http://").expect("an http endpoint");
    let body = body.to_string();
    let mut stream = std::net::TcpStream::connect(host).expect("etcd listens");
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, mut rest) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    let mut json = String::new();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        while let Some((size, after)) = rest.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            json.push_str(&after[..size]);
            rest = &after[size + 2..];
        }
    } else {
        json.push_str(rest);
    }
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_keeps_its_record_alive_past_its_lease() {
    use base64::Engine as _;
    let etcd = EtcdCluster::start(1).await;
    let endpoint = etcd.endpoints()[0].clone();
    let key = test_signing_key_file().display().to_string();
    let _replica = ServeProcess::start(
        &[
            "--store",
            "etcd",
            "--etcd-endpoints",
            &endpoint,
            "--signing-key",
            &key,
            "--replica",
            "r-renewing",
            "--replica-ttl",
            "6s",
        ],
        &[],
    );
    let record_key =
        base64::engine::general_purpose::STANDARD.encode("/safemode/replicas/r-renewing");
    let record = || {
        etcd_gateway(
            &endpoint,
            "/v3/kv/range",
            &serde_json::json!({"key": record_key}),
        )
    };
    let first = wait_for("the replica's record", || async {
        record()["kvs"]
            .as_array()
            .and_then(|kvs| kvs.first().cloned())
    })
    .await;
    let lease = first["lease"]
        .as_str()
        .expect("the record has a lease")
        .to_string();
    // Alive after twice its time to live (as long as that takes): renewed.
    // A replica that stopped renewing would lose it after 6 s.
    let seen = std::time::Instant::now();
    wait_until("the record's lease outlives two of its lifetimes", || {
        let left = etcd_gateway(
            &endpoint,
            "/v3/lease/timetolive",
            &serde_json::json!({"ID": lease}),
        )["TTL"]
            .as_str()
            .and_then(|t| t.parse::<i64>().ok())
            .unwrap_or(-1);
        assert!(
            left > 0,
            "the record's lease lapsed after {:?}: the replica did not renew it",
            seen.elapsed()
        );
        let done = seen.elapsed() > std::time::Duration::from_secs(12);
        async move { done }
    })
    .await;
    // The same record all along: never lapsed and written again.
    let now = record()["kvs"][0].clone();
    assert_eq!(now["create_revision"], first["create_revision"], "{now}");
    assert_eq!(now["lease"], first["lease"], "{now}");
}
