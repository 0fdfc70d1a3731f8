//! `envoy --mode validate` on the local bootstrap (envoy/envoy.yaml.tmpl as
//! `make run` renders it) and on envoy/envoy-static.yaml. Envoy 1.40 loads
//! the .wasm in this mode and runs the filter's `on_configure`, so these also
//! prove the real filter accepts each configuration. Missing Envoy or .wasm
//! is a failure, not a skip (`make envoy`, `make wasm`).

// Test helpers fail loudly (as the repository's other test files do).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use dialtone_deploy::{envoy_validate, envoy_validate_env, k8s, EnvoyValidation};
use dialtone_devstack::{demo_plugin_config, render_envoy, tokens, Ports};
use serde_json::{json, Value};

const ADMIN_KEY: &str = "dial_admin_0123456789abcdef0123456789abcdef";
/// Real-shaped values of the filter's other secrets (`openssl rand -hex 32`).
const SHARED_CACHE_SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const SERVICE_KEY: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

/// Every secret of the filter, as a deployment sets them.
fn all_secrets() -> Vec<(&'static str, &'static str)> {
    vec![
        ("DIAL_ADMIN_API_KEY", ADMIN_KEY),
        ("DIAL_SHARED_CACHE_SECRET", SHARED_CACHE_SECRET),
        ("DIAL_SERVICE_KEY", SERVICE_KEY),
    ]
}

fn root() -> PathBuf {
    dialtone_deploy::root().unwrap()
}

fn envoy() -> PathBuf {
    dialtone_deploy::envoy_bin(&root())
}

fn wasm() -> PathBuf {
    let w = dialtone_deploy::built_wasm(&root());
    assert!(w.exists(), "the filter .wasm is not built at {}: run `make wasm`", w.display());
    w
}

fn validate(config: &Path, admin_key: Option<&str>) -> EnvoyValidation {
    envoy_validate(&envoy(), config, admin_key).unwrap()
}

fn validate_env(config: &Path, env: &[(&str, &str)]) -> EnvoyValidation {
    envoy_validate_env(&envoy(), config, env).unwrap()
}

/// The bootstrap YAML as JSON.
fn yaml_file(path: &Path) -> Value {
    serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(&std::fs::read_to_string(path).unwrap()).unwrap())
        .unwrap()
}

/// The plugin configuration of a bootstrap's one Wasm filter.
fn bootstrap_plugin_config(y: &Value) -> Value {
    let wasm_filter =
        &y["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0];
    serde_json::from_str(wasm_filter["typed_config"]["config"]["configuration"]["value"].as_str().unwrap()).unwrap()
}

/// Every cluster a plugin configuration sends callouts to: the key/credits
/// service, the x402 facilitator, the JWKS host.
fn callout_clusters(cfg: &Value) -> Vec<String> {
    ["/credits_service/cluster", "/x402_facilitator/cluster", "/privy/jwks_fetch/cluster"]
        .iter()
        .filter_map(|p| cfg.pointer(p).and_then(Value::as_str).map(str::to_owned))
        .collect()
}

/// Each callout cluster of the bootstrap's policy is one of its clusters
/// (a callout to a missing one fails every paid request with 503).
fn assert_callout_clusters_defined(y: &Value, what: &str) -> Vec<String> {
    let cfg = bootstrap_plugin_config(y);
    let defined: Vec<&str> =
        y["static_resources"]["clusters"].as_array().unwrap().iter().filter_map(|c| c["name"].as_str()).collect();
    let wanted = callout_clusters(&cfg);
    for c in &wanted {
        assert!(defined.contains(&c.as_str()), "{what}: the policy calls cluster {c:?}, not among {defined:?}");
    }
    wanted
}

fn ports() -> Ports {
    // Validation binds nothing.
    Ports { listen: 10000, admin: 9901, credits: 8081, upstream: 8082, facilitator: 4022, self_service: 8083 }
}

fn render(dir: &Path, name: &str, plugin_config: &Value) -> PathBuf {
    let template = std::fs::read_to_string(root().join("envoy/envoy.yaml.tmpl")).unwrap();
    let yaml = render_envoy(&template, &ports(), &wasm(), plugin_config).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    path
}

fn dev_config(dir: &Path) -> Value {
    let key = tokens::load_or_create_key(&dir.join("dev-signing-key.pem")).unwrap();
    demo_plugin_config(&root(), &tokens::public_pem(&key).unwrap()).unwrap()
}

fn assert_ok(v: &EnvoyValidation, what: &str) {
    assert!(v.ok, "{what}: envoy --mode validate failed:\n{}", v.output);
    // The filter itself ran its configuration check and accepted it.
    assert!(v.output.contains("configured 6 routes"), "{what}: the filter did not configure:\n{}", v.output);
}

#[test]
fn missing_envoy_is_an_error_not_a_skip() {
    let e = envoy_validate(Path::new("/nonexistent/envoy"), Path::new("x.yaml"), None).unwrap_err();
    assert!(e.contains("make envoy"), "{e}");
}

#[test]
fn rendered_local_bootstrap_validates() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = dev_config(tmp.path());
    let path = render(tmp.path(), "envoy.yaml", &cfg);
    assert_ok(&validate(&path, Some(ADMIN_KEY)), "rendered envoy.yaml.tmpl");
    // No admin key in the environment is fine too (the key is optional).
    assert_ok(&validate(&path, None), "rendered envoy.yaml.tmpl without admin key");
}

#[test]
fn rendered_local_bootstrap_defines_every_cluster_its_policy_calls() {
    let tmp = tempfile::tempdir().unwrap();
    let path = render(tmp.path(), "envoy.yaml", &dev_config(tmp.path()));
    let wanted = assert_callout_clusters_defined(&yaml_file(&path), "rendered envoy.yaml.tmpl");
    assert!(wanted.contains(&"x402_facilitator".to_owned()), "{wanted:?}");
    // The facilitator cluster is the local x402 stack's port.
    let y = yaml_file(&path);
    let c =
        y["static_resources"]["clusters"].as_array().unwrap().iter().find(|c| c["name"] == "x402_facilitator").unwrap();
    let addr = &c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
    assert_eq!(addr["port_value"], json!(ports().facilitator));
}

#[test]
fn invalid_plugin_config_fails_validation_with_the_filter_log_line() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = dev_config(tmp.path());
    cfg["routes"][0]["cots"] = json!(1);
    let v = validate(&render(tmp.path(), "bad.yaml", &cfg), Some(ADMIN_KEY));
    assert!(!v.ok, "accepted:\n{}", v.output);
    assert!(v.output.contains("invalid plugin configuration: $.routes[0].cots: unknown field"), "{}", v.output);
}

fn static_bootstrap(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(root().join("envoy/envoy-static.yaml")).unwrap();
    assert_eq!(
        text.matches("/etc/envoy/dialtone.wasm").count(),
        2,
        "the .wasm path appears in the header and in vm_config"
    );
    let text =
        text.replace("filename: /etc/envoy/dialtone.wasm", &format!("filename: {:?}", wasm().display().to_string()));
    let path = dir.join("envoy-static.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn static_bootstrap_validates() {
    let tmp = tempfile::tempdir().unwrap();
    let path = static_bootstrap(tmp.path());
    assert_ok(&validate(&path, Some(ADMIN_KEY)), "envoy/envoy-static.yaml");
    // With every secret set, as its header's "Run:" line says.
    assert_ok(&validate_env(&path, &all_secrets()), "envoy/envoy-static.yaml with every secret");
}

#[test]
fn static_bootstrap_defines_every_cluster_its_policy_calls() {
    let y = yaml_file(&root().join("envoy/envoy-static.yaml"));
    let wanted = assert_callout_clusters_defined(&y, "envoy/envoy-static.yaml");
    assert_eq!(wanted, ["dialtone_credits", "x402_facilitator"]);
    // The facilitator is the local reference one (scripts/x402-stack.sh's
    // default port), as the header's port list says.
    let c =
        y["static_resources"]["clusters"].as_array().unwrap().iter().find(|c| c["name"] == "x402_facilitator").unwrap();
    let addr = &c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
    assert_eq!((addr["address"].as_str(), addr["port_value"].as_u64()), (Some("127.0.0.1"), Some(4022)));
    let text = std::fs::read_to_string(root().join("envoy/envoy-static.yaml")).unwrap();
    assert!(text.contains("#   facilitator  127.0.0.1:4022"), "the header lists the facilitator's port");
}

#[test]
fn static_bootstrap_config_is_the_demo_policy() {
    let text = std::fs::read_to_string(root().join("envoy/envoy-static.yaml")).unwrap();
    let y: Value = serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(&text).unwrap()).unwrap();
    let wasm_filter =
        &y["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0];
    let value = wasm_filter["typed_config"]["config"]["configuration"]["value"].as_str().unwrap();
    let cfg: Value = serde_json::from_str(value).unwrap();
    k8s::check_plugin_config(&cfg, None).unwrap();
    let mut demo: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("policy/demo.json")).unwrap()).unwrap();
    let mut got = cfg.clone();
    for c in [&mut demo, &mut got] {
        let p = c["privy"].as_object_mut().unwrap();
        p.remove("app_id");
        p.remove("verification_key");
    }
    assert_eq!(got, demo, "envoy-static.yaml drifted from policy/demo.json");
    assert_eq!(wasm_filter["typed_config"]["config"]["fail_open"], json!(false));
}

#[test]
fn placeholder_admin_key_makes_envoy_refuse_the_plugin() {
    // The Secrets' placeholder value, as the env var: fail closed at load.
    let tmp = tempfile::tempdir().unwrap();
    let v = validate(&static_bootstrap(tmp.path()), Some("CHANGE-ME"));
    assert!(!v.ok, "accepted:\n{}", v.output);
    assert!(v.output.contains("invalid plugin configuration: env DIAL_ADMIN_API_KEY"), "{}", v.output);
}

#[test]
fn short_service_key_makes_envoy_refuse_the_plugin_and_a_real_one_loads() {
    // The Secrets' placeholder, then one character short of the minimum: the
    // real filter refuses its configuration with the line the docs quote.
    let tmp = tempfile::tempdir().unwrap();
    let path = static_bootstrap(tmp.path());
    for short in ["CHANGE-ME".to_owned(), "k".repeat(31)] {
        let v = validate_env(&path, &[("DIAL_ADMIN_API_KEY", ADMIN_KEY), ("DIAL_SERVICE_KEY", &short)]);
        assert!(!v.ok, "accepted a {}-character service key:\n{}", short.len(), v.output);
        assert!(
            v.output.contains("invalid plugin configuration: env DIAL_SERVICE_KEY must be at least 32 characters"),
            "{}",
            v.output
        );
    }
    // Exactly 32 loads; unset loads too, with the warning that callouts carry no key.
    assert_ok(&validate_env(&path, &[("DIAL_SERVICE_KEY", &"k".repeat(32))]), "32-character service key");
    let v = validate_env(&path, &[]);
    assert_ok(&v, "no service key");
    assert!(v.output.contains("DIAL_SERVICE_KEY is not set"), "{}", v.output);
}

#[test]
fn istio_and_gateway_plugin_configs_load_in_the_real_filter() {
    let tmp = tempfile::tempdir().unwrap();
    for (dir, kind) in [("envoy/istio", "WasmPlugin"), ("envoy/gateway", "EnvoyExtensionPolicy")] {
        let docs = k8s::load_dir(&root().join(dir)).unwrap();
        let doc = docs.iter().find(|d| d.kind() == kind).unwrap();
        let (_, cfg) = k8s::plugin_configs(doc).remove(0);
        let path = render(tmp.path(), &format!("{kind}.yaml"), &cfg);
        assert_ok(&validate(&path, Some(ADMIN_KEY)), kind);
        // With every secret the manifests carry, as a deployment sets them.
        assert_ok(&validate_env(&path, &all_secrets()), kind);
    }
}

#[test]
fn envoy_patch_policy_cluster_is_valid_envoy_config() {
    let docs = k8s::load_dir(&root().join("envoy/gateway")).unwrap();
    let epp = docs.iter().find(|d| d.kind() == "EnvoyPatchPolicy").unwrap();
    let clusters: Vec<Value> = epp.value["spec"]["jsonPatches"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "type.googleapis.com/envoy.config.cluster.v3.Cluster")
        .map(|p| p["operation"]["value"].clone())
        .collect();
    assert!(!clusters.is_empty());
    // JSON is YAML: a bootstrap holding just these clusters.
    let bootstrap = json!({"static_resources": {"clusters": clusters}});
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("clusters.yaml");
    std::fs::write(&path, serde_json::to_string_pretty(&bootstrap).unwrap()).unwrap();
    let v = validate(&path, None);
    assert!(v.ok, "{}", v.output);
    // And a broken cluster is refused, so the check means something.
    let mut bad = bootstrap.clone();
    bad["static_resources"]["clusters"][0]["type"] = json!("STRICT_DSN");
    std::fs::write(&path, serde_json::to_string_pretty(&bad).unwrap()).unwrap();
    assert!(!validate(&path, None).ok);
}
