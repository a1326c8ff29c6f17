//! Issue 14: the web console's API is the gRPC control service transcoded
//! (`POST /api/v1/<Method>`, protobuf JSON), so its refusals are the gRPC
//! ones; its page is served with a strict Content-Security-Policy and sets
//! no HTML from data; its event stream says when the namespace changed.
//! The browser test drives `tests/console/console_browser.py` (Selenium,
//! headless Chromium) against a real controller with tokens and simulated
//! subscribers; issue 15's Insights and Proposals views among it, against a
//! server whose channels decided and reported and signals sent with the
//! real CLI.

use std::net::SocketAddr;
use std::time::Duration;

use safemode_grpc::console::{ASSETS, CONTENT_SECURITY_POLICY};
use safemode_grpc::limits::MAX_CONTROL_REQUEST_BYTES;
use safemode_grpc::server::ServeConfig;
use safemode_wire::proto;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::support::{Principals, TestServer};

/// An HTTP answer: status, headers (lower-case names), body.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request (`connection: close`), its answer read whole.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    exchange(stream, addr, method, path, headers, body).await
}

/// [`request`] on a connection already open (TLS, say).
async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{}\r\nconnection: close\r\ncontent-length: {}\r\n",
        addr.port(),
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    // The server may answer (413) before reading all of a large body.
    let _ = stream.write_all(body).await;
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let raw = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer head in {raw:?}"));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

/// `POST /api/v1/<method>` with a JSON body, as `token` (none: no header).
pub async fn api(addr: SocketAddr, method: &str, token: Option<&str>, body: &Value) -> Answer {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer));
    }
    request(
        addr,
        "POST",
        &format!("/api/v1/{method}"),
        &headers,
        body.to_string().as_bytes(),
    )
    .await
}

/// What a refused call must leave as it was: live's revision, the audit
/// log's length, every request of live with its state.
async fn observed(http: SocketAddr, admin: &str) -> (String, usize, Value) {
    let status = api(http, "GetStatus", Some(admin), &json!({})).await.json();
    let audit = api(http, "GetAudit", Some(admin), &json!({})).await.json();
    let requests = api(
        http,
        "ListRequests",
        Some(admin),
        &json!({"includeDecided": true}),
    )
    .await
    .json();
    (
        status["revision"].as_str().unwrap().to_string(),
        audit["entries"].as_array().unwrap().len(),
        requests["requests"].clone(),
    )
}

async fn console_server(principals: &Principals) -> (TestServer, SocketAddr) {
    let server = TestServer::with_tokens_and(principals, |config: &mut ServeConfig| {
        config.http_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let http = server.http_addr().expect("an HTTP listener");
    (server, http)
}

/// A refusal: the HTTP status, the code, and words its message holds.
struct Refusal {
    what: &'static str,
    method: &'static str,
    path: &'static str,
    token: Option<&'static str>,
    content_type: &'static str,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
    says: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_as_the_grpc_api_does() {
    let principals = Principals::new();
    let (server, http) = console_server(&principals).await;
    let apply = json!({"modes": ["bots-faq-only"], "reason": "wave"})
        .to_string()
        .into_bytes();
    let cases = [
        Refusal {
            what: "no token",
            method: "POST",
            path: "/api/v1/GetStatus",
            token: None,
            content_type: "application/json",
            body: b"{}".to_vec(),
            status: 401,
            code: "unauthenticated",
            says: "a bearer token is required",
        },
        Refusal {
            what: "no token, and a body that is not the request: the token first",
            method: "POST",
            path: "/api/v1/ApplyModes",
            token: None,
            content_type: "application/json",
            body: br#"{"force": true}"#.to_vec(),
            status: 401,
            code: "unauthenticated",
            says: "a bearer token is required",
        },
        Refusal {
            what: "an unknown token",
            method: "POST",
            path: "/api/v1/GetStatus",
            token: Some("not-a-token"),
            content_type: "application/json",
            body: b"{}".to_vec(),
            status: 401,
            code: "unauthenticated",
            says: "unknown token",
        },
        Refusal {
            what: "a viewer applies a mode",
            method: "POST",
            path: "/api/v1/ApplyModes",
            token: Some("viewer"),
            content_type: "application/json",
            body: apply.clone(),
            status: 403,
            code: "permission_denied",
            says: "viewer (roles: viewer) may not change modes or incidents in namespace live",
        },
        Refusal {
            what: "an approver declares",
            method: "POST",
            path: "/api/v1/DeclareIncident",
            token: Some("approver"),
            content_type: "application/json",
            body: json!({"type": "credential-stuffing", "severity": "sev3", "reason": "x"})
                .to_string()
                .into_bytes(),
            status: 403,
            code: "permission_denied",
            says: "may not change modes or incidents",
        },
        Refusal {
            what: "malformed JSON",
            method: "POST",
            path: "/api/v1/GetStatus",
            token: Some("viewer"),
            content_type: "application/json",
            body: br#"{"namespace": "#.to_vec(),
            status: 400,
            code: "invalid_json",
            says: "the body is not a GetStatusRequest: it is not JSON (EOF while parsing",
        },
        Refusal {
            what: "a field of the wrong type",
            method: "POST",
            path: "/api/v1/GetStatus",
            token: Some("viewer"),
            content_type: "application/json",
            body: br#"{"pageSize": "many"}"#.to_vec(),
            status: 400,
            code: "invalid_json",
            says: "the body is not a GetStatusRequest: pageSize: ",
        },
        Refusal {
            what: "an unknown field",
            method: "POST",
            path: "/api/v1/ApplyModes",
            token: Some("commander"),
            content_type: "application/json",
            body: br#"{"modes": ["bots-faq-only"], "reason": "x", "force": true}"#.to_vec(),
            status: 400,
            code: "invalid_json",
            says: "unknown field force; its fields are namespace, modes, channels, reason",
        },
        Refusal {
            what: "a blank reason (the gRPC validation)",
            method: "POST",
            path: "/api/v1/ApplyModes",
            token: Some("commander"),
            content_type: "application/json",
            body: br#"{"modes": ["bots-faq-only"], "reason": " "}"#.to_vec(),
            status: 400,
            code: "invalid_argument",
            says: "reason",
        },
        Refusal {
            what: "an unknown mode",
            method: "POST",
            path: "/api/v1/ApplyModes",
            token: Some("commander"),
            content_type: "application/json",
            body: br#"{"modes": ["no-such-mode"], "reason": "x"}"#.to_vec(),
            status: 404,
            code: "not_found",
            says: "no-such-mode",
        },
        Refusal {
            what: "GET on a method",
            method: "GET",
            path: "/api/v1/ApplyModes",
            token: Some("commander"),
            content_type: "application/json",
            body: Vec::new(),
            status: 405,
            code: "method_not_allowed",
            says: "nothing changes state on GET",
        },
        Refusal {
            what: "no such method",
            method: "POST",
            path: "/api/v1/DropEverything",
            token: Some("admin"),
            content_type: "application/json",
            body: b"{}".to_vec(),
            status: 404,
            code: "not_found",
            says: "no method DropEverything",
        },
        Refusal {
            what: "not JSON (a cross-site form)",
            method: "POST",
            path: "/api/v1/ApplyModes",
            token: Some("commander"),
            content_type: "application/x-www-form-urlencoded",
            body: b"modes=bots-faq-only&reason=x".to_vec(),
            status: 415,
            code: "unsupported_media_type",
            says: "Content-Type: application/json",
        },
        Refusal {
            what: "a body over the limit",
            method: "POST",
            path: "/api/v1/ApplyModes",
            token: Some("commander"),
            content_type: "application/json",
            body: vec![b' '; MAX_CONTROL_REQUEST_BYTES + 1],
            status: 413,
            code: "too_large",
            says: "the request is over 256 KiB",
        },
        Refusal {
            what: "a decision for a channel that does not exist",
            method: "POST",
            path: "/api/v1/Decide",
            token: Some("viewer"),
            content_type: "application/json",
            body: br#"{"channel": "fax", "action": "account.password_reset"}"#.to_vec(),
            status: 400,
            code: "invalid_argument",
            says: "channel: ",
        },
        Refusal {
            what: "a decision with a confidence over 1",
            method: "POST",
            path: "/api/v1/Decide",
            token: Some("viewer"),
            content_type: "application/json",
            body: br#"{"channel": "web", "action": "account.password_reset", "confidence": 2}"#
                .to_vec(),
            status: 400,
            code: "invalid_argument",
            says: "confidence: 2 is outside 0 to 1",
        },
        Refusal {
            what: "a subscriber previews a decision",
            method: "POST",
            path: "/api/v1/Decide",
            token: Some("subscriber"),
            content_type: "application/json",
            body: br#"{"channel": "web", "action": "account.password_reset"}"#.to_vec(),
            status: 403,
            code: "permission_denied",
            says: "may not read status",
        },
    ];
    let admin = principals.token("admin");
    let before = observed(http, admin).await;
    for case in cases {
        let bearer = case.token.map(|t| {
            let token = if t == "not-a-token" {
                t
            } else {
                principals.token(t)
            };
            format!("Bearer {token}")
        });
        let mut headers = vec![("content-type", case.content_type)];
        if let Some(bearer) = &bearer {
            headers.push(("authorization", bearer));
        }
        let answer = request(http, case.method, case.path, &headers, &case.body).await;
        assert_eq!(answer.status, case.status, "{}: {}", case.what, answer.body);
        {
            let body = answer.json();
            assert_eq!(body["code"], case.code, "{}: {}", case.what, answer.body);
            let message = body["message"].as_str().unwrap();
            assert!(
                message.contains(case.says),
                "{}: {message:?} does not say {:?}",
                case.what,
                case.says
            );
            assert!(
                !message.contains('\n'),
                "{}: one line: {message:?}",
                case.what
            );
        }
        assert!(
            answer.header("content-security-policy").is_some(),
            "{}: every console answer has the CSP",
            case.what
        );
    }
    // Nothing changed; the refused writes were audited as gRPC refusals
    // are (the viewer's apply and the approver's declare).
    let after = observed(http, admin).await;
    drop(server);
    assert_eq!(before.0, after.0, "the revision did not move");
    assert_eq!(before.2, after.2, "no request changed");
    assert_eq!(after.1, before.1 + 2, "the two refused writes were audited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_as_the_grpc_api_does() {
    let principals = Principals::new();
    let (server, http) = console_server(&principals).await;

    // WhoAmI: the one permission table, per namespace.
    let who = |name: &'static str| {
        let token = principals.token(name).to_string();
        async move {
            let answer = api(
                http,
                "WhoAmI",
                Some(&token),
                &json!({"namespaces": ["live", "drill-x"]}),
            )
            .await;
            assert_eq!(answer.status, 200, "{}", answer.body);
            answer.json()
        }
    };
    let viewer = who("viewer").await;
    assert_eq!(viewer["principal"], "viewer");
    assert_eq!(viewer["roles"], json!(["viewer"]));
    assert_eq!(viewer["tokens"], true);
    assert_eq!(
        viewer["permissions"][0],
        json!({"namespace": "live", "read": true, "readAudit": true, "change": false, "approve": false})
    );
    let commander = who("commander").await;
    assert_eq!(commander["permissions"][0]["change"], true);
    assert_eq!(commander["permissions"][0]["approve"], false);
    let approver = who("approver").await;
    assert_eq!(approver["permissions"][0]["approve"], true);
    assert_eq!(approver["permissions"][0]["change"], false);
    let drill = who("drill").await;
    assert_eq!(
        drill["permissions"],
        json!([
            {"namespace": "live", "read": false, "readAudit": false, "change": false, "approve": false},
            {"namespace": "drill-x", "read": true, "readAudit": false, "change": true, "approve": true}
        ])
    );

    // A dry run answers its preview and changes nothing.
    let commander = principals.token("commander");
    let preview = api(
        http,
        "ApplyModes",
        Some(commander),
        &json!({"modes": ["bots-faq-only"], "channels": ["chatbot"], "reason": "preview", "dryRun": true}),
    )
    .await;
    assert_eq!(preview.status, 200, "{}", preview.body);
    let preview = preview.json();
    assert!(
        preview["preview"]["summary"]
            .as_str()
            .unwrap()
            .contains("bots-faq-only"),
        "{preview}"
    );
    let status = api(http, "GetStatus", Some(commander), &json!({}))
        .await
        .json();
    assert_eq!(
        status["activations"],
        json!([]),
        "the dry run changed nothing"
    );

    // The change itself, then the status, as protobuf JSON.
    let applied = api(
        http,
        "ApplyModes",
        Some(commander),
        &json!({"modes": ["bots-faq-only"], "channels": ["chatbot"], "reason": "<b>wave</b>"}),
    )
    .await;
    assert_eq!(applied.status, 200, "{}", applied.body);
    assert!(
        applied.header("x-safemode-replica").is_some(),
        "the answer names its replica"
    );
    let revision = applied.json()["revision"].as_str().unwrap().to_string();
    let status = api(
        http,
        "GetStatus",
        Some(principals.token("viewer")),
        &json!({}),
    )
    .await
    .json();
    assert_eq!(
        status["revision"], revision,
        "int64 as protobuf JSON strings"
    );
    assert_eq!(status["activations"][0]["mode"], "bots-faq-only");
    assert_eq!(status["activations"][0]["reason"], "<b>wave</b>");
    assert_eq!(status["activations"][0]["principal"], "commander");

    // Decide: the chatbot denies account changes now, the web allows them.
    let viewer = principals.token("viewer").to_string();
    let decide = |channel: &'static str| {
        let viewer = viewer.clone();
        async move {
            api(
                http,
                "Decide",
                Some(&viewer),
                &json!({"channel": channel, "action": "account.password_reset"}),
            )
            .await
            .json()
        }
    };
    let chatbot = decide("chatbot").await;
    assert_eq!(chatbot["effect"], "deny", "{chatbot}");
    assert_eq!(chatbot["revision"], revision);
    assert_eq!(chatbot["reasons"].as_array().unwrap().len(), 1, "{chatbot}");
    assert_eq!(decide("web").await["effect"], "allow");
    // The same answer as the gRPC call.
    let mut control = crate::support::control_as(&server, Some(principals.token("viewer"))).await;
    let grpc = control
        .decide(proto::DecideRequest {
            channel: "chatbot".into(),
            action: "account.password_reset".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grpc.effect, "deny");
    assert_eq!(grpc.detail, chatbot["detail"].as_str().unwrap());
    assert_eq!(
        grpc.customer_message,
        chatbot["customerMessage"].as_str().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_served_with_a_strict_policy_and_sets_no_html_from_data() {
    let principals = Principals::new();
    let (_server, http) = console_server(&principals).await;
    for (path, content_type, body) in ASSETS {
        let answer = request(http, "GET", path, &[], b"").await;
        assert_eq!(answer.status, 200, "{path}");
        assert_eq!(answer.header("content-type"), Some(content_type), "{path}");
        assert_eq!(
            answer.header("content-security-policy"),
            Some(CONTENT_SECURITY_POLICY),
            "{path}"
        );
        assert_eq!(answer.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(answer.header("referrer-policy"), Some("no-referrer"));
        assert_eq!(answer.header("x-frame-options"), Some("DENY"));
        assert!(answer.header("cache-control").is_some(), "{path}");
        assert_eq!(answer.body, body, "{path}: the embedded asset");
    }
    for needed in [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(CONTENT_SECURITY_POLICY.contains(needed), "{needed}");
    }
    assert!(!CONTENT_SECURITY_POLICY.contains("unsafe"));

    // No HTML from data: the script never parses strings as HTML or code.
    let js = ASSETS[2].2;
    for banned in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        "setTimeout(\"",
        "localStorage",
        "document.cookie",
    ] {
        assert!(!js.contains(banned), "console.js uses {banned}");
    }
    assert!(js.contains("textContent"), "text is set as text");
    // No inline script or style in the page (the CSP would block them).
    let html = ASSETS[0].2;
    assert!(!html.contains(" style="), "inline style in index.html");
    assert!(!html.contains("<style"), "inline style in index.html");
    let inline_handler = html.match_indices(" on").any(|(at, _)| {
        let rest = &html[at + 3..];
        let name_len = rest.bytes().take_while(u8::is_ascii_lowercase).count();
        name_len > 0 && rest[name_len..].starts_with('=')
    });
    assert!(!inline_handler, "an inline event handler in index.html");
    // The page's lists are the server's.
    for name in safemode_policy::names::CHANNELS
        .iter()
        .chain(&safemode_policy::names::ACTIONS)
        .chain(&safemode_policy::names::METHODS)
    {
        assert!(
            js.contains(&format!("\"{name}\"")),
            "console.js lacks {name}"
        );
    }
    for script in html.split("<script").skip(1) {
        assert!(
            script.trim_start().starts_with("type=\"module\" src=")
                || script.trim_start().starts_with("src="),
            "inline script in index.html: <script{}",
            &script[..script.len().min(40)]
        );
    }
    // State never changes on GET: GET on the API answers 405.
    let answer = request(http, "GET", "/api/v1/ResolveIncident", &[], b"").await;
    assert_eq!(answer.status, 405);
}

/// Reads an event stream until `event: NAME`, with a deadline.
async fn next_event(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::TcpStream>>,
    name: &str,
) -> String {
    let wanted = format!("event: {name}");
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("the stream ended before {wanted}"));
            if line.trim_end() == wanted {
                return lines.next_line().await.unwrap().unwrap();
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {wanted} within 10s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_says_when_the_namespace_changes() {
    let principals = Principals::new();
    let (server, http) = console_server(&principals).await;

    // Refused as a GetStatus would be.
    let refused = request(http, "GET", "/api/v1/events?namespace=live", &[], b"").await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    let bearer = format!("Bearer {}", principals.token("subscriber"));
    let refused = request(
        http,
        "GET",
        "/api/v1/events?namespace=live",
        &[("authorization", &bearer)],
        b"",
    )
    .await;
    assert_eq!(refused.status, 403, "{}", refused.body);

    let mut stream = tokio::net::TcpStream::connect(http).await.unwrap();
    let bearer = format!("Bearer {}", principals.token("viewer"));
    stream
        .write_all(
            format!(
                "GET /api/v1/events?namespace=live HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: {bearer}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut lines = BufReader::new(stream).lines();
    let status = lines.next_line().await.unwrap().unwrap();
    assert!(status.contains(" 200 "), "{status}");
    let hello = next_event(&mut lines, "hello").await;
    assert_eq!(hello, r#"data: {"revision":"0"}"#);
    let mut control =
        crate::support::control_as(&server, Some(principals.token("commander"))).await;
    let revision = control
        .apply_modes(proto::ApplyModesRequest {
            modes: vec!["incident-notice".into()],
            reason: "from the CLI's API".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revision;
    // (The fleet's first gather may be said before it.)
    let mut gathers_said = 0;
    let change = loop {
        let change = next_event(&mut lines, "change").await;
        if !change.contains(r#""what":"fleet""#) {
            break change;
        }
        gathers_said += 1;
    };
    assert_eq!(
        change,
        format!(r#"data: {{"revision":"{revision}","what":"namespace"}}"#)
    );
    // The fleet's propagation, gathered apart: its first gather is said
    // (the page may have read before a change), then a subscriber that
    // connects and acks is a change of it.
    let fleet_change = async |lines: &mut tokio::io::Lines<BufReader<tokio::net::TcpStream>>| {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let data = next_event(lines, "change").await;
                if data.contains(r#""what":"fleet""#) {
                    return data;
                }
            }
        })
        .await
        .expect("the fleet's change is said")
    };
    if gathers_said == 0 {
        fleet_change(&mut lines).await;
    }
    let mut config = server.subscriber_config("web", "web-sim");
    config.token = Some(principals.token("subscriber").to_string());
    let _subscriber = safemode_client::Subscriber::connect(config)
        .await
        .expect("a subscriber connects");
    let fleet = fleet_change(&mut lines).await;
    assert_eq!(
        fleet,
        format!(r#"data: {{"revision":"{revision}","what":"fleet"}}"#)
    );
    // A proposal raised (by a detector here, by a trigger alike) is a
    // change of the namespace: the page's count of open proposals follows.
    let raised = crate::support::control_as(&server, Some(principals.token("detector")))
        .await
        .raise_proposal(proto::RaiseProposalRequest {
            r#type: "fraud-spike".into(),
            severity: "sev3".into(),
            summary: "refunds 5x baseline for 10m".into(),
            reason: "alert refunds-high".into(),
            ..Default::default()
        })
        .await
        .expect("the detector raises a proposal")
        .into_inner();
    assert!(raised.created);
    let change = loop {
        let change = next_event(&mut lines, "change").await;
        if !change.contains(r#""what":"fleet""#) {
            break change;
        }
    };
    assert!(change.contains(r#""what":"namespace""#), "{change}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_refused_on_a_plain_http_listener_that_is_not_loopback() {
    let principals = Principals::new();
    let server = TestServer::with_tokens_and(&principals, |config: &mut ServeConfig| {
        config.http_listen = Some("0.0.0.0:0".parse().unwrap());
    })
    .await;
    let port = server.http_addr().unwrap().port();
    let http = SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(request(http, "GET", "/healthz", &[], b"").await.status, 200);
    for (method, path) in [("GET", "/"), ("POST", "/api/v1/GetStatus")] {
        let answer = request(
            http,
            method,
            path,
            &[("content-type", "application/json")],
            b"{}",
        )
        .await;
        assert_eq!(answer.status, 403, "{path}");
        assert_eq!(answer.json()["code"], "console_not_served");
    }
    drop(server);

    // Said to sit behind a TLS proxy: served.
    let server = TestServer::with_tokens_and(&principals, |config: &mut ServeConfig| {
        config.http_listen = Some("0.0.0.0:0".parse().unwrap());
        config.console_plain_http = true;
    })
    .await;
    let port = server.http_addr().unwrap().port();
    let http = SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(request(http, "GET", "/", &[], b"").await.status, 200);
}

/// The requests of [`every_answer_carries_the_security_headers`]: (method,
/// path, status) of every kind of answer the listener gives.
const EVERY_KIND_OF_ANSWER: [(&str, &str, u16); 14] = [
    ("GET", "/", 200),
    ("GET", "/console.js", 200),
    ("GET", "/favicon.svg", 200),
    ("POST", "/api/v1/WhoAmI", 200),
    ("POST", "/api/v1/GetStatus", 200),
    ("POST", "/api/v1/NoSuchMethod", 404),
    ("GET", "/api/v1/GetStatus", 405),
    ("GET", "/healthz", 200),
    ("GET", "/readyz", 200),
    ("GET", "/metrics", 200),
    ("GET", "/nope", 404),
    ("GET", "/console.js/", 404),
    ("POST", "/api/v1/GetStatus/", 404),
    ("GET", "/api/v1/events/", 404),
];

/// Checks the security headers of every kind of answer, each asked on a
/// connection `connect` opens.
async fn check_security_headers<S, F, Fut>(addr: SocketAddr, token: &str, connect: F)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    let bearer = format!("Bearer {token}");
    let mut problems = Vec::new();
    for (method, path, status) in EVERY_KIND_OF_ANSWER {
        let answer = exchange(
            connect().await,
            addr,
            method,
            path,
            &[
                ("content-type", "application/json"),
                ("authorization", &bearer),
            ],
            if method == "POST" { b"{}" } else { b"" },
        )
        .await;
        if answer.status != status {
            problems.push(format!(
                "{method} {path}: status {} where {status}",
                answer.status
            ));
        }
        let asset = ASSETS.iter().any(|(asset, _, _)| *asset == path);
        for (header, value) in [
            ("content-security-policy", Some(CONTENT_SECURITY_POLICY)),
            ("x-content-type-options", Some("nosniff")),
            ("x-frame-options", Some("DENY")),
            ("referrer-policy", Some("no-referrer")),
            // The page and its assets are revalidated; nothing else is kept.
            (
                "cache-control",
                Some(if asset { "no-cache" } else { "no-store" }),
            ),
        ] {
            if answer.header(header) != value {
                problems.push(format!(
                    "{method} {path}: {header} is {:?} where {value:?}",
                    answer.header(header)
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_the_security_headers() {
    let principals = Principals::new();
    let (server, http) = console_server(&principals).await;
    // Ready first: /readyz answers 200.
    crate::support::wait_until("the replica is ready", || async {
        request(http, "GET", "/readyz", &[], b"").await.status == 200
    })
    .await;
    check_security_headers(http, principals.token("viewer"), || async {
        tokio::net::TcpStream::connect(http).await.unwrap()
    })
    .await;
    drop(server);
}

/// A TLS client that trusts `ca` and offers `alpn`.
fn tls_client(ca: &std::path::Path, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_the_http_listener_speaks_https_with_the_same_certificate() {
    let pki = crate::tls::Pki::new();
    let principals = Principals::new();
    // Not loopback: over HTTPS the console is served anywhere.
    let server = TestServer::with_tokens_and(&principals, |config: &mut ServeConfig| {
        config.http_listen = Some("0.0.0.0:0".parse().unwrap());
        config.tls_cert = Some(pki.path("server.pem"));
        config.tls_key = Some(pki.path("server.key"));
    })
    .await;
    let port = server.http_addr().unwrap().port();
    let https = SocketAddr::from(([127, 0, 0, 1], port));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();

    // ALPN: a browser offering both gets HTTP/2; HTTP/1.1 alone is served.
    for (offered, chosen) in [
        (vec![&b"h2"[..], &b"http/1.1"[..]], &b"h2"[..]),
        (vec![&b"http/1.1"[..]], &b"http/1.1"[..]),
    ] {
        let tcp = tokio::net::TcpStream::connect(https).await.unwrap();
        let tls = tls_client(&pki.path("ca.pem"), &offered)
            .connect(name.clone(), tcp)
            .await
            .expect("the certificate of --tls-cert, which the test CA signed");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(chosen));
    }
    // A client that trusts another CA refuses the listener.
    let tcp = tokio::net::TcpStream::connect(https).await.unwrap();
    assert!(
        tls_client(&pki.path("other-ca.pem"), &[b"http/1.1"])
            .connect(name.clone(), tcp)
            .await
            .is_err()
    );
    // Plain HTTP gets no HTTP answer there.
    let mut plain = tokio::net::TcpStream::connect(https).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), plain.read_to_end(&mut raw)).await;
    assert!(!raw.starts_with(b"HTTP/"), "plain HTTP answered: {raw:?}");

    // Probes, metrics, the page and the API over HTTPS, each answer with
    // the security headers.
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(https).await.unwrap();
        tls_client(&pki.path("ca.pem"), &[b"http/1.1"])
            .connect(name.clone(), tcp)
            .await
            .unwrap()
    };
    crate::support::wait_until("the replica is ready", || async {
        exchange(connect().await, https, "GET", "/readyz", &[], b"")
            .await
            .status
            == 200
    })
    .await;
    check_security_headers(https, principals.token("viewer"), connect).await;
    let who = exchange(
        connect().await,
        https,
        "POST",
        "/api/v1/WhoAmI",
        &[
            ("content-type", "application/json"),
            (
                "authorization",
                &format!("Bearer {}", principals.token("commander")),
            ),
        ],
        b"{}",
    )
    .await;
    assert_eq!(who.status, 200, "{}", who.body);
    assert_eq!(who.json()["principal"], "commander");
    let metrics = exchange(connect().await, https, "GET", "/metrics", &[], b"").await;
    assert!(metrics.body.contains("safemode_"), "{}", metrics.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_callers_name_themselves_on_loopback_names_only() {
    let temp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        store: safemode_grpc::server::StoreConfig::Embedded {
            data_dir: temp.path().to_path_buf(),
        },
        ..ServeConfig::default()
    })
    .await;
    let http = server.http_addr().unwrap();
    let who = request(
        http,
        "POST",
        "/api/v1/WhoAmI",
        &[
            ("content-type", "application/json"),
            ("x-safemode-principal", "alice"),
        ],
        b"{}",
    )
    .await;
    assert_eq!(who.status, 200, "{}", who.body);
    let who = who.json();
    assert_eq!(who["principal"], "alice");
    assert_eq!(who["tokens"], false);
    assert_eq!(who["permissions"][0]["change"], true);

    // A page on another name (DNS rebinding to 127.0.0.1) is refused.
    let mut stream = tokio::net::TcpStream::connect(http).await.unwrap();
    stream
        .write_all(
            b"POST /api/v1/WhoAmI HTTP/1.1\r\nhost: evil.example:80\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
        )
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    assert!(raw.starts_with("HTTP/1.1 403"), "{raw}");
    assert!(raw.contains("host_not_loopback"), "{raw}");

    // A page of another site calling from the visitor's browser (its
    // Sec-Fetch-Site, which pages cannot set) is refused the API; the
    // page's own calls, and a link to the page from elsewhere, are not.
    let principal = [("x-safemode-principal", "alice")];
    for (method, path, site, status) in [
        ("GET", "/api/v1/events?namespace=live", "cross-site", 403),
        ("GET", "/api/v1/events?namespace=live", "same-site", 403),
        ("POST", "/api/v1/WhoAmI", "cross-site", 403),
        ("POST", "/api/v1/WhoAmI", "same-origin", 200),
        ("POST", "/api/v1/WhoAmI", "none", 200),
        ("GET", "/", "cross-site", 200),
    ] {
        let answer = request(
            http,
            method,
            path,
            &[
                ("content-type", "application/json"),
                ("sec-fetch-site", site),
                principal[0],
            ],
            if method == "POST" { b"{}" } else { b"" },
        )
        .await;
        assert_eq!(
            answer.status, status,
            "{method} {path} from {site}: {}",
            answer.body
        );
        if status == 403 {
            assert_eq!(answer.json()["code"], "cross_site", "{}", answer.body);
        }
    }
}

/// What the rejecting subscriber of the browser test says, HTML and all.
const REJECT_REASON: &str = "<b>snapshot schema v9 is not understood</b>";

/// A subscriber (with `token`) that rejects every snapshot it receives, with
/// [`REJECT_REASON`]; it stops when the handle is dropped or aborted.
async fn rejecting_subscriber(
    server: &TestServer,
    token: &str,
    channel: &str,
    id: &str,
) -> tokio::task::JoinHandle<()> {
    use safemode_wire::proto::subscribe_request::Message as Outbound;
    use safemode_wire::proto::subscribe_response::Message as Inbound;
    use safemode_wire::proto::subscription_service_client::SubscriptionServiceClient;
    let (out, out_rx) = tokio::sync::mpsc::channel(16);
    out.send(proto::SubscribeRequest {
        message: Some(Outbound::Hello(proto::Hello {
            namespace: "live".into(),
            channel: channel.into(),
            subscriber_id: id.into(),
            last_applied_revision: 0,
            epoch: String::new(),
        })),
    })
    .await
    .unwrap();
    let mut inbound = SubscriptionServiceClient::with_interceptor(
        server.channel().await,
        safemode_client::Bearer::new(Some(token)).unwrap(),
    )
    .subscribe(tokio_stream::wrappers::ReceiverStream::new(out_rx))
    .await
    .expect("the rejecting subscriber subscribes")
    .into_inner();
    tokio::spawn(async move {
        while let Ok(Some(message)) = inbound.message().await {
            if let Some(Inbound::Snapshot(snapshot)) = message.message {
                let reject = proto::SubscribeRequest {
                    message: Some(Outbound::Reject(proto::Reject {
                        revision: snapshot.revision,
                        reason: REJECT_REASON.into(),
                    })),
                };
                if out.send(reject).await.is_err() {
                    return;
                }
            }
        }
    })
}

/// The subscriber id of the insights server's IVR: markup, which the edge
/// takes (any printable id) and the page must show as text.
const HOSTILE_SUBSCRIBER: &str = r#"ivr-<img src=x onerror="window.__xss = true">"#;

/// Decides `action` `n` times for an unverified customer, then reports.
async fn decide_and_report(subscriber: &safemode_client::Subscriber, action: &str, n: usize) {
    let action = safemode_policy::Action::parse(action).unwrap();
    for _ in 0..n {
        subscriber.decide(&action, &safemode_policy::Context::default());
    }
    let receipt = subscriber
        .report_now(Duration::from_secs(10))
        .await
        .expect("the report is answered");
    assert_eq!(receipt, safemode_client::ReportReceipt::Accepted);
}

/// A server for the Insights and Proposals views: step-up for account
/// changes on every channel but the agent desk (the easiest path), and
/// channels deciding and reporting, among them an IVR (id
/// [`HOSTILE_SUBSCRIBER`]) that rejects every policy with an activation and
/// so keeps deciding on the revision it had.
async fn insights_server(
    principals: &Principals,
) -> (TestServer, SocketAddr, Vec<safemode_client::Subscriber>) {
    let (server, http) = console_server(principals).await;
    let connect = async |channel: &str, id: &str, reject: bool| {
        let mut config = server.subscriber_config(channel, id);
        config.token = Some(principals.token("subscriber").to_string());
        if reject {
            config.check = Some(std::sync::Arc::new(|snapshot| {
                if snapshot.activations.is_empty() {
                    Ok(())
                } else {
                    Err("this IVR cannot ask for a step-up".into())
                }
            }));
        }
        safemode_client::Subscriber::connect(config)
            .await
            .expect("a reporting subscriber connects")
    };
    let web = connect("web", "web-1", false).await;
    let desk = connect("agent-desk", "desk-1", false).await;
    let ivr = connect("ivr", HOSTILE_SUBSCRIBER, true).await;
    let held = ivr.current().expect("a first snapshot").revision;
    let applied = api(
        http,
        "ApplyModes",
        Some(principals.token("commander")),
        &json!({
            "modes": ["step-up-account-changes"],
            "channels": ["chatbot", "ivr", "web", "mobile", "email"],
            "reason": "account takeover wave",
        }),
    )
    .await;
    assert_eq!(applied.status, 200, "{}", applied.body);
    let revision: i64 = applied.json()["revision"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    crate::support::wait_until("web applies the step-up", || async {
        web.current().is_some_and(|s| s.revision == revision)
    })
    .await;
    crate::support::wait_until("the IVR's rejection is in status", || async {
        let mut control =
            crate::support::control_as(&server, Some(principals.token("viewer"))).await;
        safemode_wire::full_status(&mut control, "live")
            .await
            .expect("status")
            .subscribers
            .iter()
            .any(|s| s.subscriber_id == HOSTILE_SUBSCRIBER && s.state == "REJECTED")
    })
    .await;
    assert_eq!(ivr.current().unwrap().revision, held);
    decide_and_report(&web, "account.email_change", 40).await;
    decide_and_report(&desk, "account.email_change", 25).await;
    decide_and_report(&ivr, "account.email_change", 5).await;
    // And a report of the IVR's that comes too soon: refused, and counted
    // against its id.
    ivr.decide(
        &safemode_policy::Action::parse("account.email_change").unwrap(),
        &safemode_policy::Context::default(),
    );
    match ivr.report_now(Duration::from_secs(10)).await {
        Ok(safemode_client::ReportReceipt::TooSoon { reason, .. })
            if reason.starts_with("too soon") => {}
        other => panic!("the IVR's second report is refused as too soon: {other:?}"),
    }
    (server, http, vec![web, desk, ivr])
}

/// Fails, saying how to install it, when the browser test cannot run.
fn browser_test_tools() -> String {
    let python = std::env::var("SAFEMODE_PYTHON").unwrap_or_else(|_| "python3".into());
    let missing: Vec<&str> = ["/usr/bin/chromium", "/usr/bin/chromedriver"]
        .into_iter()
        .filter(|path| !std::path::Path::new(path).exists())
        .collect();
    assert!(
        missing.is_empty(),
        "the browser test needs {missing:?}: apt-get install chromium chromium-driver (scripts/test installs them)"
    );
    let selenium = std::process::Command::new(&python)
        .args(["-c", "import selenium"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        selenium,
        "the browser test needs Selenium for {python}: {python} -m pip install selenium (scripts/test installs it)"
    );
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commanders_approvers_and_viewers_use_the_console_in_a_real_browser() {
    let python = browser_test_tools();
    let principals = Principals::new();
    let (server, http) = console_server(&principals).await;
    // Simulated channel services: real subscribers that apply and ack.
    let subscribers = [
        ("chatbot", 2),
        ("ivr", 1),
        ("agent-desk", 1),
        ("web", 2),
        ("mobile", 1),
        ("email", 1),
    ];
    let mut connected = Vec::new();
    for (channel, count) in subscribers {
        for i in 0..count {
            let mut config = server.subscriber_config(channel, &format!("{channel}-sim-{i}"));
            config.token = Some(principals.token("subscriber").to_string());
            connected.push(
                safemode_client::Subscriber::connect(config)
                    .await
                    .expect("a simulated subscriber connects"),
            );
        }
    }
    // And one that rejects every snapshot.
    let rejecting = rejecting_subscriber(
        &server,
        principals.token("subscriber"),
        "email",
        "email-rejecting",
    )
    .await;
    let screenshots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("console-screenshots");
    std::fs::create_dir_all(&screenshots).unwrap();
    let cli_apply = json!([
        env!("CARGO_BIN_EXE_safemode"),
        "--server",
        server.url,
        "--token",
        principals.token("commander"),
        "mode",
        "apply",
        "incident-notice",
        "--reason",
        "status page says we are investigating",
    ]);
    // And a server without a tokens file, where people give their name.
    let open_data = tempfile::tempdir().unwrap();
    let open_server = TestServer::start_with(ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        store: safemode_grpc::server::StoreConfig::Embedded {
            data_dir: open_data.path().to_path_buf(),
        },
        ..ServeConfig::default()
    })
    .await;
    // And a server with TLS: its --http-listen speaks HTTPS (HTTP/2 by
    // ALPN), off loopback. Chromium trusts its certificate's key alone
    // (--ignore-certificate-errors-spki-list): every other certificate is
    // still checked as usual.
    let pki = crate::tls::Pki::new();
    let tls_data = tempfile::tempdir().unwrap();
    let tls_server = TestServer::start_with(ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: Some("0.0.0.0:0".parse().unwrap()),
        store: safemode_grpc::server::StoreConfig::Embedded {
            data_dir: tls_data.path().to_path_buf(),
        },
        tokens: Some(principals.file.path().to_path_buf()),
        tls_cert: Some(pki.path("server.pem")),
        tls_key: Some(pki.path("server.key")),
        ..ServeConfig::default()
    })
    .await;
    // And one with TLS and no tokens file (on loopback): over HTTP/2 the
    // page's host is the request's authority, not a Host header.
    let open_tls_data = tempfile::tempdir().unwrap();
    let open_tls_server = TestServer::start_with(ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        store: safemode_grpc::server::StoreConfig::Embedded {
            data_dir: open_tls_data.path().to_path_buf(),
        },
        tls_cert: Some(pki.path("server.pem")),
        tls_key: Some(pki.path("server.key")),
        ..ServeConfig::default()
    })
    .await;
    // And a server on etcd, whose store the test stalls (SIGSTOP).
    let etcd = crate::etcd::EtcdCluster::start(1).await;
    let stalled_server = TestServer::start_with(ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        signing_key: safemode_grpc::server::SigningKeySource::Key(
            crate::support::test_signing_key(),
        ),
        store: safemode_grpc::server::StoreConfig::Etcd {
            endpoints: etcd.endpoints(),
            prefix: "/safemode/".into(),
            tls: Default::default(),
        },
        tokens: Some(principals.file.path().to_path_buf()),
        ..ServeConfig::default()
    })
    .await;
    // And two replicas, one of which never answers: a partial insights.
    let silent = SilentFleet::start(&principals).await;
    // And the server of the Insights and Proposals views.
    let (insights, insights_http, _reporting) = insights_server(&principals).await;
    let insights_cli = |token: &str, args: &[&str]| {
        let mut all = vec![
            env!("CARGO_BIN_EXE_safemode"),
            "--server",
            insights.url.as_str(),
            "--token",
        ];
        all.push(token);
        all.extend_from_slice(args);
        json!(all)
    };
    // Signals through the real CLI's short-lived subscriber: above the
    // shipped credential-stuffing runbook's trigger (login.failed above 200
    // within 5m).
    let cli_signal = insights_cli(
        principals.token("subscriber"),
        &[
            "signal",
            "login.failed",
            "--count",
            "250",
            "--channel",
            "ivr",
        ],
    );
    let cli_incident = insights_cli(
        principals.token("viewer"),
        &[
            "--output",
            "json",
            "incident",
            "show",
            "credential-stuffing",
        ],
    );
    let spki = {
        use base64::Engine as _;
        use sha2::Digest as _;
        let der = std::fs::read(pki.path("server.spki.der")).unwrap();
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(der))
    };
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/console/console_browser.py"
    );
    let mut command = tokio::process::Command::new(&python);
    command
        .arg(script)
        .env("CONSOLE_URL", format!("http://{http}/"))
        .env("COMMANDER_TOKEN", principals.token("commander"))
        .env("APPROVER_TOKEN", principals.token("approver"))
        .env("VIEWER_TOKEN", principals.token("viewer"))
        .env(
            "SUBSCRIBERS",
            subscribers
                .iter()
                .map(|(channel, count)| format!("{channel}={count}"))
                .collect::<Vec<_>>()
                .join(","),
        )
        .env("CLI_APPLY", cli_apply.to_string())
        .env("REJECTING", "email=1")
        .env("REJECT_REASON", REJECT_REASON)
        .env(
            "SAFEMODE_TRUSTED_KEYS",
            crate::support::key_file_for(&["--server", &server.url]),
        )
        .env_remove("SAFEMODE_SERVER")
        .env("SCREENSHOTS", &screenshots)
        .env(
            "OPEN_CONSOLE_URL",
            format!("http://{}/", open_server.http_addr().unwrap()),
        )
        .env(
            "TLS_CONSOLE_URL",
            format!(
                "https://127.0.0.1:{}/",
                tls_server.http_addr().unwrap().port()
            ),
        )
        .env("TLS_SPKI", &spki)
        .env(
            "OPEN_TLS_CONSOLE_URL",
            format!(
                "https://127.0.0.1:{}/",
                open_tls_server.http_addr().unwrap().port()
            ),
        )
        .env(
            "STALL_CONSOLE_URL",
            format!("http://{}/", stalled_server.http_addr().unwrap()),
        )
        .env("ETCD_PID", etcd.pid(0).unwrap().to_string())
        .env("INSIGHTS_CONSOLE_URL", format!("http://{insights_http}/"))
        .env("HOSTILE_SUBSCRIBER", HOSTILE_SUBSCRIBER)
        .env("CLI_SIGNAL", cli_signal.to_string())
        .env("CLI_INCIDENT", cli_incident.to_string())
        .env(
            "INSIGHTS_TRUSTED_KEYS",
            crate::support::key_file_for(&["--server", &insights.url]),
        )
        .env("DETECTOR_TOKEN", principals.token("detector"))
        .env(
            "SILENT_CONSOLE_URL",
            format!("http://{}/", silent.a.http_addr().unwrap()),
        )
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(300), command.output())
        .await
        .expect("the browser test ends within 5 minutes")
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    println!("screenshots of the main views: {}", screenshots.display());
    assert!(
        output.status.success(),
        "the browser test failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("every scenario held"), "{stdout}");
    for view in [
        "01-signed-in-nothing-active",
        "02-declared-propagated",
        "03-in-force",
        "04-own-request",
        "05-viewer-audit",
        "06-decision-preview",
        "07-approve-preview",
        "08-approved-nothing-active",
        "09-seven-tabs",
        "10-https",
        "11-not-live",
        "12-insights",
        "13-proposal-badge",
        "14-proposals-viewer",
        "15-accept-preview",
        "16-proposals-closed",
        "17-insights-partial",
    ] {
        assert!(
            screenshots.join(format!("{view}.png")).exists(),
            "no screenshot {view}"
        );
    }
    rejecting.abort();
    drop(connected);
}

#[test]
fn the_json_transcoding_brings_no_second_prost() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock"))
        .expect("Cargo.lock");
    for name in ["prost", "prost-types", "prost-reflect"] {
        let versions = lock
            .split("[[package]]")
            .filter(|p| p.contains(&format!("\nname = \"{name}\"\n")))
            .count();
        assert_eq!(versions, 1, "{name} is in Cargo.lock {versions} times");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_is_previewed_by_the_approver_and_refused_to_the_requester() {
    let principals = Principals::new();
    let (_server, http) = console_server(&principals).await;
    let commander = principals.token("commander");
    let approver = principals.token("approver");
    let declared = api(
        http,
        "DeclareIncident",
        Some(commander),
        &json!({"type": "credential-stuffing", "severity": "sev3", "reason": "wave"}),
    )
    .await;
    assert_eq!(declared.status, 200, "{}", declared.body);
    let incident = declared.json()["incident"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let resolve = api(
        http,
        "ResolveIncident",
        Some(commander),
        &json!({"incidentId": incident, "reason": "over"}),
    )
    .await
    .json();
    let request = resolve["pending"]["id"].as_str().unwrap().to_string();
    let before = observed(http, principals.token("admin")).await;

    // The requester's dry run is refused as the approval would be, and,
    // being a dry run, not audited.
    let own = api(
        http,
        "Approve",
        Some(commander),
        &json!({"requestId": request, "reason": "mine", "dryRun": true}),
    )
    .await;
    assert_eq!(own.status, 403, "{}", own.body);
    assert!(
        own.json()["message"]
            .as_str()
            .unwrap()
            .contains("may not approve"),
        "{}",
        own.body
    );
    // The approver's dry run says what approving will change, per channel.
    let preview = api(
        http,
        "Approve",
        Some(approver),
        &json!({"requestId": request, "reason": "checked", "dryRun": true}),
    )
    .await;
    assert_eq!(preview.status, 200, "{}", preview.body);
    let preview = preview.json()["preview"].clone();
    assert!(
        preview["summary"].as_str().unwrap().contains("lift"),
        "{preview}"
    );
    assert!(
        !preview["channels"].as_array().unwrap().is_empty(),
        "{preview}"
    );
    assert_eq!(
        observed(http, principals.token("admin")).await,
        before,
        "a dry run changes and audits nothing"
    );
    let approved = api(
        http,
        "Approve",
        Some(approver),
        &json!({"requestId": request, "reason": "checked"}),
    )
    .await;
    assert_eq!(approved.status, 200, "{}", approved.body);
    assert_eq!(approved.json()["request"]["status"], "approved");
}

/// Opens `GET /api/v1/events` of `live` as `token` and reads its status
/// line.
async fn open_events(
    http: SocketAddr,
    token: &str,
) -> (String, tokio::io::Lines<BufReader<tokio::net::TcpStream>>) {
    open_events_in(http, token, "live").await
}

/// [`open_events`] of `namespace`.
async fn open_events_in(
    http: SocketAddr,
    token: &str,
    namespace: &str,
) -> (String, tokio::io::Lines<BufReader<tokio::net::TcpStream>>) {
    let mut stream = tokio::net::TcpStream::connect(http).await.unwrap();
    stream
        .write_all(
            format!(
                "GET /api/v1/events?namespace={namespace} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut lines = BufReader::new(stream).lines();
    let status = lines.next_line().await.unwrap().unwrap();
    (status, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_bounded_and_end_when_the_token_is_revoked() {
    let principals = Principals::new();
    let server = TestServer::with_tokens_and(&principals, |config: &mut ServeConfig| {
        config.http_listen = Some("127.0.0.1:0".parse().unwrap());
        config.tokens_reload = Duration::from_millis(50);
    })
    .await;
    let http = server.http_addr().unwrap();

    use safemode_grpc::console::{MAX_EVENT_STREAMS, MAX_EVENT_STREAMS_PER_PRINCIPAL};
    let refused_for = |who: &str| {
        let bearer = format!("Bearer {}", principals.token(who));
        async move {
            request(
                http,
                "GET",
                "/api/v1/events?namespace=live",
                &[("authorization", &bearer)],
                b"",
            )
            .await
        }
    };
    // At most MAX_EVENT_STREAMS_PER_PRINCIPAL for one principal, and
    // MAX_EVENT_STREAMS at once on a replica.
    let mut open = Vec::new();
    for _ in 0..MAX_EVENT_STREAMS_PER_PRINCIPAL {
        let (status, mut lines) = open_events(http, principals.token("viewer")).await;
        assert!(status.contains(" 200 "), "{status}");
        next_event(&mut lines, "hello").await;
        open.push(lines);
    }
    // The viewer's next is refused, while others still get theirs.
    let refused = refused_for("viewer").await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert!(
        refused.json()["message"]
            .as_str()
            .unwrap()
            .starts_with("viewer holds 4 console event streams"),
        "{}",
        refused.body
    );
    // At most MAX_EVENT_NAMESPACES namespaces followed at once: each costs
    // a fleet status per interval (live is one already).
    let mut others = Vec::new();
    for drill in ["drill-a", "drill-b"] {
        let (status, mut lines) = open_events_in(http, principals.token("commander"), drill).await;
        assert!(status.contains(" 200 "), "{drill}: {status}");
        next_event(&mut lines, "hello").await;
        others.push(lines);
    }
    let bearer = format!("Bearer {}", principals.token("commander"));
    let refused = request(
        http,
        "GET",
        "/api/v1/events?namespace=drill-c",
        &[("authorization", &bearer)],
        b"",
    )
    .await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert!(
        refused.json()["message"]
            .as_str()
            .unwrap()
            .starts_with(&format!(
                "this replica's console event streams follow {} namespaces already",
                safemode_grpc::console::MAX_EVENT_NAMESPACES
            )),
        "{}",
        refused.body
    );
    // The rest on live, up to the replica's bound.
    let people = ["commander2", "approver", "approver2", "admin"];
    for who in people
        .iter()
        .cycle()
        .take(MAX_EVENT_STREAMS - open.len() - others.len())
    {
        let (status, mut lines) = open_events(http, principals.token(who)).await;
        assert!(status.contains(" 200 "), "{who}: {status}");
        next_event(&mut lines, "hello").await;
        others.push(lines);
    }
    assert_eq!(open.len() + others.len(), MAX_EVENT_STREAMS);
    let refused = refused_for("drill").await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(refused.json()["code"], "resource_exhausted");
    drop(others);

    // The viewer's token is revoked: every stream it opened ends, saying so.
    let admin =
        safemode_controller::auth::create_token("other", &[safemode_controller::auth::Role::Admin])
            .unwrap();
    std::fs::write(principals.file.path(), format!("{}\n", admin.line)).unwrap();
    for lines in &mut open {
        let end = next_event(lines, "end").await;
        assert!(end.contains(r#""code":"unauthenticated""#), "{end}");
        assert!(
            lines
                .next_line()
                .await
                .unwrap()
                .is_some_and(|l| l.is_empty()),
            "the end event is complete"
        );
    }
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_says_when_the_store_is_away_and_when_it_is_back() {
    let mut etcd = crate::etcd::EtcdCluster::start(1).await;
    let server = TestServer::start_with(ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        signing_key: safemode_grpc::server::SigningKeySource::Key(
            crate::support::test_signing_key(),
        ),
        store: safemode_grpc::server::StoreConfig::Etcd {
            endpoints: etcd.endpoints(),
            prefix: "/safemode/".into(),
            tls: Default::default(),
        },
        ..ServeConfig::default()
    })
    .await;
    let http = server.http_addr().unwrap();
    // No tokens file: the bearer header is not looked at.
    let (status, mut lines) = open_events(http, "unused").await;
    assert!(status.contains(" 200 "), "{status}");
    next_event(&mut lines, "hello").await;
    // The store goes away: the page is told once, with why.
    etcd.kill(0);
    let trouble = next_event(&mut lines, "trouble").await;
    assert!(trouble.contains("unreachable"), "{trouble}");
    // It comes back: a change, so the page reads again.
    etcd.restart(0).await;
    next_event(&mut lines, "change").await;
}

/// Two replicas on one etcd, tokens required, each with its console: `r-b`
/// is alive in the store but its advertised address is a socket that
/// accepts and never answers, so every fleet status waits for it until the
/// peer deadline.
struct SilentFleet {
    a: TestServer,
    _b: TestServer,
    _silent: tokio::task::JoinHandle<()>,
    _etcd: crate::etcd::EtcdCluster,
}

impl SilentFleet {
    async fn start(principals: &Principals) -> Self {
        let etcd = crate::etcd::EtcdCluster::start(1).await;
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((connection, _)) = silent.accept().await {
                held.push(connection);
            }
        });
        let replica = |name: &str, advertise: Option<String>| ServeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            http_listen: Some("127.0.0.1:0".parse().unwrap()),
            replica: Some(name.to_string()),
            advertise,
            signing_key: safemode_grpc::server::SigningKeySource::Key(
                crate::support::test_signing_key(),
            ),
            store: safemode_grpc::server::StoreConfig::Etcd {
                endpoints: etcd.endpoints(),
                prefix: "/safemode/".into(),
                tls: Default::default(),
            },
            tokens: Some(principals.file.path().to_path_buf()),
            ..ServeConfig::default()
        };
        let a = TestServer::start_with(replica("r-a", None)).await;
        let b = TestServer::start_with(replica("r-b", Some(silent_addr.to_string()))).await;
        SilentFleet {
            a,
            _b: b,
            _silent: hold,
            _etcd: etcd,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_reaches_the_event_stream_at_once_while_a_replica_is_silent() {
    let principals = Principals::new();
    let fleet = SilentFleet::start(&principals).await;
    let http = fleet.a.http_addr().unwrap();
    let viewer = principals.token("viewer");
    // The fleet's status names r-b as not answering, and is partial.
    crate::support::wait_until("r-a's status names r-b as silent", || async {
        let status = api(http, "GetStatus", Some(viewer), &json!({}))
            .await
            .json();
        status["partial"] == true
            && status["replicas"].as_array().is_some_and(|r| {
                r.iter()
                    .any(|r| r["replica"] == "r-b" && r["answered"] == false)
            })
    })
    .await;
    let (status, mut lines) = open_events(http, viewer).await;
    assert!(status.contains(" 200 "), "{status}");
    next_event(&mut lines, "hello").await;

    let applied = crate::support::safemode(&[
        "--server",
        &fleet.a.url,
        "--token",
        principals.token("commander"),
        "-o",
        "json",
        "mode",
        "apply",
        "incident-notice",
        "--reason",
        "while r-b is silent",
    ])
    .await;
    assert!(applied.status.success(), "{applied:?}");
    let revision = serde_json::from_slice::<Value>(&applied.stdout).unwrap()["revision"].clone();
    let revision = revision
        .as_i64()
        .or_else(|| revision.as_str().and_then(|r| r.parse().ok()))
        .unwrap_or_else(|| {
            panic!(
                "no revision in {}",
                String::from_utf8_lossy(&applied.stdout)
            )
        });
    // Within 2 s of the CLI's answer, whatever r-b does: the namespace's
    // change is said from r-a's own state (fleet changes may come between).
    let said = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let data = next_event(&mut lines, "change").await;
            let data: Value = serde_json::from_str(data.trim_start_matches("data: ")).unwrap();
            if data["what"] == "namespace" {
                return data;
            }
        }
    })
    .await
    .expect("the change is said within 2 s while r-b is silent");
    assert_eq!(said["revision"], revision.to_string(), "{said}");
    // And the page's read of the namespace answers at once too.
    let read = tokio::time::timeout(
        Duration::from_secs(2),
        api(
            http,
            "GetStatus",
            Some(viewer),
            &json!({"thisReplicaOnly": true, "pageSize": 1}),
        ),
    )
    .await
    .expect("this replica's status answers within 2 s while r-b is silent")
    .json();
    assert_eq!(read["revision"], revision.to_string(), "{read}");
    assert_eq!(read["activations"][0]["mode"], "incident-notice", "{read}");
    // The propagation, gathered apart, still names r-b.
    let gathered = api(http, "GetStatus", Some(viewer), &json!({}))
        .await
        .json();
    assert_eq!(gathered["partial"], true, "{gathered}");
}
