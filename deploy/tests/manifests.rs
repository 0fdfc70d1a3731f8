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

/// The one `kind` named `namespace`/`name`.
fn find_in<'a>(docs: &'a [Doc], kind: &str, namespace: &str, name: &str) -> &'a Doc {
    let v: Vec<&Doc> =
        docs.iter().filter(|d| d.kind() == kind && d.namespace() == namespace && d.name() == name).collect();
    assert_eq!(v.len(), 1, "expected exactly one {kind} {namespace}/{name}");
    v[0]
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

/// policy/demo.json with the parts a deployment must change blanked out:
/// where the callouts go, the Privy app, and the chain x402 is paid on
/// (the demo's is the local test chain, the manifests' a public test network).
fn normalized(cfg: &Value) -> Value {
    let mut c = cfg.clone();
    for p in ["cluster", "authority"] {
        c["credits_service"].as_object_mut().unwrap().remove(p);
    }
    for p in ["cluster", "authority", "verify_path", "settle_path"] {
        c["x402_facilitator"].as_object_mut().expect("x402_facilitator").remove(p);
    }
    for p in ["app_id", "verification_key", "jwks"] {
        c["privy"].as_object_mut().unwrap().remove(p);
    }
    for route in c["routes"].as_array_mut().unwrap() {
        for accept in route.pointer_mut("/x402/accepts").and_then(Value::as_array_mut).into_iter().flatten() {
            for p in ["network", "asset", "payTo"] {
                accept.as_object_mut().unwrap().remove(p);
            }
        }
    }
    c
}

/// Every x402 `accepts` entry of a plugin configuration.
fn x402_accepts(cfg: &Value) -> Vec<&Value> {
    cfg["routes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.pointer("/x402/accepts").and_then(Value::as_array).into_iter().flatten())
        .collect()
}

/// The public test network the manifests' x402 requirements are on: Base
/// Sepolia and its USDC (EIP-712 domain "USDC", "2"), paid to a placeholder.
const BASE_SEPOLIA: &str = "eip155:84532";
const BASE_SEPOLIA_USDC: &str = "0x036CbD53842c5426634e7929541eC2318f3dCF7e";
const PAY_TO_PLACEHOLDER: &str = "0x000000000000000000000000000000000000dEaD";

/// The key/credits service's env entries for the service key, from the
/// Secret the proxy sends its key from: the key, and (optional, during a
/// rotation only) the previous one it also accepts.
fn service_key_entries() -> Value {
    let secret = "dialtone-service-key";
    json!([
        {"name": SERVICE_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": secret, "key": SERVICE_KEY_ENV}}},
        {"name": "DIAL_SERVICE_KEY_PREVIOUS",
         "valueFrom": {"secretKeyRef": {"name": secret, "key": "DIAL_SERVICE_KEY_PREVIOUS", "optional": true}}}
    ])
}

const SERVICE_KEY_ENV: &str = dialtone::credits_api::SERVICE_KEY_ENV;

/// The gate key of the self-service listener: Envoy's router adds it (not
/// the filter), the service demands it.
const GATE_KEY_ENV: &str = "DIAL_GATE_KEY";
const GATE_KEY_SECRET: &str = "dialtone-gate-key";

/// An env entry for the gate key, from its Secret.
fn gate_key_entry() -> Value {
    json!({"name": GATE_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": GATE_KEY_SECRET, "key": GATE_KEY_ENV}}})
}

/// The key/credits service's env entries for the gate key: the key and the
/// optional previous one (rotation).
fn gate_key_entries() -> Value {
    json!([
        gate_key_entry(),
        {"name": "DIAL_GATE_KEY_PREVIOUS",
         "valueFrom": {"secretKeyRef": {"name": GATE_KEY_SECRET, "key": "DIAL_GATE_KEY_PREVIOUS", "optional": true}}}
    ])
}

/// `a` then `b` (two JSON arrays).
fn concat(a: Value, b: Value) -> Value {
    Value::Array(a.as_array().unwrap().iter().chain(b.as_array().unwrap()).cloned().collect())
}

/// The container of the key/credits service (the one serving port 8081 that
/// is not the proxy).
fn credits_container(deploy: &Doc) -> &Value {
    let containers = deploy.value["spec"]["template"]["spec"]["containers"].as_array().unwrap();
    let v: Vec<&Value> = containers
        .iter()
        .filter(|c| c["name"] != "istio-proxy")
        .filter(|c| c["ports"].as_array().into_iter().flatten().any(|p| p["containerPort"] == 8081))
        .collect();
    assert_eq!(v.len(), 1, "{deploy}: one key/credits service container");
    v[0]
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
    FilterSecret {
        env: SERVICE_KEY_ENV,
        secret: "dialtone-service-key",
        example: "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210",
    },
];

/// What the filter's `on_configure` does with its VM environment
/// (src/filter.rs, wasm32 only, hence restated here with the same library
/// calls): the shared-cache secret, the service key, then the policy with
/// the admin key. The error reads as the filter logs it after "invalid
/// plugin configuration: " (envoy_validate.rs checks the real filter's line).
fn filter_load(cfg: &Value, env: &[(&str, &str)]) -> Result<(), String> {
    let get = |name: &str| env.iter().find(|(n, _)| *n == name).map(|&(_, v)| v);
    dialtone::cache::SlotKey::from_env(get(dialtone::cache::SHARED_SECRET_ENV)).map_err(|e| format!("env {e}"))?;
    dialtone::credits_api::service_key_from_env(get(SERVICE_KEY_ENV)).map_err(|e| format!("env {e}"))?;
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
        let secret = find_in(d, "Secret", namespace, x.secret);
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
                // Production templates: paid on a public test network, to a
                // placeholder that must be replaced (never the local chain's).
                let accepts = x402_accepts(&cfg);
                assert!(!accepts.is_empty(), "{doc}: {at}: no x402 requirements");
                for a in accepts {
                    assert_eq!(s(a, "/network"), BASE_SEPOLIA, "{doc}: {at}");
                    assert_eq!(s(a, "/asset"), BASE_SEPOLIA_USDC, "{doc}: {at}");
                    assert_eq!(s(a, "/payTo"), PAY_TO_PLACEHOLDER, "{doc}: {at}");
                    assert_eq!(
                        a["extra"],
                        json!({"name": "USDC", "version": "2"}),
                        "{doc}: {at}: Base Sepolia USDC's EIP-712 domain"
                    );
                }
            }
        }
    }
    assert_eq!(seen, 2, "one WasmPlugin and one EnvoyExtensionPolicy config");
}

#[test]
fn the_demo_policy_pays_on_the_local_chain_and_settles_top_ups_first() {
    // What `normalized` blanks out is still checked somewhere: the demo's
    // requirements are the local x402 stack's (scripts/x402-stack.sh).
    let demo = demo_policy();
    for a in x402_accepts(&demo) {
        assert_eq!(s(a, "/network"), "eip155:31337");
        assert_eq!(s(a, "/asset"), "0x5FbDB2315678afecb367f032d93F642f64180aa3");
        assert_eq!(s(a, "/payTo"), "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");
    }
    let top_up = demo["routes"].as_array().unwrap().iter().find(|r| r["name"] == "credits_top_up").unwrap();
    assert_eq!(s(top_up, "/x402/settle"), "before_upstream");
}

#[test]
fn an_x402_route_without_a_facilitator_is_refused() {
    // The filter does not load a policy whose payments nobody could verify.
    for (dir, kind) in [("envoy/istio", "WasmPlugin"), ("envoy/gateway", "EnvoyExtensionPolicy")] {
        let d = docs(dir);
        let (_, mut cfg) = k8s::plugin_configs(only(&d, kind)).remove(0);
        cfg.as_object_mut().unwrap().remove("x402_facilitator").unwrap();
        let err = k8s::check_plugin_config(&cfg, None).unwrap_err();
        assert!(err.contains("x402_facilitator"), "{kind}: {err}");
    }
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
            // (Every copy: the service key's Secret exists once per namespace
            // that reads it.)
            let copies: Vec<&Doc> = d.iter().filter(|s| s.kind() == "Secret" && s.name() == x.secret).collect();
            assert!(!copies.is_empty(), "no Secret {}", x.secret);
            for secret in copies {
                let placeholder = s(&secret.value, &format!("/stringData/{}", x.env));
                // ... and each placeholder is refused, whatever the others hold.
                let env: Vec<(&str, &str)> =
                    real.iter().map(|&(n, v)| (n, if n == x.env { placeholder } else { v })).collect();
                let err = filter_load(&cfg, &env).unwrap_err();
                assert!(err.contains(x.env), "{secret}: {err}");
            }
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

#[test]
fn the_service_key_is_optional_but_never_short_nor_unsendable() {
    let d = docs("envoy/istio");
    let (_, cfg) = k8s::plugin_configs(only(&d, "WasmPlugin")).remove(0);
    let env = SERVICE_KEY_ENV;
    // Unset or empty: callouts carry no key (a service that requires one
    // refuses them: 503), the plugin loads.
    filter_load(&cfg, &[]).unwrap();
    filter_load(&cfg, &[(env, "")]).unwrap();
    // `openssl rand -hex 32` and the bare minimum load; one character less
    // is refused with the message the docs quote.
    filter_load(&cfg, &[(env, &"k".repeat(64))]).unwrap();
    filter_load(&cfg, &[(env, &"k".repeat(32))]).unwrap();
    assert_eq!(
        filter_load(&cfg, &[(env, &"k".repeat(31))]).unwrap_err(),
        "env DIAL_SERVICE_KEY must be at least 32 characters"
    );
    // It goes into a header: visible ASCII only.
    let err = filter_load(&cfg, &[(env, &format!("{} {}", "k".repeat(16), "k".repeat(16)))]).unwrap_err();
    assert!(err.starts_with("env DIAL_SERVICE_KEY must be visible ASCII"), "{err}");
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
fn istio_wasmplugin_is_wired_to_the_workload_the_secrets_the_credits_service_and_the_facilitator() {
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

    // So is the facilitator cluster, for the `facilitator` Service.
    let svc = find(&d, "Service", "facilitator");
    let port = svc.value["spec"]["ports"][0]["port"].as_u64().unwrap();
    let fqdn = format!("{}.{}.svc.cluster.local", svc.name(), svc.namespace());
    assert_eq!(s(wp, "/spec/pluginConfig/x402_facilitator/cluster"), format!("outbound|{port}||{fqdn}"));
    assert_eq!(s(wp, "/spec/pluginConfig/x402_facilitator/authority"), fqdn);
    // Istio's protocol selection: HTTP, so the sidecar speaks HTTP to it.
    assert_eq!(svc.value["spec"]["ports"][0]["appProtocol"], "http");

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

    // The key/credits service holds the key the sidecar sends, from the same
    // Secret (same namespace).
    assert_eq!(credits_container(deploy)["env"], service_key_entries());
    assert_eq!(find_in(&d, "Secret", deploy.namespace(), "dialtone-service-key").namespace(), deploy.namespace());
}

/// The cluster the EnvoyPatchPolicy adds under `name`, checked to be an `add`
/// of a whole Cluster whose patch name is its own.
fn patched_cluster<'a>(epp: &'a Value, name: &str) -> &'a Value {
    let patches: Vec<&Value> =
        epp["spec"]["jsonPatches"].as_array().unwrap().iter().filter(|p| p["name"] == name).collect();
    assert_eq!(patches.len(), 1, "one patch adds cluster {name}");
    let patch = patches[0];
    assert_eq!(s(patch, "/type"), "type.googleapis.com/envoy.config.cluster.v3.Cluster");
    assert_eq!(s(patch, "/operation/op"), "add");
    assert_eq!(s(patch, "/operation/path"), "");
    let cluster = &patch["operation"]["value"];
    assert_eq!(s(cluster, "/name"), name);
    assert_eq!(s(cluster, "/load_assignment/cluster_name"), name);
    cluster
}

/// The cluster's one endpoint is the Service's FQDN and port, and the
/// callouts' authority names it.
fn assert_cluster_reaches(cluster: &Value, svc: &Doc, authority: &str) {
    let fqdn = format!("{}.{}.svc.cluster.local", svc.name(), svc.namespace());
    let addr = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
    assert_eq!(s(addr, "/address"), fqdn);
    assert_eq!(addr["port_value"], svc.value["spec"]["ports"][0]["port"]);
    assert_eq!(authority, fqdn);
}

#[test]
fn envoy_gateway_policy_is_wired_to_the_route_the_clusters_and_the_secrets() {
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

    // The clusters the config names are the ones the EnvoyPatchPolicy adds,
    // on the same Gateway: the credits service's and the facilitator's.
    let epp = &only(&d, "EnvoyPatchPolicy").value;
    assert_eq!(s(epp, "/spec/targetRef/name"), gw.name());
    assert_eq!(epp["spec"]["jsonPatches"].as_array().unwrap().len(), 2, "the two callout clusters, nothing else");
    let credits = patched_cluster(epp, s(w, "/config/credits_service/cluster"));
    assert_cluster_reaches(credits, find(&d, "Service", "credits"), s(w, "/config/credits_service/authority"));
    let facilitator = patched_cluster(epp, s(w, "/config/x402_facilitator/cluster"));
    assert_cluster_reaches(facilitator, find(&d, "Service", "facilitator"), s(w, "/config/x402_facilitator/authority"));

    // The secrets: Gateway -> EnvoyProxy -> env from Secrets in the Envoy pods' namespace.
    let pref = &gw.value["spec"]["infrastructure"]["parametersRef"];
    let ep = find(&d, "EnvoyProxy", s(pref, "/name"));
    assert_eq!(ep.namespace(), gw.namespace());
    let env = &ep.value["spec"]["provider"]["kubernetes"]["envoyDeployment"]["container"]["env"];
    // The filter's secrets, then the gate key (for Envoy's router).
    assert_eq!(env, &concat(secret_env_entries(), json!([gate_key_entry()])));
    assert_secrets_in(&d, "envoy-gateway-system");

    // The key/credits service holds the key the Envoy pods send: from the
    // copy of the same Secret in its own namespace (a secretKeyRef cannot
    // cross namespaces), with the same shape.
    let deploy = only(&d, "Deployment");
    let container = credits_container(deploy);
    assert_eq!(container["env"], concat(service_key_entries(), gate_key_entries()));
    for secret in ["dialtone-service-key", GATE_KEY_SECRET] {
        let proxy_copy = find_in(&d, "Secret", "envoy-gateway-system", secret);
        let service_copy = find_in(&d, "Secret", deploy.namespace(), secret);
        assert_ne!(proxy_copy.namespace(), service_copy.namespace());
        assert_eq!(service_copy.value["type"], "Opaque");
        assert_eq!(service_copy.value["stringData"], proxy_copy.value["stringData"], "{secret}");
    }

    // The self-service routes: /self and /dashboard, on the route the filter
    // is attached to, to the Service of the container's
    // --self-service-listen port, with the gate key set from Envoy's
    // environment (the filter removes a client's own copy first).
    let rules = route.value["spec"]["rules"].as_array().unwrap();
    let self_rule = rules
        .iter()
        .find(|r| r["matches"].as_array().unwrap().iter().any(|m| m["path"]["value"] == "/self"))
        .unwrap_or_else(|| panic!("no /self rule in {route}"));
    let prefixes: Vec<&str> = self_rule["matches"].as_array().unwrap().iter().map(|m| s(m, "/path/value")).collect();
    assert_eq!(prefixes, ["/self", "/dashboard"]);
    assert_eq!(
        self_rule["filters"],
        json!([{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [
            {"name": "x-dialtone-gate-key", "value": format!("%ENVIRONMENT({GATE_KEY_ENV})%")}
        ]}}])
    );
    let backend = &self_rule["backendRefs"][0];
    let svc = find(&d, "Service", s(backend, "/name"));
    let port = svc.value["spec"]["ports"].as_array().unwrap().iter().find(|p| p["port"] == backend["port"]).unwrap();
    let args: Vec<&str> = container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let listen = args.iter().position(|a| *a == "--self-service-listen").map(|i| args[i + 1]).unwrap();
    assert_eq!(listen, format!("0.0.0.0:{}", port["targetPort"]));
    // The demo API keeps the rest.
    assert_eq!(s(rules.last().unwrap(), "/matches/0/path/value"), "/");
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
