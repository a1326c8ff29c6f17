//! A tiny channel service: the web back end's "password reset" endpoint,
//! guarded by safemode. It subscribes as the `web` channel, keeps the policy
//! in a last-known-good file, and asks `decide` on every request: a reset
//! goes ahead only when the policy allows it; otherwise the customer gets the
//! policy's message and what to do next (verify, wait, or try a verified
//! channel).
//!
//! ```sh
//! cargo run --example password_reset -- --server http://127.0.0.1:7700 --listen 127.0.0.1:8080 \
//!     [--last-known-good FILE]   # default: ./password-reset.safemode.lkg
//!     [--trusted-keys FILE]      # the controller's public key; default:
//!                                # $SAFEMODE_TRUSTED_KEYS, else ./safemode-data/signing.pub
//! curl -s -X POST localhost:8080/password-reset -H 'content-type: application/json' \
//!     -d '{"account": "a-1001", "confidence": 0.9, "methods": ["push"]}'
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use safemode_client::policy::{
    Action, ActionSelector, Channel, Context, MethodSet, Namespace, Outcome,
};
use safemode_client::{FailClosed, FailClosedEffect, Subscriber, SubscriberConfig, TrustedKeys};
use serde::Deserialize;
use serde_json::{Value, json};

/// What the endpoint needs: the subscription, and the action it guards,
/// parsed once at start.
struct Service {
    safemode: Subscriber,
    reset: Action,
}

/// A reset request as the web front end sends it.
#[derive(Deserialize)]
struct ResetRequest {
    account: String,
    /// How sure the session is of the customer's identity, 0 to 1.
    #[serde(default)]
    confidence: f64,
    /// Verification methods passed in this session, e.g. ["push"].
    #[serde(default)]
    methods: Vec<String>,
    /// Verification attempts that failed so far.
    #[serde(default)]
    failed_attempts: u32,
}

async fn password_reset(
    State(service): State<Arc<Service>>,
    Json(request): Json<ResetRequest>,
) -> (StatusCode, Json<Value>) {
    let Ok(methods) = MethodSet::parse(&request.methods) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "unknown verification method"})),
        );
    };
    if !(0.0..=1.0).contains(&request.confidence) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "confidence must be from 0 to 1"})),
        );
    }
    let ctx = Context {
        confidence: request.confidence,
        methods,
        failed_attempts: request.failed_attempts,
        ..Context::default()
    };
    let decision = service.safemode.decide(&service.reset, &ctx);
    if decision.snapshot().is_none() && !decision.is_fail_closed() {
        // No policy at all yet (never reached the controller, nothing
        // saved): do nothing rather than guess.
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "message": "Please try again in a moment."})),
        );
    }
    let message = decision
        .customer_message()
        .unwrap_or("We can't reset your password right now. Please try again later.");
    let (status, body) = match decision.outcome() {
        Outcome::Allow => (
            StatusCode::OK,
            json!({"status": "reset_link_sent", "account": request.account}),
        ),
        // A real service counts resets per account and refuses past the
        // limit; this example only passes the limit on.
        Outcome::Throttle(limit) => (
            StatusCode::OK,
            json!({
                "status": "reset_link_sent",
                "account": request.account,
                "limit": {"max": limit.max, "window_seconds": limit.window_seconds},
            }),
        ),
        Outcome::StepUp {
            required,
            attempts_left,
        } => (
            StatusCode::UNAUTHORIZED,
            json!({
                "status": "verify_first",
                "message": message,
                "methods": required.methods.names().collect::<Vec<_>>(),
                "attempts_left": attempts_left,
            }),
        ),
        Outcome::Review { queue, .. } => (
            StatusCode::ACCEPTED,
            json!({"status": "in_review", "message": message, "queue": &**queue}),
        ),
        Outcome::Route(route) => (
            StatusCode::FORBIDDEN,
            json!({
                "status": "use_another_channel",
                "message": message,
                "channels": route.to.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
            }),
        ),
        Outcome::ReadOnly(_) | Outcome::Deny(_) => (
            StatusCode::FORBIDDEN,
            json!({"status": "refused", "message": message}),
        ),
    };
    let mut body = body;
    body["policy"] = json!({
        "effect": decision.effect().as_str(),
        "revision": decision.revision(),
        "stale": decision.is_stale(),
        "reasons": decision.reasons().map(|r| r.as_str()).collect::<Vec<_>>(),
    });
    (status, Json(body))
}

struct Args {
    server: String,
    listen: SocketAddr,
    last_known_good: std::path::PathBuf,
    /// The controller's public key (`signing.pub` in its data directory, or
    /// `safemode key public`): what it signs is all this service enforces.
    trusted_keys: std::path::PathBuf,
    token: Option<String>,
}

fn args() -> Result<Args, String> {
    let mut args = Args {
        server: "http://127.0.0.1:7700".into(),
        listen: "127.0.0.1:8080".parse().unwrap(),
        last_known_good: "password-reset.safemode.lkg".into(),
        trusted_keys: std::env::var_os("SAFEMODE_TRUSTED_KEYS")
            .map_or_else(|| "safemode-data/signing.pub".into(), Into::into),
        token: std::env::var("SAFEMODE_TOKEN").ok(),
    };
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        let mut value = || given.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--server" => args.server = value()?,
            "--listen" => {
                args.listen = value()?
                    .parse()
                    .map_err(|e| format!("--listen: {e}; e.g. 127.0.0.1:8080"))?
            }
            "--last-known-good" => args.last_known_good = value()?.into(),
            "--trusted-keys" => args.trusted_keys = value()?.into(),
            other => {
                return Err(format!(
                    "unknown flag {other}; flags: --server URL, --listen ADDR, --last-known-good FILE, --trusted-keys FILE"
                ));
            }
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = match args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let mut config = SubscriberConfig::new(
        [args.server],
        Namespace::live(),
        Channel::parse("web").expect("web is a channel"),
        format!(
            "password-reset-{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into()),
            std::process::id()
        ),
    );
    config.token = args.token;
    config.trusted_keys = match TrustedKeys::load(&args.trusted_keys) {
        Ok(keys) => Some(keys),
        Err(e) => {
            eprintln!(
                "error: the controller's public key: {e}; give --trusted-keys FILE (SAFEMODE_TRUSTED_KEYS): signing.pub in the controller's data directory, or the output of `safemode key public`"
            );
            std::process::exit(2);
        }
    };
    config.last_known_good = Some(args.last_known_good);
    // Cut off from safemode for five minutes: resets wait for a human.
    config.fail_closed = Some(FailClosed::new(
        Duration::from_secs(300),
        vec![ActionSelector::parse("account.*").expect("a valid selector")],
        FailClosedEffect::Review {
            queue: "account-security".into(),
        },
    ));
    let safemode = match Subscriber::start(config) {
        Ok(subscriber) => subscriber,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    // Listen once there is a policy (or after a few seconds without the
    // controller, with the saved one or none).
    let mut changes = safemode.changes();
    let _ = tokio::time::timeout(Duration::from_secs(5), changes.wait_for(|p| p.is_some())).await;
    drop(changes);
    let service = Arc::new(Service {
        safemode,
        reset: Action::parse("account.password_reset").expect("a known action"),
    });
    let app = Router::new()
        .route("/password-reset", post(password_reset))
        .with_state(service);
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    let listening = listener.local_addr().unwrap_or(args.listen);
    tracing::info!(listen = %listening, "password reset service ready");
    println!("listening on {listening}");
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
