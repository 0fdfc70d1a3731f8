//! The Istio and Envoy Gateway manifests under envoy/: CRD schemas (from
//! envoy/crds), the filter's own config validation, and the wiring between
//! the resources (cluster names, secrets, selectors, targets).

// Test helpers fail loudly (as the repository's other test files do).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use dialtone_deploy::k8s::{self, Doc, Schemas};
use serde_json::{json, Value};

fn root() -> PathBuf {
    dialtone_deploy::root().unwrap()
}

fn schemas() -> Schemas {
    Schemas::load(&root().join("envoy/crds")).unwrap()
}

fn docs(dir: &str) -> Vec<Doc> {
    let d = k8s::load_dir(&root().join(dir)).unwrap();
    assert!(!d.is_empty(), "no manifests in {dir}");
    d
}

fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Doc {
    docs.iter().find(|d| d.kind() == kind && d.name() == name).unwrap_or_else(|| {
        panic!("no {kind} {name} among {:?}", docs.iter().map(|d| d.to_string()).collect::<Vec<_>>())
    })
}

fn only<'a>(docs: &'a [Doc], kind: &str) -> &'a Doc {
    let v: Vec<&Doc> = docs.iter().filter(|d| d.kind() == kind).collect();
    assert_eq!(v.len(), 1, "expected exactly one {kind}");
    v[0]
}

fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or_else(|| panic!("no string at {ptr} in {v}"))
}

/// policy/demo.json with the parts a deployment must change blanked out.
fn normalized(cfg: &Value) -> Value {
    let mut c = cfg.clone();
    for p in ["cluster", "authority"] {
        c["credits_service"].as_object_mut().unwrap().remove(p);
    }
    for p in ["app_id", "verification_key", "jwks"] {
        c["privy"].as_object_mut().unwrap().remove(p);
    }
    c
}

fn demo_policy() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("policy/demo.json")).unwrap()).unwrap()
}

fn errors(doc: &Doc) -> Vec<String> {
    k8s::validate_doc(&schemas(), doc)
}

/// A secret the filter reads from its VM environment.
struct FilterSecret {
    /// The environment variable (the same name in the container env, the
    /// VM env list and the Secret's one key).
    env: &'static str,
    /// The Kubernetes Secret holding it, one per secret.
    secret: &'static str,
    /// A value of the shape its creation command makes, which the filter accepts.
    example: &'static str,
}

/// Every secret, carried the same way: its own Secret -> the proxy
/// container's env (`secretKeyRef`) -> the VM (`valueFrom: HOST` /
/// `env.hostKeys`), in this order everywhere. Another secret is one more row
/// (and its check in [`filter_load`]).
const SECRETS: &[FilterSecret] = &[
    FilterSecret {
        env: "DIAL_ADMIN_API_KEY",
        secret: "dialtone-admin-key",
        example: "dial_admin_0123456789abcdef0123456789abcdef0123456789abcdef",
    },
    FilterSecret {
        env: dialtone::cache::SHARED_SECRET_ENV,
        secret: "dialtone-shared-cache-secret",
        example: "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    },
];

/// What the filter's `on_configure` does with its VM environment
/// (src/filter.rs, wasm32 only, hence restated here with the same library
/// calls): the shared-cache secret, then the policy with the admin key. The
/// error reads as the filter logs it after "invalid plugin configuration: ".
fn filter_load(cfg: &Value, env: &[(&str, &str)]) -> Result<(), String> {
    let get = |name: &str| env.iter().find(|(n, _)| *n == name).map(|&(_, v)| v);
    dialtone::cache::SlotKey::from_env(get(dialtone::cache::SHARED_SECRET_ENV)).map_err(|e| format!("env {e}"))?;
    k8s::check_plugin_config(cfg, get("DIAL_ADMIN_API_KEY")).map(|_| ())
}

/// The proxy container's env entries that carry every secret from its Secret.
fn secret_env_entries() -> Value {
    SECRETS
        .iter()
        .map(|x| json!({"name": x.env, "valueFrom": {"secretKeyRef": {"name": x.secret, "key": x.env}}}))
        .collect()
}

/// Every secret's Secret is in `namespace` and holds that one key.
fn assert_secrets_in(d: &[Doc], namespace: &str) {
    for x in SECRETS {
        let secret = find(d, "Secret", x.secret);
        assert_eq!(secret.namespace(), namespace, "{secret}");
        assert_eq!(secret.value["type"], "Opaque", "{secret}");
        let keys: Vec<&String> = secret.value["stringData"].as_object().unwrap().keys().collect();
        assert_eq!(keys, [x.env], "{secret}: one key, named after the variable");
    }
}

// --- (a) schemas -------------------------------------------------------------

#[test]
fn every_manifest_validates_against_its_crd_schema() {
    let schemas = schemas();
    for dir in ["envoy/istio", "envoy/gateway"] {
        for doc in docs(dir) {
            let errs = k8s::validate_doc(&schemas, &doc);
            assert!(errs.is_empty(), "{doc}:\n{}", errs.join("\n"));
        }
    }
}

#[test]
fn stored_crds_cover_every_custom_kind_used() {
    let schemas = schemas();
    for (av, kind) in [
        ("extensions.istio.io/v1alpha1", "WasmPlugin"),
        ("gateway.envoyproxy.io/v1alpha1", "EnvoyExtensionPolicy"),
        ("gateway.envoyproxy.io/v1alpha1", "EnvoyPatchPolicy"),
        ("gateway.envoyproxy.io/v1alpha1", "EnvoyProxy"),
        ("gateway.networking.k8s.io/v1", "HTTPRoute"),
        ("gateway.networking.k8s.io/v1", "Gateway"),
    ] {
        let schema = schemas.get(av, kind).unwrap_or_else(|| panic!("no CRD for {av} {kind}"));
        assert!(jsonschema::draft4::new(schema).is_ok(), "{av} {kind} schema does not compile");
    }
    for dir in ["envoy/istio", "envoy/gateway"] {
        for doc in docs(dir) {
            let builtin = k8s::BUILTIN_KINDS.contains(&(doc.api_version(), doc.kind()));
            assert!(builtin || schemas.get(doc.api_version(), doc.kind()).is_some(), "{doc}: no schema");
        }
    }
}

// --- (b) the filter's own validation -----------------------------------------

#[test]
fn embedded_plugin_configs_pass_the_filter_validation() {
    let mut seen = 0;
    for dir in ["envoy/istio", "envoy/gateway"] {
        for doc in docs(dir) {
            for (at, cfg) in k8s::plugin_configs(&doc) {
                seen += 1;
                if let Err(e) = k8s::check_plugin_config(&cfg, None) {
                    panic!("{doc}: {at}: invalid plugin configuration: {e}");
                }
                // Same policy as the local demo, apart from what a deployment must set.
                assert_eq!(normalized(&cfg), normalized(&demo_policy()), "{doc}: {at} drifted from policy/demo.json");
            }
        }
    }
    assert_eq!(seen, 2, "one WasmPlugin and one EnvoyExtensionPolicy config");
}

#[test]
fn placeholder_secrets_are_refused_by_the_filter() {
    // An unchanged Secret must fail closed, never become a known admin key
    // or a known key for the shared token slots.
    for (dir, plugin_kind) in [("envoy/istio", "WasmPlugin"), ("envoy/gateway", "EnvoyExtensionPolicy")] {
        let d = docs(dir);
        let (_, cfg) = k8s::plugin_configs(only(&d, plugin_kind)).remove(0);
        let real: Vec<(&str, &str)> = SECRETS.iter().map(|x| (x.env, x.example)).collect();
        // Real values are accepted ...
        filter_load(&cfg, &real).unwrap();
        for x in SECRETS {
            let secret = find(&d, "Secret", x.secret);
            let placeholder = s(&secret.value, &format!("/stringData/{}", x.env));
            // ... and each placeholder is refused, whatever the others hold.
            let env: Vec<(&str, &str)> =
                real.iter().map(|&(n, v)| (n, if n == x.env { placeholder } else { v })).collect();
            let err = filter_load(&cfg, &env).unwrap_err();
            assert!(err.contains(x.env), "{secret}: {err}");
        }
    }
}

#[test]
fn the_shared_cache_secret_is_optional_but_never_short() {
    let d = docs("envoy/istio");
    let (_, cfg) = k8s::plugin_configs(only(&d, "WasmPlugin")).remove(0);
    let env = dialtone::cache::SHARED_SECRET_ENV;
    // Unset or empty: sharing off, the plugin loads.
    filter_load(&cfg, &[]).unwrap();
    filter_load(&cfg, &[(env, "")]).unwrap();
    // `openssl rand -hex 32` (64 characters) and the bare minimum load; one
    // character less is refused with the message the docs quote.
    filter_load(&cfg, &[(env, &"a".repeat(64))]).unwrap();
    filter_load(&cfg, &[(env, &"a".repeat(32))]).unwrap();
    assert_eq!(
        filter_load(&cfg, &[(env, &"a".repeat(31))]).unwrap_err(),
        "env DIAL_SHARED_CACHE_SECRET must be at least 32 characters"
    );
}

/// Every `vm_config` object under `v`.
fn vm_configs_in<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Object(m) => {
            if let Some(vm) = m.get("vm_config") {
                out.push(vm);
            }
            m.values().for_each(|c| vm_configs_in(c, out));
        }
        Value::Array(a) => a.iter().for_each(|c| vm_configs_in(c, out)),
        _ => {}
    }
}

/// The plain-Envoy bootstrap gives its one VM an id of its own and every
/// secret the Kubernetes manifests carry (it may carry a newer one first).
#[test]
fn the_plain_envoy_bootstrap_passes_these_secrets_to_its_own_vm_id() {
    let path = root().join("envoy/envoy-static.yaml");
    let d = k8s::parse_docs(&path, &std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut vm_configs = Vec::new();
    vm_configs_in(&d[0].value, &mut vm_configs);
    assert_eq!(vm_configs.len(), 1, "one Wasm VM");
    let vm = vm_configs[0];
    assert_eq!(vm["vm_id"], "dialtone");
    let keys = vm["environment_variables"]["host_env_keys"].as_array().unwrap();
    for x in SECRETS {
        assert!(keys.contains(&json!(x.env)), "{} not in host_env_keys {keys:?}", x.env);
    }
}

// --- wiring --------------------------------------------------------------------

#[test]
fn istio_wasmplugin_is_wired_to_the_workload_the_secrets_and_the_credits_service() {
    let d = docs("envoy/istio");
    let wp = &only(&d, "WasmPlugin").value;
    assert_eq!(s(wp, "/spec/phase"), "AUTHN");
    assert_eq!(s(wp, "/spec/failStrategy"), "FAIL_CLOSE");
    assert!(s(wp, "/spec/url").starts_with("oci://"));
    assert_eq!(s(wp, "/spec/sha256").len(), 64);
    let vm_env: Vec<Value> = SECRETS.iter().map(|x| json!({"name": x.env, "valueFrom": "HOST"})).collect();
    assert_eq!(wp["spec"]["vmConfig"]["env"], json!(vm_env));

    // The credits cluster is Istio's name for the `credits` Service port.
    let svc = find(&d, "Service", "credits");
    let port = svc.value["spec"]["ports"][0]["port"].as_u64().unwrap();
    let fqdn = format!("{}.{}.svc.cluster.local", svc.name(), svc.namespace());
    assert_eq!(s(wp, "/spec/pluginConfig/credits_service/cluster"), format!("outbound|{port}||{fqdn}"));
    assert_eq!(s(wp, "/spec/pluginConfig/credits_service/authority"), fqdn);

    // The selector picks the Deployment's pods, and the matched port is theirs.
    let deploy = only(&d, "Deployment");
    let labels = &deploy.value["spec"]["template"]["metadata"]["labels"];
    for (k, v) in wp["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "selector label {k}");
    }
    let containers = deploy.value["spec"]["template"]["spec"]["containers"].as_array().unwrap();
    let match_port = &wp["spec"]["match"][0]["ports"][0]["number"];
    assert!(containers.iter().any(|c| c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|p| &p["containerPort"] == match_port)));
    assert_eq!(deploy.namespace(), wp["metadata"]["namespace"].as_str().unwrap());

    // The `istio-proxy` container feeds each Secret into the sidecar's
    // environment, from the Deployment's namespace.
    let proxy = containers.iter().find(|c| c["name"] == "istio-proxy").expect("istio-proxy container");
    assert_eq!(proxy["image"], "auto");
    assert_eq!(proxy["env"], secret_env_entries());
    assert_secrets_in(&d, deploy.namespace());
}

#[test]
fn envoy_gateway_policy_is_wired_to_the_route_the_cluster_and_the_secrets() {
    let d = docs("envoy/gateway");
    let eep = &only(&d, "EnvoyExtensionPolicy").value;
    // dialtone alone in the list: Envoy Gateway's VM id for an entry is
    // envoyextensionpolicy/<ns>/<policy>/wasm/<index>, and shared data is per VM id.
    assert_eq!(eep["spec"]["wasm"].as_array().unwrap().len(), 1);
    let w = &eep["spec"]["wasm"][0];
    assert_eq!(w["failOpen"], json!(false));
    assert_eq!(s(w, "/code/type"), "Image");
    assert_eq!(s(w, "/code/image/sha256").len(), 64);
    let host_keys: Vec<&str> = SECRETS.iter().map(|x| x.env).collect();
    assert_eq!(w["env"]["hostKeys"], json!(host_keys));

    // Targets the HTTPRoute, which routes to the demo API via the Gateway.
    let target = &eep["spec"]["targetRefs"][0];
    assert_eq!(target["kind"], "HTTPRoute");
    let route = find(&d, "HTTPRoute", s(target, "/name"));
    let gw = find(&d, "Gateway", s(&route.value, "/spec/parentRefs/0/name"));
    find(&d, "Service", s(&route.value, "/spec/rules/0/backendRefs/0/name"));

    // The cluster the config names is the one the EnvoyPatchPolicy adds, on the same Gateway.
    let epp = &only(&d, "EnvoyPatchPolicy").value;
    assert_eq!(s(epp, "/spec/targetRef/name"), gw.name());
    let patch = &epp["spec"]["jsonPatches"][0];
    assert_eq!(s(patch, "/type"), "type.googleapis.com/envoy.config.cluster.v3.Cluster");
    assert_eq!(s(patch, "/operation/op"), "add");
    assert_eq!(s(patch, "/operation/path"), "");
    let cluster = &patch["operation"]["value"];
    assert_eq!(s(w, "/config/credits_service/cluster"), s(cluster, "/name"));
    assert_eq!(s(patch, "/name"), s(cluster, "/name"));
    let svc = find(&d, "Service", "credits");
    let fqdn = format!("{}.{}.svc.cluster.local", svc.name(), svc.namespace());
    let addr = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
    assert_eq!(s(addr, "/address"), fqdn);
    assert_eq!(addr["port_value"], svc.value["spec"]["ports"][0]["port"]);
    assert_eq!(s(w, "/config/credits_service/authority"), fqdn);

    // The secrets: Gateway -> EnvoyProxy -> env from Secrets in the Envoy pods' namespace.
    let pref = &gw.value["spec"]["infrastructure"]["parametersRef"];
    let ep = find(&d, "EnvoyProxy", s(pref, "/name"));
    assert_eq!(ep.namespace(), gw.namespace());
    let env = &ep.value["spec"]["provider"]["kubernetes"]["envoyDeployment"]["container"]["env"];
    assert_eq!(env, &secret_env_entries());
    assert_secrets_in(&d, "envoy-gateway-system");
}

// --- (c) negative: the checks do reject mistakes -----------------------------

fn mutated(dir: &str, kind: &str, f: impl FnOnce(&mut Value)) -> Doc {
    let d = docs(dir);
    let mut doc = only(&d, kind).clone();
    f(&mut doc.value);
    doc
}

#[test]
fn misspelled_manifest_fields_are_rejected() {
    let cases: Vec<(Doc, &str)> = vec![
        (
            mutated("envoy/istio", "WasmPlugin", |v| {
                let spec = v["spec"].as_object_mut().unwrap();
                let fs = spec.remove("failStrategy").unwrap();
                spec.insert("failStrategey".into(), fs);
            }),
            "failStrategey",
        ),
        (
            mutated("envoy/istio", "WasmPlugin", |v| v["spec"]["vmConfig"]["env"][0]["valueFrom"] = json!("SECRET")),
            "SECRET",
        ),
        (mutated("envoy/istio", "WasmPlugin", |v| v["spec"]["phase"] = json!("AUTHENTICATION")), "AUTHENTICATION"),
        (
            mutated("envoy/gateway", "EnvoyExtensionPolicy", |v| {
                let w = v["spec"]["wasm"][0].as_object_mut().unwrap();
                let fo = w.remove("failOpen").unwrap();
                w.insert("failopen".into(), fo);
            }),
            "failopen",
        ),
        (
            mutated("envoy/gateway", "EnvoyExtensionPolicy", |v| {
                v["spec"]["wasm"][0]["code"]["image"]["sha265"] = json!("x")
            }),
            "sha265",
        ),
        (
            mutated("envoy/gateway", "EnvoyPatchPolicy", |v| {
                v["spec"]["jsonPatches"][0]["operation"]["op"] = json!("insert")
            }),
            "insert",
        ),
        (
            mutated("envoy/gateway", "HTTPRoute", |v| v["spec"]["rules"][0]["backendRefs"][0]["prot"] = json!(8080)),
            "prot",
        ),
        (mutated("envoy/istio", "WasmPlugin", |v| v["metadata"]["nmae"] = json!("x")), "nmae"),
    ];
    for (doc, needle) in cases {
        let errs = errors(&doc);
        assert!(errs.iter().any(|e| e.contains(needle)), "{doc}: {needle:?} not reported: {errs:?}");
    }
}

#[test]
fn misspelled_field_in_yaml_text_is_rejected() {
    let path = root().join("envoy/istio/30-wasmplugin.yaml");
    let text = std::fs::read_to_string(&path).unwrap().replace("imagePullPolicy:", "imagePulPolicy:");
    let d = k8s::parse_docs(&path, &text).unwrap();
    let errs = errors(&d[0]);
    assert!(errs.iter().any(|e| e.contains("imagePulPolicy")), "{errs:?}");
}

#[test]
fn unknown_plugin_config_fields_are_rejected() {
    for (dir, kind, ptr) in [
        ("envoy/istio", "WasmPlugin", "/spec/pluginConfig/routes/0"),
        ("envoy/gateway", "EnvoyExtensionPolicy", "/spec/wasm/0/config/routes/0"),
    ] {
        let doc = mutated(dir, kind, |v| {
            v.pointer_mut(ptr).unwrap().as_object_mut().unwrap().insert("cots".into(), json!(1));
        });
        // The CRD schema lets it through (free-form object) ...
        assert!(errors(&doc).is_empty(), "{doc}");
        // ... the filter's validation does not.
        let (_, cfg) = k8s::plugin_configs(&doc).remove(0);
        let err = k8s::check_plugin_config(&cfg, None).unwrap_err();
        assert!(err.contains("$.routes[0].cots") && err.contains("unknown field"), "{err}");
    }
}

#[test]
fn check_dirs_reports_both_kinds_of_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join("envoy/istio/30-wasmplugin.yaml"))
        .unwrap()
        .replace("  failStrategy: FAIL_CLOSE", "  failStrategy: FAIL_CLOSE\n  failStratgy: FAIL_OPEN")
        .replace("      cost: 1\n", "      cost: 1\n      cots: 1\n");
    std::fs::write(tmp.path().join("w.yaml"), text).unwrap();
    let (n, problems) = k8s::check_dirs(&root().join("envoy/crds"), &[tmp.path().to_path_buf()]).unwrap();
    assert_eq!(n, 1);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("failStratgy"));
    assert!(problems[1].contains("invalid plugin configuration") && problems[1].contains("cots"));
}

// --- the schema translation ----------------------------------------------------

#[test]
fn translation_of_kubernetes_extensions() {
    let schema = k8s::translate(&json!({
        "type": "object",
        "properties": {
            "port": {"x-kubernetes-int-or-string": true, "anyOf": [{"type": "integer"}, {"type": "string"}]},
            "bare": {"x-kubernetes-int-or-string": true},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            "untyped": {"x-kubernetes-preserve-unknown-fields": true},
            "opt": {"type": "integer", "nullable": true, "format": "int32"},
            "closed": {"type": "object", "properties": {"a": {"type": "string"}}, "x-kubernetes-validations": [{"rule": "true"}]},
            "map": {"type": "object", "additionalProperties": {"type": "string"}}
        }
    }));
    let v = jsonschema::draft4::new(&schema).unwrap();
    let ok = json!({"port": 80, "bare": "http", "free": {"any": {"thing": 1}}, "untyped": [1, "x"], "opt": null,
                    "closed": {"a": "x"}, "map": {"k": "v"}});
    assert!(v.is_valid(&ok));
    for bad in [
        json!({"port": true}),
        json!({"bare": 1.5}),
        json!({"closed": {"b": "x"}}),
        json!({"map": {"k": 1}}),
        json!({"unknown": 1}),
        json!({"opt": "1"}),
    ] {
        assert!(!v.is_valid(&bad), "{bad} accepted");
    }
}
