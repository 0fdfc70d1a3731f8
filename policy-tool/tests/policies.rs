//! The example policies, the bad-policy table, the schema's coverage of raw.rs.

// Test helpers outside #[test] functions: a failing test should fail loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::PathBuf;

use dialtone_policy::{
    convert_text, filter_errors, parse, schema_errors, schema_value, validate_text, validate_value, Format, Outcome,
    Problem,
};
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn examples() -> Vec<PathBuf> {
    let dir = root().join("policy/examples");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name.ends_with(".yaml") || name.ends_with(".json")) && !name.contains(".cases.")
        })
        .collect();
    out.sort();
    assert!(out.len() >= 2, "{out:?}");
    out
}

fn load(path: &PathBuf) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    parse::parse(&text, Format::from_path(&path.to_string_lossy())).unwrap()
}

#[test]
fn every_example_policy_validates() {
    for p in examples() {
        let text = std::fs::read_to_string(&p).unwrap();
        match validate_text(&text, Format::from_path(&p.to_string_lossy())) {
            Outcome::Valid { routes, .. } => assert!(routes > 0),
            other => panic!("{}: {other:?}", p.display()),
        }
        let v = load(&p);
        assert!(schema_errors(&v).is_empty(), "{}: {:?}", p.display(), schema_errors(&v));
        assert!(filter_errors(&v).is_empty(), "{}: {:?}", p.display(), filter_errors(&v));
    }
}

#[test]
fn convert_output_parses_back_to_the_same_policy() {
    for p in examples() {
        let text = std::fs::read_to_string(&p).unwrap();
        let json = convert_text(&text, Format::from_path(&p.to_string_lossy())).unwrap();
        assert!(!json.contains('\n') || json.contains("\\n"), "compact JSON expected");
        let back: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back, load(&p), "{}", p.display());
        // Key order is the author's.
        let first_key = back.as_object().unwrap().keys().next().unwrap().clone();
        assert_eq!(first_key, "credits_service");
        // And the filter loads exactly that text.
        dialtone::policy::Config::from_json(json.as_bytes(), None).unwrap();
    }
}

#[test]
fn convert_refuses_an_invalid_policy() {
    let bad = "credits_service: {cluster: c}\nroutes: []\n";
    match convert_text(bad, Format::Yaml) {
        Err(Outcome::Invalid(p)) => assert_eq!(p[0].path, "$.routes"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(convert_text("{", Format::Json), Err(Outcome::Syntax(_))));
}

/// The YAML example mirrors policy/demo.json (which gets its Privy key injected
/// by the dev stack).
#[test]
fn sms_credits_example_mirrors_the_demo_policy() {
    let demo: Value = serde_json::from_str(&std::fs::read_to_string(root().join("policy/demo.json")).unwrap()).unwrap();
    let yaml = load(&root().join("policy/examples/sms-credits.yaml"));
    assert_eq!(yaml["routes"], demo["routes"]);
    assert_eq!(yaml["credits_service"], demo["credits_service"]);
    assert_eq!(yaml["unmatched"], demo["unmatched"]);
    // Keys differ by design: a test key in the example, a placeholder in the demo.
    let without_key = |v: &Value| {
        let mut p = v.clone();
        p.as_object_mut().unwrap().remove("verification_key");
        p
    };
    assert_eq!(without_key(&yaml["privy"]), without_key(&demo["privy"]));
}

fn minimal_with(routes: Value) -> Value {
    json!({"credits_service": {"cluster": "credits"}, "routes": routes})
}

fn public_route() -> Value {
    json!([{"name": "h", "path": {"exact": "/healthz"}, "public": true}])
}

fn with(mut base: Value, pointer: &str, v: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let target = if parent.is_empty() { &mut base } else { base.pointer_mut(parent).unwrap() };
    match target {
        Value::Object(m) => {
            m.insert(key.to_owned(), v);
        }
        Value::Array(a) => a[key.parse::<usize>().unwrap()] = v,
        _ => panic!("{pointer}"),
    }
    base
}

const BAD_PEM: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEnotakey\n-----END PUBLIC KEY-----\n";

/// One mistake per policy: (what, policy, the path the user must look at, words the message must contain).
fn bad_policies() -> Vec<(&'static str, Value, &'static str, &'static str)> {
    let ok = minimal_with(public_route());
    let route = |r: Value| minimal_with(json!([r]));
    vec![
        (
            "unknown field",
            route(json!({"name": "sms", "path": {"exact": "/s"}, "scope": "s", "cots": 1})),
            "$.routes[0].cots",
            "unknown field `cots` (did you mean `cost`?); expected one of `name`",
        ),
        (
            "unknown top-level field",
            with(ok.clone(), "/unmached", json!("deny")),
            "$.unmached",
            "unknown field `unmached`",
        ),
        (
            "wrong type",
            route(json!({"name": "sms", "path": {"exact": "/s"}, "scope": "s", "cost": "one"})),
            "$.routes[0].cost",
            "expected an integer, found a string (\"one\")",
        ),
        ("missing field", json!({"routes": public_route()}), "$", "missing required field `credits_service`"),
        (
            "duplicate route name",
            minimal_with(json!([
                {"name": "a", "path": {"exact": "/a"}, "public": true},
                {"name": "a", "path": {"exact": "/b"}, "public": true}])),
            "$.routes[1].name",
            "duplicate route name \"a\"",
        ),
        (
            "template syntax",
            route(json!({"name": "k", "path": {"template": "/k/{id"}})),
            "$.routes[0].path.template",
            "a variable must be a whole segment",
        ),
        (
            "two path kinds",
            route(json!({"name": "k", "path": {"exact": "/k", "prefix": "/k/"}})),
            "$.routes[0].path",
            "needs exactly one of `exact`, `prefix`, `template`",
        ),
        (
            "path without leading slash",
            route(json!({"name": "k", "path": {"exact": "k"}})),
            "$.routes[0].path.exact",
            "must start with '/'",
        ),
        (
            "lower-case method",
            route(json!({"name": "k", "methods": ["get"], "path": {"exact": "/k"}})),
            "$.routes[0].methods[0]",
            "is not an upper-case HTTP method",
        ),
        (
            "charges credits without a scope",
            route(json!({"name": "sms", "path": {"exact": "/s"}, "cost": 1})),
            "$.routes[0].scope",
            "a route that charges credits must name the scope",
        ),
        (
            "x402 mode without requirements",
            route(json!({"name": "t", "path": {"exact": "/t"}, "payment": ["x402"]})),
            "$.routes[0].x402",
            "describe the payment requirements",
        ),
        (
            "x402 requirements without x402 mode",
            route(json!({"name": "t", "path": {"exact": "/t"}, "x402": {"accepts": [
                {"scheme": "exact", "network": "eip155:8453", "amount": "1", "asset": "0xA", "payTo": "0xB", "maxTimeoutSeconds": 60}]}})),
            "$.routes[0].x402",
            "payment does not include \"x402\"",
        ),
        (
            "x402 accepts in snake_case",
            route(json!({"name": "t", "path": {"exact": "/t"}, "payment": ["x402"], "x402": {"accepts": [
                {"scheme": "exact", "network": "eip155:8453", "amount": "1", "asset": "0xA", "pay_to": "0xB", "maxTimeoutSeconds": 60}]}})),
            "$.routes[0].x402.accepts[0].pay_to",
            "unknown field `pay_to` (did you mean `payTo`?)",
        ),
        (
            "unknown payment mode",
            route(json!({"name": "t", "path": {"exact": "/t"}, "payment": ["card"]})),
            "$.routes[0].payment[0]",
            "must be one of `credits`, `x402`",
        ),
        (
            "public route with a cost",
            route(json!({"name": "h", "path": {"exact": "/h"}, "public": true, "cost": 2})),
            "$.routes[0].public",
            "a public route takes no scope, cost, payment or x402",
        ),
        (
            "cost without credits payment",
            route(json!({"name": "t", "path": {"exact": "/t"}, "scope": "s", "cost": 1, "payment": ["x402"], "x402": {"accepts": [
                {"scheme": "exact", "network": "eip155:8453", "amount": "1", "asset": "0xA", "payTo": "0xB", "maxTimeoutSeconds": 60}]}})),
            "$.routes[0].cost",
            "needs \"credits\" in payment",
        ),
        (
            "zero timeout",
            with(ok.clone(), "/credits_service/timeout_ms", json!(0)),
            "$.credits_service.timeout_ms",
            "must be between 1 and 60000",
        ),
        (
            "negative leeway",
            with(ok.clone(), "/privy", json!({"app_id": "a", "jwks": {"keys": []}, "leeway_seconds": -5})),
            "$.privy.leeway_seconds",
            "between 0 and 600",
        ),
        (
            "huge max_token_bytes",
            with(ok.clone(), "/max_token_bytes", json!(100_000)),
            "$.max_token_bytes",
            "between 256 and 16384",
        ),
        (
            "bad admin_key_sha256",
            with(ok.clone(), "/admin_key_sha256", json!("not-a-digest")),
            "$.admin_key_sha256",
            "must be 64 hex digits",
        ),
        ("privy without a key", with(ok.clone(), "/privy", json!({"app_id": "app"})), "$.privy", "needs a verification_key"),
        (
            "invalid PEM",
            with(ok.clone(), "/privy", json!({"app_id": "app", "verification_key": BAD_PEM})),
            "$.privy.verification_key",
            "not a P-256 public key in PEM",
        ),
        (
            "JWKS with a private key",
            with(ok.clone(), "/privy", json!({"app_id": "app", "jwks": {"keys": [{"kty": "EC", "crv": "P-256", "x": "a", "y": "b", "d": "secret"}]}})),
            "$.privy.jwks",
            "private part",
        ),
        ("empty routes", minimal_with(json!([])), "$.routes", "needs at least one route"),
        (
            "unmatched typo",
            with(ok.clone(), "/unmatched", json!("alow")),
            "$.unmatched",
            "must be one of `deny`, `allow` (did you mean `allow`?)",
        ),
        (
            "bad route name",
            route(json!({"name": "SMS Send", "path": {"exact": "/s"}, "public": true})),
            "$.routes[0].name",
            "1-64 characters of a-z",
        ),
        ("empty cluster", with(ok, "/credits_service/cluster", json!(" ")), "$.credits_service.cluster", "cluster"),
    ]
}

#[test]
fn each_bad_policy_names_the_path_and_the_problem() {
    for (what, policy, path, words) in bad_policies() {
        let problems = validate_value(&policy).expect_err(what);
        let hit = problems.iter().find(|p| p.path == path);
        let Some(hit) = hit else { panic!("{what}: no error at {path}: {problems:?}") };
        assert!(hit.message.contains(words), "{what}: {:?} does not say {words:?}", hit.message);
        // Nothing leaks serde's position in the compact JSON.
        assert!(problems.iter().all(|p| !p.message.contains(" at line ")), "{what}: {problems:?}");
    }
}

#[test]
fn schema_and_filter_agree_on_every_bad_policy() {
    for (what, policy, _, _) in bad_policies() {
        let s = schema_errors(&policy);
        let f = filter_errors(&policy);
        assert!(!s.is_empty() || !f.is_empty(), "{what}: accepted by both");
        // Whatever the schema refuses, the filter refuses too (the schema is
        // never stricter than the filter).
        if !s.is_empty() {
            assert!(!f.is_empty(), "{what}: the schema refuses {s:?} but the filter would load it");
        }
    }
}

#[test]
fn structural_mistakes_are_caught_by_the_schema() {
    let structural = [
        "unknown field",
        "unknown top-level field",
        "wrong type",
        "missing field",
        "two path kinds",
        "x402 accepts in snake_case",
        "unknown payment mode",
        "zero timeout",
        "negative leeway",
        "huge max_token_bytes",
        "bad admin_key_sha256",
        "empty routes",
        "unmatched typo",
        "lower-case method",
        "path without leading slash",
        "bad route name",
        "empty cluster",
    ];
    for (what, policy, path, _) in bad_policies() {
        if structural.contains(&what) {
            let s = schema_errors(&policy);
            assert!(s.iter().any(|p| p.path == path), "{what}: schema says {s:?}");
        }
    }
}

#[test]
fn every_error_is_reported_at_once() {
    let policy = json!({
        "credits_service": {"cluster": "c", "timeout_ms": 0},
        "admin_key_sha256": "xyz",
        "routes": [
            {"name": "a", "path": {"template": "/k/{id"}, "cost": 1},
            {"name": "a", "path": {"exact": "/x"}, "methods": ["get"]},
            {"name": "p", "path": {"exact": "/p"}, "public": true, "cost": 2}
        ]
    });
    let problems = validate_value(&policy).unwrap_err();
    let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
    for want in [
        "$.credits_service.timeout_ms",
        "$.admin_key_sha256",
        "$.routes[0].path.template",
        "$.routes[0].scope",
        "$.routes[1].name",
        "$.routes[1].methods[0]",
        "$.routes[2].public",
    ] {
        assert!(paths.contains(&want), "{want} missing from {paths:?}");
    }
    // Each problem once (the schema and the filter both check the timeout).
    let timeouts = problems.iter().filter(|p| p.path == "$.credits_service.timeout_ms").count();
    assert_eq!(timeouts, 1, "{problems:?}");
    // In document order.
    assert_eq!(paths[0], "$.credits_service.timeout_ms");

    // Several structural errors at once, too (serde alone would stop at the first).
    let policy = json!({
        "credits_service": {"clustr": "c"},
        "routes": [{"name": "a", "path": {"exact": "/a"}, "cots": 1, "public": "yes"}]
    });
    let problems: Vec<Problem> = validate_value(&policy).unwrap_err();
    let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
    for want in ["$.credits_service", "$.credits_service.clustr", "$.routes[0].cots", "$.routes[0].public"] {
        assert!(paths.contains(&want), "{want} missing from {paths:?}");
    }
}

#[test]
fn yaml_mistakes_read_well() {
    let text = "credits_service:\n  cluster: c\nroutes:\n  - name: h\n    path: {exact: /h}\n    public: true\n    public: false\n";
    match validate_text(text, Format::Yaml) {
        Outcome::Syntax(e) => {
            assert!(e.message.contains("duplicate key `public`"), "{e:?}");
            assert!(e.line.is_some());
        }
        other => panic!("{other:?}"),
    }
    let lines = dialtone_policy::report_lines("p.yaml", &validate_text("a: [1,\n", Format::Yaml));
    assert_eq!(lines.len(), 1);
    assert!(lines[0].starts_with("p.yaml:"), "{lines:?}");
    assert!(lines[0].contains("syntax error"), "{lines:?}");
}

#[test]
fn report_lines_name_the_file() {
    let outcome = validate_text(r#"{"credits_service":{"cluster":"c"},"routes":[]}"#, Format::Json);
    assert_eq!(dialtone_policy::report_lines("x.json", &outcome), ["x.json: $.routes: needs at least one route"]);
    let ok = validate_text(r#"{"credits_service":{"cluster":"c"},"routes":[{"name":"h","path":{"exact":"/"},"public":true}]}"#, Format::Json);
    assert_eq!(dialtone_policy::report_lines("x.json", &ok), ["x.json: ok (1 route)"]);
}

#[test]
fn explain_lists_the_routes() {
    let policy = load(&root().join("policy/examples/sms-credits.yaml"));
    let table = dialtone_policy::explain(&policy);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{table}");
    assert!(lines[1].starts_with("sms_send") && lines[1].contains("sms:send") && lines[1].contains("x402"), "{table}");
    assert!(lines.iter().any(|l| l.starts_with("healthz") && l.contains("public")), "{table}");
    let top_up = lines.iter().find(|l| l.starts_with("credits_top_up")).unwrap_or_else(|| panic!("{table}"));
    assert!(top_up.contains("privy,api_key,api_token") && top_up.contains("settled before the upstream"), "{table}");
    assert!(lines[0].contains("CREDENTIALS") && lines[1].contains(" any "), "{table}");
    // The dashboard's API takes Privy sessions only; the page is public.
    let self_service = lines.iter().find(|l| l.starts_with("self_service")).unwrap_or_else(|| panic!("{table}"));
    assert!(self_service.contains(" privy ") && self_service.contains("/self/v1/"), "{table}");
    assert!(lines.iter().any(|l| l.starts_with("dashboard") && l.contains("public")), "{table}");
}

/// The schema is valid JSON Schema and names every field and variant of raw.rs.
#[test]
fn schema_covers_every_field_of_raw_rs() {
    let schema = schema_value().unwrap();
    assert_eq!(schema["$schema"], "https://json-schema.org/draft/2020-12/schema");
    jsonschema::meta::validate(&schema).unwrap();
    let raw = std::fs::read_to_string(root().join("src/policy/raw.rs")).unwrap();

    // struct name -> where its fields live in the schema.
    let location = |name: &str| -> &str {
        match name {
            "RawConfig" => "/properties",
            "RawService" => "/$defs/credits_service/properties",
            "RawPrivy" => "/$defs/privy/properties",
            "RawRoute" => "/$defs/route/properties",
            "RawX402" => "/$defs/x402/properties",
            "X402Accept" => "/$defs/x402_accept/properties",
            "RateLimit" => "/$defs/rate_limit/properties",
            "RawJwksFetch" => "/$defs/jwks_fetch/properties",
            "RawFacilitator" => "/$defs/x402_facilitator/properties",
            "RawLease" => "/$defs/credits_service/properties/lease/properties",
            other => panic!("raw.rs has a struct {other} the schema does not know: add it"),
        }
    };
    let camel = |s: &str| {
        let mut out = String::new();
        let mut up = false;
        for c in s.chars() {
            if c == '_' {
                up = true;
            } else if up {
                out.extend(c.to_uppercase());
                up = false;
            } else {
                out.push(c);
            }
        }
        out
    };
    let mut checked = 0;
    let mut current: Option<(String, bool)> = None; // (struct, camelCase)
    let mut attrs = String::new();
    for line in raw.lines() {
        let t = line.trim();
        if t.starts_with("#[serde(") {
            attrs.push_str(t);
        }
        if let Some(rest) = t.strip_prefix("pub struct ") {
            let name = rest.split_whitespace().next().unwrap().to_owned();
            current = Some((name, attrs.contains("camelCase")));
            attrs.clear();
            continue;
        }
        if let Some(rest) = t.strip_prefix("pub enum ") {
            let name = rest.split_whitespace().next().unwrap().to_owned();
            current = Some((format!("enum {name}"), false));
            attrs.clear();
            continue;
        }
        if t == "}" {
            current = None;
            continue;
        }
        if !t.starts_with("#[") {
            attrs.clear();
        }
        let Some((owner, camel_case)) = &current else { continue };
        if let Some(enum_name) = owner.strip_prefix("enum ") {
            // Variants: `Deny,` → "deny" (snake_case).
            let variant = t.trim_end_matches(',');
            if variant.is_empty() || !variant.chars().next().unwrap().is_ascii_uppercase() {
                continue;
            }
            let variant = variant.split('(').next().unwrap();
            let mut snake = String::new();
            for (i, c) in variant.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    snake.push('_');
                }
                snake.push(c.to_ascii_lowercase());
            }
            let text = schema.to_string();
            assert!(text.contains(&format!("\"{snake}\"")), "enum {enum_name} variant {snake} missing from the schema");
            checked += 1;
            continue;
        }
        if let Some(rest) = t.strip_prefix("pub ") {
            let Some((field, _)) = rest.split_once(':') else { continue };
            let name = if *camel_case { camel(field) } else { field.to_owned() };
            let props = schema.pointer(location(owner)).unwrap_or_else(|| panic!("{owner}: no {}", location(owner)));
            let prop = props.get(&name).unwrap_or_else(|| panic!("{owner}.{name} is not in the schema"));
            let desc = prop.get("description").and_then(Value::as_str).unwrap_or_default();
            assert!(!desc.is_empty(), "{owner}.{name} has no description");
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} fields/variants found in raw.rs");
}

/// Every object in the schema refuses unknown members, except the foreign
/// documents the filter keeps as raw JSON (the JWKS, x402 `extra`).
#[test]
fn every_schema_object_is_closed() {
    fn walk(v: &Value, at: &str) {
        let Value::Object(m) = v else { return };
        if m.contains_key("properties") && !at.ends_with("/jwks") {
            assert_eq!(m.get("additionalProperties"), Some(&Value::Bool(false)), "{at} is open");
            for (k, p) in m["properties"].as_object().unwrap() {
                assert!(p.get("description").is_some(), "{at}/{k} has no description");
            }
        }
        for (k, c) in m {
            walk(c, &format!("{at}/{k}"));
        }
    }
    walk(&schema_value().unwrap(), "");
}

#[test]
fn schema_defaults_match_the_filter() {
    // A minimal policy loads with the defaults the schema announces.
    let cfg = dialtone::policy::Config::from_json(minimal_with(public_route()).to_string().as_bytes(), None).unwrap();
    let s = schema_value().unwrap();
    let svc = &s["$defs"]["credits_service"]["properties"];
    assert_eq!(svc["timeout_ms"]["default"], json!(cfg.service.timeout_ms));
    assert_eq!(svc["lookup_path"]["default"], json!(cfg.service.lookup_path));
    assert_eq!(svc["debit_path"]["default"], json!(cfg.service.debit_path));
    assert_eq!(svc["max_response_bytes"]["default"], json!(cfg.service.max_response_bytes));
    assert_eq!(s["properties"]["unmatched"]["default"], "deny");
    assert_eq!(s["$defs"]["privy"]["properties"]["issuer"]["default"], "privy.io");
    assert_eq!(s["$defs"]["privy"]["properties"]["leeway_seconds"]["default"], 60);
}

#[test]
fn the_binary_validates_and_converts() {
    let bin = env!("CARGO_BIN_EXE_dialtone-policy");
    let ex = root().join("policy/examples/sms-credits.yaml");
    let out = std::process::Command::new(bin).arg("validate").arg(&ex).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(": ok (6 routes)\n"));

    let dir = std::env::temp_dir().join(format!("dialtone-policy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "credits_service: {cluster: c, timeout_ms: 0}\nroutes:\n  - {name: s, path: {exact: /s}, cost: 1}\n").unwrap();
    let out = std::process::Command::new(bin).arg("validate").arg(&ex).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("bad.yaml: $.credits_service.timeout_ms: must be between 1 and 60000"), "{stdout}");
    assert!(stdout.contains("bad.yaml: $.routes[0].scope: a route that charges credits"), "{stdout}");

    let json_out = dir.join("out.json");
    let out = std::process::Command::new(bin).arg("convert").arg(&ex).arg("-o").arg(&json_out).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&json_out).unwrap()).unwrap();
    assert_eq!(written, load(&ex));
    let out = std::process::Command::new(bin).arg("convert").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());

    let out = std::process::Command::new(bin).arg("schema").output().unwrap();
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, schema_value().unwrap());
    let out = std::process::Command::new(bin).arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}
