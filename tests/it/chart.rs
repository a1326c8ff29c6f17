//! Issue 12, item 3: the Helm chart at `helm/safemode`. Helm's own engine
//! renders it (the PyPI package helm-python-sdk binds Helm's Go SDK; no helm
//! binary) for the default values and for `tests/chart/all-on.yaml`, which
//! turns every option on; Helm's lint passes in strict mode; every rendered
//! object validates against the Kubernetes schema (kubernetes-validate,
//! strict) for two Kubernetes versions; the objects have the properties the
//! issue asks for; values the schema or the templates refuse are refused
//! with the reason; and the container arguments it renders, run in a copy
//! of the pod's files, pass the real `safemode serve --check`.
//!
//! `tests/chart/check_chart.py` only renders, lints and validates, and
//! answers in JSON; what passes is decided here. Python 3 with
//! helm-python-sdk and kubernetes-validate is required: a missing one fails
//! the test with the command that installs it (`scripts/test` runs that
//! command). `SAFEMODE_PYTHON` names another interpreter.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use safemode_signing::SigningKey;
use serde_json::{Value, json};

const INSTALL: &str = "python3 -m pip install helm-python-sdk kubernetes-validate";
/// The Kubernetes versions every rendered object must validate for: the
/// oldest still common in managed clusters, and a recent one.
const KUBE_VERSIONS: [&str; 2] = ["1.29", "1.33"];
const RELEASE: &str = "safemode";
const NAMESPACE: &str = "incident";
/// Stand-ins for what the downward API gives each pod: its IPv4 address,
/// or its IPv6 one where the values say `podIPFamily: IPv6` (all-on).
const POD_IP: &str = "10.4.2.17";
const POD_IPV6: &str = "fd00:10:4::17";
const POD_NAME: &str = "safemode-7d9f6c5b8-x2kqp";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> String {
    std::env::var("SAFEMODE_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Fails the test, saying how to install them, unless Python 3,
/// helm-python-sdk and kubernetes-validate are there.
fn require_python() {
    let python = python();
    let output = Command::new(&python)
        .args(["-c", "import helm_python, kubernetes_validate, yaml"])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "'{python}' cannot be run ({e}). The chart test needs Python 3 with \
                 helm-python-sdk and kubernetes-validate: install Python 3, then `{INSTALL}` \
                 (scripts/test does this), or set SAFEMODE_PYTHON to an interpreter that has them"
            )
        });
    assert!(
        output.status.success(),
        "'{python}' cannot import helm-python-sdk and kubernetes-validate:\n{}\nInstall them \
         with `{INSTALL}` (scripts/test does this), or set SAFEMODE_PYTHON to an interpreter \
         that has them",
        String::from_utf8_lossy(&output.stderr).trim_end()
    );
}

// === Rendering ===

/// Values that Helm must refuse: (case, values over the defaults, what the
/// error must say, whether lint finds it too). Lint reports schema errors;
/// a template's `fail` only stops a render (Helm's lint logs it and goes on).
fn rejects() -> Vec<(&'static str, Value, &'static str, bool)> {
    vec![
        (
            "one replica",
            json!({"replicaCount": 1}),
            "at '/replicaCount': minimum: got 1, want 2",
            true,
        ),
        (
            "an unknown top-level key",
            json!({"replicas": 3}),
            "additional properties 'replicas' not allowed",
            true,
        ),
        (
            "an unknown nested key",
            json!({"tls": {"enabled": true, "secret": "x"}}),
            "additional properties 'secret' not allowed",
            true,
        ),
        (
            "anti-affinity neither preferred nor required",
            json!({"podAntiAffinity": "sometimes"}),
            "at '/podAntiAffinity'",
            true,
        ),
        (
            "a port as a string",
            json!({"ports": {"grpc": "7700"}}),
            "at '/ports/grpc'",
            true,
        ),
        (
            "a mode file not named NAME.yaml",
            json!({"modes": {"files": {"notes.txt": "title: x"}}}),
            "invalid propertyName 'notes.txt'",
            true,
        ),
        (
            "no etcd endpoint",
            json!({"etcd": {"endpoints": []}}),
            "at '/etcd/endpoints'",
            true,
        ),
        (
            "etcd TLS with http:// endpoints",
            json!({"etcd": {"tls": {"enabled": true}}}),
            "etcd.tls.enabled needs https:// endpoints",
            false,
        ),
        (
            "https:// endpoints without etcd TLS",
            json!({"etcd": {"endpoints": ["https://etcd-0:2379"]}}),
            "set etcd.tls.enabled=true",
            false,
        ),
        (
            "a PodDisruptionBudget no drain could meet",
            json!({"podDisruptionBudget": {"minAvailable": 2}}),
            "podDisruptionBudget.minAvailable (2) must be less than replicaCount (2)",
            false,
        ),
        (
            "modes from files and a ConfigMap",
            json!({"modes": {"files": {"a.yaml": "title: a"}, "existingConfigMap": "m"}}),
            "give modes.files or modes.existingConfigMap, not both",
            false,
        ),
        (
            "a TLS proxy said to front an http port that speaks HTTPS",
            json!({"tls": {"enabled": true}, "console": {"behindTLSProxy": true}}),
            "with tls.enabled that port speaks HTTPS with the same certificate and serves the console itself: unset console.behindTLSProxy",
            false,
        ),
    ]
}

/// The rendering cases: (case, values files).
const RENDERS: [(&str, &[&str]); 3] = [
    ("default", &[]),
    ("all-on", &["tests/chart/all-on.yaml"]),
    (
        "existing-configmaps",
        &["tests/chart/existing-configmaps.yaml"],
    ),
];

/// The script's answer, asked once for every test here.
fn rendered() -> &'static Value {
    static ANSWER: OnceLock<Value> = OnceLock::new();
    ANSWER.get_or_init(|| {
        require_python();
        let renders: serde_json::Map<String, Value> = RENDERS
            .iter()
            .map(|(case, files)| {
                let files: Vec<String> = files
                    .iter()
                    .map(|f| repo().join(f).display().to_string())
                    .collect();
                (case.to_string(), json!({"files": files}))
            })
            .collect();
        let rejects: serde_json::Map<String, Value> = rejects()
            .into_iter()
            .map(|(case, set, _, _)| (case.to_string(), json!({"set": set})))
            .collect();
        let request = json!({
            "chart": repo().join("helm/safemode"),
            "release": RELEASE,
            "namespace": NAMESPACE,
            "kube_versions": KUBE_VERSIONS,
            "renders": renders,
            "rejects": rejects,
        });
        let mut child = Command::new(python())
            .arg(repo().join("tests/chart/check_chart.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(request.to_string().as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "tests/chart/check_chart.py failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("the script answers JSON")
    })
}

/// One case's rendered objects.
struct Render<'a> {
    case: &'a str,
    answer: &'a Value,
}

impl<'a> Render<'a> {
    fn of(case: &'a str) -> Self {
        let answer = &rendered()["renders"][case];
        assert!(answer.is_object(), "no render of {case}");
        Render { case, answer }
    }

    fn objects(&self) -> impl Iterator<Item = &'a Value> {
        self.answer["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| &o["object"])
    }

    fn kinds(&self) -> BTreeSet<String> {
        self.objects()
            .map(|o| o["kind"].as_str().unwrap().to_string())
            .collect()
    }

    /// The one object of `kind`.
    fn one(&self, kind: &str) -> &'a Value {
        let found: Vec<_> = self.objects().filter(|o| o["kind"] == kind).collect();
        assert_eq!(found.len(), 1, "{}: {kind}s: {found:#?}", self.case);
        found[0]
    }

    fn named(&self, kind: &str, name: &str) -> Option<&'a Value> {
        self.objects()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
    }

    fn container(&self) -> &'a Value {
        let containers = self.one("Deployment")["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(containers.len(), 1, "{}", self.case);
        &containers[0]
    }

    fn args(&self) -> Vec<String> {
        self.container()["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().expect("args are strings").to_string())
            .collect()
    }
}

// === The chart renders, lints and validates ===

#[test]
fn chart_renders_lints_and_validates_for_two_kubernetes_versions() {
    let answer = rendered();
    let schemas: Vec<&str> = answer["kube_schemas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for kube in KUBE_VERSIONS {
        assert!(
            schemas.iter().any(|s| s.starts_with(&format!("{kube}."))),
            "kubernetes-validate has no schema for {kube}: {schemas:?}"
        );
    }
    // (case, kinds rendered, objects without a Kubernetes schema)
    let cases: [(&str, &[&str], &[&str]); 3] = [
        (
            "default",
            &[
                "Deployment",
                "PodDisruptionBudget",
                "Service",
                "ServiceAccount",
            ],
            &[],
        ),
        (
            "all-on",
            &[
                "ConfigMap",
                "Deployment",
                "NetworkPolicy",
                "PodDisruptionBudget",
                "Service",
                "ServiceAccount",
                "ServiceMonitor",
            ],
            &["ServiceMonitor/safemode-prod"],
        ),
        (
            "existing-configmaps",
            &[
                "Deployment",
                "PodDisruptionBudget",
                "Service",
                "ServiceAccount",
            ],
            &[],
        ),
    ];
    for (case, kinds, no_schema) in cases {
        let render = Render::of(case);
        let a = render.answer;
        for kube in KUBE_VERSIONS {
            let findings: Vec<&str> = a["lint"][kube]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_str().unwrap())
                .filter(|m| !m.starts_with("info "))
                .collect();
            assert!(
                findings.is_empty(),
                "{case}: helm lint --strict (Kubernetes {kube}): {findings:#?}"
            );
        }
        assert_eq!(
            render.kinds(),
            kinds.iter().map(|k| k.to_string()).collect(),
            "{case}"
        );
        assert_eq!(a["invalid"], json!([]), "{case}: invalid objects");
        assert_eq!(a["no_schema"], json!(no_schema), "{case}");
        let all: BTreeSet<String> = render
            .objects()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect();
        for kube in KUBE_VERSIONS {
            let validated: BTreeSet<String> = a["validated"][kube]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            let expected: BTreeSet<String> = all
                .iter()
                .filter(|o| !no_schema.contains(&o.as_str()))
                .cloned()
                .collect();
            assert_eq!(
                validated, expected,
                "{case}: validated for Kubernetes {kube}"
            );
        }
        assert!(
            a["notes"].as_str().unwrap().contains("safemode --server"),
            "{case}: NOTES.txt: {}",
            a["notes"]
        );
    }
}

#[test]
fn chart_app_version_is_the_crate_version() {
    let chart = std::fs::read_to_string(repo().join("helm/safemode/Chart.yaml")).unwrap();
    let app_version = chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion: "))
        .expect("Chart.yaml has an appVersion");
    assert_eq!(
        app_version.trim_matches('"'),
        env!("CARGO_PKG_VERSION"),
        "helm/safemode/Chart.yaml's appVersion must be the workspace version in Cargo.toml"
    );
}

#[test]
fn chart_refuses_bad_values_with_the_reason() {
    let answer = rendered();
    for (case, set, says, lint_finds) in rejects() {
        let a = &answer["rejects"][case];
        let error = a["render_error"]
            .as_str()
            .unwrap_or_else(|| panic!("{case}: {set} rendered; it must be refused"));
        assert!(
            error.contains(says),
            "{case}: {error:?} does not say {says:?}"
        );
        if !lint_finds {
            continue;
        }
        for kube in KUBE_VERSIONS {
            let errors: Vec<&str> = a["lint"][kube]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_str().unwrap())
                .filter(|m| m.starts_with("error"))
                .collect();
            assert!(
                errors.iter().any(|e| e.contains(says)),
                "{case}: lint (Kubernetes {kube}) did not say {says:?}: {errors:#?}"
            );
        }
    }
}

// === What the issue asks of the objects ===

/// `(case, kind, JSON pointer, value)`: each rendered object of `kind` holds
/// `value` there.
fn expected_fields() -> Vec<(&'static str, &'static str, String, Value)> {
    let c = "/spec/template/spec/containers/0";
    let mut rows = Vec::new();
    for case in ["default", "all-on", "existing-configmaps"] {
        let all_on = case == "all-on";
        let same: Vec<(&str, String, Value)> = vec![
            // A rolling update never drops below the replicas there are.
            (
                "Deployment",
                "/spec/strategy/type".into(),
                json!("RollingUpdate"),
            ),
            (
                "Deployment",
                "/spec/strategy/rollingUpdate/maxUnavailable".into(),
                json!(0),
            ),
            (
                "Deployment",
                "/spec/strategy/rollingUpdate/maxSurge".into(),
                json!(1),
            ),
            (
                "Deployment",
                "/spec/replicas".into(),
                json!(if all_on { 3 } else { 2 }),
            ),
            (
                "PodDisruptionBudget",
                "/spec/minAvailable".into(),
                json!(if all_on { 2 } else { 1 }),
            ),
            // The restricted Pod Security Standard.
            (
                "Deployment",
                "/spec/template/spec/automountServiceAccountToken".into(),
                json!(false),
            ),
            (
                "Deployment",
                "/spec/template/spec/securityContext/runAsNonRoot".into(),
                json!(true),
            ),
            (
                "Deployment",
                "/spec/template/spec/securityContext/runAsUser".into(),
                json!(65532),
            ),
            (
                "Deployment",
                "/spec/template/spec/securityContext/seccompProfile/type".into(),
                json!("RuntimeDefault"),
            ),
            (
                "Deployment",
                format!("{c}/securityContext/runAsNonRoot"),
                json!(true),
            ),
            (
                "Deployment",
                format!("{c}/securityContext/runAsUser"),
                json!(65532),
            ),
            (
                "Deployment",
                format!("{c}/securityContext/readOnlyRootFilesystem"),
                json!(true),
            ),
            (
                "Deployment",
                format!("{c}/securityContext/allowPrivilegeEscalation"),
                json!(false),
            ),
            (
                "Deployment",
                format!("{c}/securityContext/capabilities/drop"),
                json!(["ALL"]),
            ),
            (
                "Deployment",
                format!("{c}/securityContext/seccompProfile/type"),
                json!("RuntimeDefault"),
            ),
            // The image's ENTRYPOINT runs: only arguments are given.
            ("Deployment", format!("{c}/command"), Value::Null),
            ("Deployment", format!("{c}/args/0"), json!("serve")),
            // Probes on the --http-listen port.
            (
                "Deployment",
                format!("{c}/livenessProbe/httpGet/path"),
                json!("/healthz"),
            ),
            (
                "Deployment",
                format!("{c}/livenessProbe/httpGet/port"),
                json!("http"),
            ),
            (
                "Deployment",
                format!("{c}/readinessProbe/httpGet/path"),
                json!("/readyz"),
            ),
            (
                "Deployment",
                format!("{c}/readinessProbe/httpGet/port"),
                json!("http"),
            ),
            (
                "Deployment",
                format!("{c}/startupProbe/httpGet/path"),
                if all_on {
                    json!("/healthz")
                } else {
                    Value::Null
                },
            ),
            // With TLS the http port speaks HTTPS, and the probes know it.
            (
                "Deployment",
                format!("{c}/livenessProbe/httpGet/scheme"),
                if all_on { json!("HTTPS") } else { Value::Null },
            ),
            (
                "Deployment",
                format!("{c}/readinessProbe/httpGet/scheme"),
                if all_on { json!("HTTPS") } else { Value::Null },
            ),
            (
                "Deployment",
                format!("{c}/startupProbe/httpGet/scheme"),
                if all_on { json!("HTTPS") } else { Value::Null },
            ),
            ("Deployment", format!("{c}/ports/0/name"), json!("grpc")),
            (
                "Deployment",
                format!("{c}/ports/0/containerPort"),
                json!(if all_on { 7443 } else { 7700 }),
            ),
            ("Deployment", format!("{c}/ports/1/name"), json!("http")),
            (
                "Deployment",
                format!("{c}/ports/1/containerPort"),
                json!(if all_on { 9090 } else { 8080 }),
            ),
            (
                "Deployment",
                format!("{c}/resources/requests/cpu"),
                json!(if all_on { "250m" } else { "100m" }),
            ),
            // A Service for gRPC, and the HTTP port that /metrics is scraped on.
            ("Service", "/spec/ports/0/name".into(), json!("grpc")),
            ("Service", "/spec/ports/0/targetPort".into(), json!("grpc")),
            (
                "Service",
                "/spec/ports/0/port".into(),
                json!(if all_on { 7443 } else { 7700 }),
            ),
            ("Service", "/spec/ports/1/name".into(), json!("http")),
            (
                "ServiceAccount",
                "/automountServiceAccountToken".into(),
                json!(false),
            ),
        ];
        for (kind, pointer, value) in same {
            rows.push((case, kind, pointer, value));
        }
    }
    let anti = "/spec/template/spec/affinity/podAntiAffinity";
    let fixed: [(&str, &str, String, Value); 14] = [
        // Preferred by default, so a small cluster still schedules both.
        (
            "default",
            "Deployment",
            format!(
                "{anti}/preferredDuringSchedulingIgnoredDuringExecution/0/podAffinityTerm/topologyKey"
            ),
            json!("kubernetes.io/hostname"),
        ),
        (
            "default",
            "Deployment",
            format!("{anti}/requiredDuringSchedulingIgnoredDuringExecution"),
            Value::Null,
        ),
        (
            "all-on",
            "Deployment",
            format!("{anti}/requiredDuringSchedulingIgnoredDuringExecution/0/topologyKey"),
            json!("topology.kubernetes.io/zone"),
        ),
        (
            "all-on",
            "ServiceMonitor",
            "/apiVersion".into(),
            json!("monitoring.coreos.com/v1"),
        ),
        (
            "all-on",
            "ServiceMonitor",
            "/spec/endpoints/0/port".into(),
            json!("http"),
        ),
        (
            "all-on",
            "ServiceMonitor",
            "/spec/endpoints/0/path".into(),
            json!("/metrics"),
        ),
        (
            "all-on",
            "ServiceMonitor",
            "/spec/endpoints/0/interval".into(),
            json!("15s"),
        ),
        // The http port speaks HTTPS with the gRPC certificate: scraped so,
        // checked with the TLS Secret's CA for the replicas' name.
        (
            "all-on",
            "ServiceMonitor",
            "/spec/endpoints/0/scheme".into(),
            json!("https"),
        ),
        (
            "all-on",
            "ServiceMonitor",
            "/spec/endpoints/0/tlsConfig/ca/secret/name".into(),
            json!("safemode-prod-tls"),
        ),
        (
            "all-on",
            "ServiceMonitor",
            "/spec/endpoints/0/tlsConfig/ca/secret/key".into(),
            json!("ca.crt"),
        ),
        (
            "all-on",
            "ServiceMonitor",
            "/spec/endpoints/0/tlsConfig/serverName".into(),
            json!("safemode-prod.incident.svc"),
        ),
        (
            "all-on",
            "ServiceMonitor",
            "/spec/namespaceSelector/matchNames".into(),
            json!([NAMESPACE]),
        ),
        (
            "all-on",
            "ServiceMonitor",
            "/metadata/labels/release".into(),
            json!("prometheus"),
        ),
        (
            "all-on",
            "NetworkPolicy",
            "/spec/policyTypes".into(),
            json!(["Ingress", "Egress"]),
        ),
    ];
    rows.extend(fixed);
    rows
}

#[test]
fn chart_objects_have_what_the_issue_asks() {
    let mut problems = Vec::new();
    for (case, kind, pointer, value) in expected_fields() {
        let render = Render::of(case);
        let object = render.one(kind);
        let found = object.pointer(&pointer).unwrap_or(&Value::Null);
        if *found != value {
            problems.push(format!(
                "{case}: {kind} {pointer}: {found} where {value} was expected"
            ));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");

    for (case, _) in RENDERS {
        let render = Render::of(case);
        let deployment = render.one("Deployment");
        let pod = &deployment["spec"]["template"];
        let selector = &deployment["spec"]["selector"]["matchLabels"];
        // The selectors pick this release's pods, and only them.
        assert!(
            is_subset(selector, &pod["metadata"]["labels"]),
            "{case}: pod labels"
        );
        assert_eq!(
            render.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
            *selector,
            "{case}"
        );
        assert_eq!(
            render.one("Service")["spec"]["selector"],
            *selector,
            "{case}"
        );
        let anti = &pod["spec"]["affinity"]["podAntiAffinity"];
        let term = anti
            .pointer("/preferredDuringSchedulingIgnoredDuringExecution/0/podAffinityTerm")
            .or_else(|| anti.pointer("/requiredDuringSchedulingIgnoredDuringExecution/0"))
            .unwrap_or_else(|| panic!("{case}: no pod anti-affinity: {anti}"));
        assert_eq!(
            term["labelSelector"]["matchLabels"], *selector,
            "{case}: anti-affinity"
        );

        // Never subPath: a Secret's update reaches only a whole directory.
        for object in render.objects() {
            assert!(
                !has_key(object, "subPath") && !has_key(object, "subPathExpr"),
                "{case}: {} {} mounts with subPath",
                object["kind"],
                object["metadata"]["name"]
            );
        }
        // Every Secret a whole directory, read-only; every mount a volume.
        let volumes: BTreeMap<&str, &Value> = pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["name"].as_str().unwrap(), v))
            .collect();
        let mounts = render.container()["volumeMounts"].as_array().unwrap();
        assert_eq!(
            mounts.len(),
            volumes.len(),
            "{case}: a volume mounted nowhere"
        );
        for mount in mounts {
            let name = mount["name"].as_str().unwrap();
            let volume = volumes
                .get(name)
                .unwrap_or_else(|| panic!("{case}: no volume {name}"));
            assert_eq!(mount["readOnly"], json!(true), "{case}: {name} is writable");
            if let Some(secret) = volume.get("secret") {
                assert!(
                    secret.get("items").is_none(),
                    "{case}: {name} picks keys: {secret}"
                );
                assert_eq!(secret["defaultMode"], json!(0o440), "{case}: {name}");
            } else {
                assert!(
                    volume.get("configMap").is_some(),
                    "{case}: {name} is neither a Secret nor a ConfigMap: {volume}"
                );
            }
        }
        let secrets: BTreeSet<&str> = volumes
            .values()
            .filter_map(|v| v["secret"]["secretName"].as_str())
            .collect();
        let expected: BTreeSet<&str> = match case {
            "all-on" => [
                "safemode-prod-tokens",
                "safemode-prod-signing-key",
                "safemode-prod-tls",
                "safemode-etcd-client",
            ]
            .into(),
            _ => ["safemode-tokens", "safemode-signing-key"].into(),
        };
        assert_eq!(secrets, expected, "{case}: Secrets mounted");
    }

    // The ServiceMonitor scrapes the Service's http port.
    let all_on = Render::of("all-on");
    let service = all_on.one("Service");
    let monitor = all_on.one("ServiceMonitor");
    assert!(
        is_subset(
            &monitor["spec"]["selector"]["matchLabels"],
            &service["metadata"]["labels"]
        ),
        "ServiceMonitor selects no Service"
    );
    assert_eq!(monitor["spec"]["endpoints"].as_array().unwrap().len(), 1);
    assert_eq!(monitor["metadata"]["name"], service["metadata"]["name"]);

    // The NetworkPolicy: gRPC from the named peers and the replicas
    // themselves, HTTP from monitoring; out to etcd, DNS, the other replicas
    // and the OTLP collector, and nowhere else.
    let policy = &all_on.one("NetworkPolicy")["spec"];
    let selector = &all_on.one("Deployment")["spec"]["selector"]["matchLabels"];
    assert_eq!(policy["podSelector"]["matchLabels"], *selector);
    let ingress = policy["ingress"].as_array().unwrap();
    let ports = |rule: &Value| -> Vec<String> {
        rule["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let port = match &p["port"] {
                    Value::String(name) => name.clone(),
                    number => number.to_string(),
                };
                format!("{port}/{}", p["protocol"].as_str().unwrap())
            })
            .collect()
    };
    assert_eq!(
        ingress.iter().map(ports).collect::<Vec<_>>(),
        [["grpc/TCP"], ["http/TCP"]]
    );
    assert_eq!(
        ingress[0]["from"][0]["podSelector"]["matchLabels"], *selector,
        "replicas reach each other's gRPC"
    );
    assert_eq!(ingress[0]["from"].as_array().unwrap().len(), 3);
    assert_eq!(
        ingress[1]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "monitoring"
    );
    let egress = policy["egress"].as_array().unwrap();
    assert_eq!(
        egress.iter().map(ports).collect::<Vec<_>>(),
        [
            vec!["2379/TCP"],
            vec!["53/UDP", "53/TCP"],
            vec!["7443/TCP"],
            vec!["4317/TCP"],
            vec!["443/TCP"]
        ]
    );
    // The OTLP collector is reachable, where the values say it runs.
    assert_eq!(
        egress[3]["to"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "observability"
    );
    assert_eq!(
        egress[0]["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "etcd"
    );
    assert_eq!(egress[2]["to"][0]["podSelector"]["matchLabels"], *selector);

    // The modes and runbooks come from the chart's ConfigMaps, or the named ones.
    for (case, modes, runbooks) in [
        ("default", None, None),
        (
            "all-on",
            Some("safemode-prod-modes"),
            Some("safemode-prod-runbooks"),
        ),
        (
            "existing-configmaps",
            Some("incident-modes"),
            Some("incident-runbooks"),
        ),
    ] {
        let render = Render::of(case);
        let volumes = &render.one("Deployment")["spec"]["template"]["spec"]["volumes"];
        for (what, configmap) in [("modes", modes), ("runbooks", runbooks)] {
            let volume = volumes
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == what);
            assert_eq!(
                volume.map(|v| &v["configMap"]["name"]),
                configmap.map(|c| json!(c)).as_ref(),
                "{case}: {what}"
            );
            let args = render.args();
            let flag = format!("--{what}");
            assert_eq!(
                args.contains(&flag),
                configmap.is_some(),
                "{case}: {flag} in {args:?}"
            );
        }
    }

    // The console is served on the plain-HTTP port only when the values say
    // a TLS proxy is in front; with TLS (all-on) the port speaks HTTPS and
    // serves it without the flag.
    for (case, served) in [
        ("default", false),
        ("all-on", false),
        ("existing-configmaps", true),
    ] {
        let args = Render::of(case).args();
        assert_eq!(
            args.iter().any(|a| a == "--console-plain-http"),
            served,
            "{case}: {args:?}"
        );
    }
}

fn is_subset(small: &Value, big: &Value) -> bool {
    let small = small.as_object().expect("labels are a map");
    !small.is_empty() && small.iter().all(|(k, v)| big.get(k) == Some(v))
}

fn has_key(value: &Value, key: &str) -> bool {
    match value {
        Value::Object(map) => map.contains_key(key) || map.values().any(|v| has_key(v, key)),
        Value::Array(items) => items.iter().any(|v| has_key(v, key)),
        _ => false,
    }
}

// === The rendered arguments pass `serve --check` ===

/// The files a pod would see: each Secret's keys, as the tests create them.
struct Secrets {
    files: BTreeMap<&'static str, Vec<(&'static str, String)>>,
}

impl Secrets {
    fn new(tls_name: &str) -> Self {
        let created = Command::new(env!("CARGO_BIN_EXE_safemode"))
            .args([
                "-o",
                "json",
                "token",
                "create",
                "--principal",
                "chart",
                "--role",
                "admin",
            ])
            .output()
            .unwrap();
        assert!(created.status.success(), "{created:?}");
        let line: Value = serde_json::from_slice(&created.stdout).unwrap();
        let tokens = format!("{}\n", line["line"].as_str().unwrap());
        let (_, signing) = SigningKey::generate();
        let (before_rotation, _) = SigningKey::generate();
        let (ca, issuer) = new_ca();
        let server = leaf(
            &issuer,
            tls_name,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = leaf(
            &issuer,
            "safemode",
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        );
        let files = BTreeMap::from([
            ("tokens", vec![("tokens.yaml", tokens)]),
            (
                "signing",
                vec![
                    ("signing.key", signing),
                    ("trusted-keys.pem", before_rotation.public_key().to_pem()),
                ],
            ),
            (
                "tls",
                vec![
                    ("tls.crt", server.0),
                    ("tls.key", server.1),
                    ("ca.crt", ca.clone()),
                ],
            ),
            (
                "etcd-tls",
                vec![("ca.crt", ca), ("tls.crt", client.0), ("tls.key", client.1)],
            ),
        ]);
        Secrets { files }
    }
}

fn new_ca() -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "safemode chart test CA");
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), rcgen::Issuer::new(params, key))
}

/// A certificate for `name` and its key, in PEM.
fn leaf(
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    name: &str,
    usage: rcgen::ExtendedKeyUsagePurpose,
) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.extended_key_usages.push(usage);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// The flags whose values are files or directories the pod must have.
const FILE_FLAGS: [&str; 11] = [
    "--tokens",
    "--signing-key",
    "--trusted-keys",
    "--tls-cert",
    "--tls-key",
    "--peer-ca",
    "--etcd-ca-cert",
    "--etcd-cert",
    "--etcd-key",
    "--modes",
    "--runbooks",
];

/// A copy of the pod's mounted files under a temporary root, laid out as
/// the kubelet lays out Secret and ConfigMap volumes (each key a symlink
/// through `..data` into a timestamped directory, which an update swaps),
/// and the container's arguments and environment with the downward API's
/// values put in and every mounted path moved under the root.
struct Pod {
    root: tempfile::TempDir,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Pod {
    /// `leave_out`: (volume, key) pairs not written, as when a Secret lacks them.
    fn new(render: &Render, secrets: &Secrets, leave_out: &[(&str, &str)]) -> Pod {
        let root = tempfile::tempdir().unwrap();
        let pod = &render.one("Deployment")["spec"]["template"]["spec"];
        let container = render.container();
        let mut mounts = Vec::new();
        for mount in container["volumeMounts"].as_array().unwrap() {
            let name = mount["name"].as_str().unwrap();
            let path = mount["mountPath"].as_str().unwrap().to_string();
            let volume = pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == name)
                .unwrap();
            let files: Vec<(String, String)> = if volume.get("secret").is_some() {
                secrets
                    .files
                    .get(name)
                    .unwrap_or_else(|| {
                        panic!(
                            "{}: the test has no files for Secret volume {name}",
                            render.case
                        )
                    })
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect()
            } else {
                let configmap = volume["configMap"]["name"].as_str().unwrap();
                let rendered = render.named("ConfigMap", configmap).unwrap_or_else(|| {
                    panic!("{}: ConfigMap {configmap} is not rendered", render.case)
                });
                rendered["data"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect()
            };
            let files: Vec<_> = files
                .into_iter()
                .filter(|(key, _)| !leave_out.contains(&(name, key.as_str())))
                .collect();
            write_volume(&root.path().join(path.trim_start_matches('/')), &files);
            mounts.push(path);
        }

        let mut env = Vec::new();
        for var in container["env"].as_array().unwrap() {
            let name = var["name"].as_str().unwrap().to_string();
            let value = match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("status.podIP") if render.case == "all-on" => POD_IPV6.to_string(),
                Some("status.podIP") => POD_IP.to_string(),
                Some("metadata.name") => POD_NAME.to_string(),
                Some(other) => panic!("{}: env {name} from {other}", render.case),
                None => var["value"].as_str().unwrap().to_string(),
            };
            env.push((name, value));
        }
        let mut args: Vec<String> = render
            .args()
            .into_iter()
            .map(|arg| {
                // Kubernetes expands $(VAR) in args from the container's env.
                env.iter().fold(arg, |arg, (name, value)| {
                    arg.replace(&format!("$({name})"), value)
                })
            })
            .collect();
        for i in 1..args.len() {
            if FILE_FLAGS.contains(&args[i - 1].as_str()) {
                let path = args[i].clone();
                assert!(
                    mounts
                        .iter()
                        .any(|m| path.starts_with(&format!("{m}/")) || path == *m),
                    "{}: {} {path} is on no volume the pod mounts: {mounts:?}",
                    render.case,
                    args[i - 1]
                );
                args[i] = root
                    .path()
                    .join(path.trim_start_matches('/'))
                    .display()
                    .to_string();
            }
        }
        Pod { root, args, env }
    }

    /// `safemode ARGS --check` with the container's environment only.
    fn check(&self) -> Output {
        let before = tree(self.root.path());
        let output = Command::new(env!("CARGO_BIN_EXE_safemode"))
            .args(&self.args)
            .arg("--check")
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.root.path())
            .output()
            .unwrap();
        assert_eq!(
            tree(self.root.path()),
            before,
            "serve --check wrote something"
        );
        output
    }
}

/// Writes `files` into `dir` as the kubelet's atomic writer does.
fn write_volume(dir: &Path, files: &[(String, String)]) {
    let data = dir.join("..2026_12_03_16_00_00.000000001");
    std::fs::create_dir_all(&data).unwrap();
    for (key, content) in files {
        std::fs::write(data.join(key), content).unwrap();
    }
    std::os::unix::fs::symlink(data.file_name().unwrap(), dir.join("..data")).unwrap();
    for (key, _) in files {
        std::os::unix::fs::symlink(Path::new("..data").join(key), dir.join(key)).unwrap();
    }
}

/// Every path under `dir`.
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    let mut paths = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() && !path.is_symlink() {
            paths.extend(tree(&path));
        }
        paths.insert(path);
    }
    paths
}

#[test]
fn chart_arguments_pass_serve_check() {
    // (case, lines stdout must start with, what else it must say)
    let cases: [(&str, Vec<String>, Vec<&str>); 2] = [
        (
            "default",
            vec![
                format!("would serve on 0.0.0.0:7700 as replica {POD_NAME}"),
                format!("the other replicas reach it at {POD_IP}:7700 ("),
                "HTTP: /healthz, /readyz and /metrics on 0.0.0.0:8080".into(),
                "store: etcd at http://etcd-0.etcd-headless:2379,http://etcd-1.etcd-headless:2379,http://etcd-2.etcd-headless:2379 (prefix /safemode/); not contacted".into(),
                "modes: 12, runbooks: 6 ".into(),
                "tokens: 1 from the tokens file".into(),
                "signing key ed25519:".into(),
                "check passed: nothing was bound, opened or written".into(),
            ],
            vec![],
        ),
        (
            "all-on",
            vec![
                format!("would serve on [::]:7443 as replica {POD_NAME}"),
                format!("the other replicas reach it at [{POD_IPV6}]:7443 ("),
                "HTTP: /healthz, /readyz, /metrics and the console on [::]:9090 over HTTPS with the gRPC certificate (ALPN h2, http/1.1)".into(),
                "store: etcd at https://etcd-0.etcd-headless.etcd.svc:2379,https://etcd-1.etcd-headless.etcd.svc:2379,https://etcd-2.etcd-headless.etcd.svc:2379 (prefix /safemode-prod/, TLS); not contacted".into(),
                "modes: 2, runbooks: 1 ".into(),
                "tokens: 1 from the tokens file".into(),
                "gRPC: TLS".into(),
                "signing key ed25519:".into(),
                "check passed: nothing was bound, opened or written".into(),
            ],
            vec![
                "of a 20s lease), checking their certificates for safemode-prod.incident.svc\n",
                "; 1 more trusted key(s)\n",
            ],
        ),
    ];
    let secrets = Secrets::new("safemode-prod.incident.svc");
    for (case, lines, says) in &cases {
        let render = Render::of(case);
        let pod = Pod::new(&render, &secrets, &[]);
        let output = pod.check();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{case}: {:?}\n{stdout}{stderr}",
            pod.args
        );
        assert!(stderr.is_empty(), "{case}: {stderr}");
        for line in lines {
            assert!(
                stdout.lines().any(|l| l.starts_with(line.as_str())),
                "{case}: {line:?} not in\n{stdout}"
            );
        }
        for part in says {
            assert!(stdout.contains(part), "{case}: {part:?} not in\n{stdout}");
        }
    }

    // The check fails on what a pod would lack: a Secret without a key the
    // arguments name, one line, exit 1.
    let refusals: [(&str, (&str, &str), &str); 4] = [
        ("default", ("tokens", "tokens.yaml"), "tokens/tokens.yaml"),
        ("default", ("signing", "signing.key"), "signing/signing.key"),
        ("all-on", ("tls", "tls.key"), "tls/tls.key"),
        ("all-on", ("etcd-tls", "ca.crt"), "etcd-tls/ca.crt"),
    ];
    for (case, missing, says) in refusals {
        let render = Render::of(case);
        let pod = Pod::new(&render, &secrets, &[missing]);
        let output = pod.check();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{case} without {missing:?}: {stdout}{stderr}"
        );
        assert!(stdout.is_empty(), "{case} without {missing:?}: {stdout}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{case} without {missing:?}: {stderr}"
        );
        assert!(
            stderr.contains(says),
            "{case} without {missing:?}: {stderr}"
        );
    }
}

// === The image ===

#[test]
fn dockerfile_builds_the_binary_the_chart_runs_as_the_chart_s_user() {
    // Docker is not needed to read what the image will be: the binary the
    // build names is this package's, the entrypoint runs it, and the user
    // is the chart's runAsUser, so the restricted securityContext holds.
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let lines: Vec<&str> = dockerfile
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    let froms: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "a multi-stage build: {froms:?}");
    let holds = [
        format!(
            "RUN cargo build --release --locked -p {} --bin safemode",
            env!("CARGO_PKG_NAME")
        ),
        "USER 65532:65532".to_string(),
        "ENTRYPOINT [\"/usr/local/bin/safemode\"]".to_string(),
    ];
    for part in holds {
        assert!(
            lines.iter().any(|l| l.starts_with(&part)),
            "Dockerfile: no line starts with {part:?}"
        );
    }
    assert!(
        froms[1].ends_with(":nonroot"),
        "the runtime image runs as non-root: {}",
        froms[1]
    );
    let ignored = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    for path in ["target/", ".git/"] {
        assert!(
            ignored.lines().any(|l| l == path),
            ".dockerignore lacks {path}"
        );
    }
}
