//! Offline checks of Kubernetes manifests against the CRD schemas stored in
//! `envoy/crds` (copied from istio/istio and envoyproxy/gateway, see
//! `envoy/crds/PROVENANCE.md`), and of the dialtone plugin configuration the
//! manifests carry.
//!
//! A CRD's `openAPIV3Schema` is translated to JSON Schema (draft 4) the way
//! the API server treats it with strict field validation (`kubectl apply`'s
//! default): an object schema without `x-kubernetes-preserve-unknown-fields`
//! refuses fields it does not declare; `x-kubernetes-int-or-string` is
//! integer-or-string; `nullable` adds null. Not checked: CEL rules
//! (`x-kubernetes-validations`), list-map uniqueness, `format`s.
//! Built-in kinds (Namespace, Secret, Service, Deployment) have no CRD and
//! only get a shape check (see [`BUILTIN_KINDS`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

/// Built-in kinds the examples use. Not schema-checked here (their schemas
/// are the API server's); `kubectl apply --dry-run=server` covers them.
pub const BUILTIN_KINDS: &[(&str, &str)] =
    &[("v1", "Namespace"), ("v1", "Secret"), ("v1", "Service"), ("v1", "ConfigMap"), ("apps/v1", "Deployment")];

/// One YAML document of a manifest file.
#[derive(Debug, Clone)]
pub struct Doc {
    pub file: PathBuf,
    pub index: usize,
    pub value: Value,
}

impl Doc {
    pub fn api_version(&self) -> &str {
        self.value.get("apiVersion").and_then(Value::as_str).unwrap_or("")
    }
    pub fn kind(&self) -> &str {
        self.value.get("kind").and_then(Value::as_str).unwrap_or("")
    }
    pub fn name(&self) -> &str {
        self.value.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("")
    }
    pub fn namespace(&self) -> &str {
        self.value.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("")
    }
}

impl fmt::Display for Doc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (document {}, {} {})", self.file.display(), self.index, self.kind(), self.name())
    }
}

/// Parses every YAML document of `text` (empty documents are skipped).
pub fn parse_docs(file: &Path, text: &str) -> Result<Vec<Doc>, String> {
    let mut out = Vec::new();
    for (index, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let y = <serde_yaml::Value as serde::Deserialize>::deserialize(de)
            .map_err(|e| format!("{}: document {index}: {e}", file.display()))?;
        if y.is_null() {
            continue;
        }
        let value = serde_json::to_value(&y).map_err(|e| format!("{}: document {index}: {e}", file.display()))?;
        out.push(Doc { file: file.to_path_buf(), index, value });
    }
    Ok(out)
}

/// Every `*.yaml` under `dir` (sorted), parsed.
pub fn load_dir(dir: &Path) -> Result<Vec<Doc>, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        docs.extend(parse_docs(&f, &text)?);
    }
    Ok(docs)
}

/// `(apiVersion, kind)` -> the JSON Schema of that CRD version.
#[derive(Debug, Default)]
pub struct Schemas {
    pub by_gvk: BTreeMap<(String, String), Value>,
}

impl Schemas {
    /// Loads every CRD under `dir` (recursively).
    pub fn load(dir: &Path) -> Result<Schemas, String> {
        let mut s = Schemas::default();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))? {
                let p = e.map_err(|e| e.to_string())?.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "yaml") {
                    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                    for doc in parse_docs(&p, &text)? {
                        if doc.kind() == "CustomResourceDefinition" {
                            s.add_crd(&doc)?;
                        }
                    }
                }
            }
        }
        Ok(s)
    }

    fn add_crd(&mut self, crd: &Doc) -> Result<(), String> {
        let spec = crd.value.get("spec").ok_or_else(|| format!("{crd}: no spec"))?;
        let group = spec.get("group").and_then(Value::as_str).ok_or_else(|| format!("{crd}: no spec.group"))?;
        let kind =
            spec.pointer("/names/kind").and_then(Value::as_str).ok_or_else(|| format!("{crd}: no spec.names.kind"))?;
        for v in spec.get("versions").and_then(Value::as_array).into_iter().flatten() {
            let (Some(version), Some(schema)) =
                (v.get("name").and_then(Value::as_str), v.pointer("/schema/openAPIV3Schema"))
            else {
                continue;
            };
            let api_version = format!("{group}/{version}");
            let js = root_schema(&api_version, kind, schema);
            self.by_gvk.insert((api_version, kind.to_owned()), js);
        }
        Ok(())
    }

    pub fn get(&self, api_version: &str, kind: &str) -> Option<&Value> {
        self.by_gvk.get(&(api_version.to_owned(), kind.to_owned()))
    }
}

/// Translates one Kubernetes structural schema node to JSON Schema.
pub fn translate(node: &Value) -> Value {
    let Some(obj) = node.as_object() else { return node.clone() };
    let is_true = |k: &str| obj.get(k).and_then(Value::as_bool) == Some(true);
    let preserve = is_true("x-kubernetes-preserve-unknown-fields");
    let int_or_string = is_true("x-kubernetes-int-or-string");
    let nullable = is_true("nullable");
    let mut out = Map::new();
    for (k, v) in obj {
        match k.as_str() {
            "properties" | "patternProperties" => {
                let props: Map<String, Value> =
                    v.as_object().into_iter().flatten().map(|(pk, pv)| (pk.clone(), translate(pv))).collect();
                out.insert(k.clone(), Value::Object(props));
            }
            "items" | "not" => {
                out.insert(k.clone(), translate(v));
            }
            "additionalProperties" => {
                out.insert(k.clone(), if v.is_object() { translate(v) } else { v.clone() });
            }
            "allOf" | "anyOf" | "oneOf" => {
                out.insert(k.clone(), Value::Array(v.as_array().into_iter().flatten().map(translate).collect()));
            }
            // Kubernetes-only keywords, annotations, and formats (int32,
            // date-time, …) that are not checked here.
            "nullable" | "description" | "example" | "externalDocs" | "format" => {}
            k if k.starts_with("x-kubernetes-") => {}
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    if int_or_string {
        out.remove("type");
        if !out.contains_key("anyOf") {
            out.insert("anyOf".into(), json!([{"type": "integer"}, {"type": "string"}]));
        }
    }
    if nullable {
        if let Some(Value::String(t)) = out.get("type").cloned() {
            out.insert("type".into(), json!([t, "null"]));
        }
    }
    let is_object = out.get("type").and_then(Value::as_str) == Some("object") || out.contains_key("properties");
    if is_object && !preserve && !out.contains_key("additionalProperties") {
        // Strict field validation: undeclared fields are errors, not pruned.
        out.insert("additionalProperties".into(), Value::Bool(false));
    }
    Value::Object(out)
}

/// The schema of a whole object: the CRD's schema plus `apiVersion`, `kind`
/// and the `metadata` fields these manifests use.
fn root_schema(api_version: &str, kind: &str, open_api: &Value) -> Value {
    let mut s = translate(open_api);
    if let Some(o) = s.as_object_mut() {
        let props = o.entry("properties").or_insert_with(|| json!({}));
        if let Some(p) = props.as_object_mut() {
            p.insert("apiVersion".into(), json!({"type": "string", "enum": [api_version]}));
            p.insert("kind".into(), json!({"type": "string", "enum": [kind]}));
            p.insert("metadata".into(), metadata_schema());
        }
        let mut required: Vec<Value> = o.get("required").and_then(Value::as_array).cloned().unwrap_or_default();
        for r in ["apiVersion", "kind", "metadata"] {
            if !required.iter().any(|x| x == r) {
                required.push(json!(r));
            }
        }
        o.insert("required".into(), Value::Array(required));
        o.insert("$schema".into(), json!("http://json-schema.org/draft-04/schema#"));
    }
    s
}

/// ObjectMeta as written in a manifest (not what the server adds).
pub fn metadata_schema() -> Value {
    let dns_label = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
    let dns_subdomain = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
    json!({
        "type": "object",
        "required": ["name"],
        "additionalProperties": false,
        "properties": {
            "name": {"type": "string", "maxLength": 253, "pattern": dns_subdomain},
            "namespace": {"type": "string", "maxLength": 63, "pattern": dns_label},
            "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}}
        }
    })
}

/// Checks one document. Custom resources: against their CRD schema (a kind
/// without a stored CRD is an error). Built-in kinds: a shape check.
pub fn validate_doc(schemas: &Schemas, doc: &Doc) -> Vec<String> {
    let (av, kind) = (doc.api_version(), doc.kind());
    if BUILTIN_KINDS.contains(&(av, kind)) {
        let shape = json!({
            "type": "object",
            "required": ["apiVersion", "kind", "metadata"],
            "properties": {"metadata": metadata_schema()}
        });
        return run_schema(&shape, &doc.value);
    }
    match schemas.get(av, kind) {
        Some(schema) => run_schema(schema, &doc.value),
        None => vec![format!("no CRD schema in envoy/crds for {av} {kind}")],
    }
}

fn run_schema(schema: &Value, instance: &Value) -> Vec<String> {
    match jsonschema::draft4::new(schema) {
        Ok(v) => v.iter_errors(instance).map(|e| format!("at {}: {e}", e.instance_path())).collect(),
        Err(e) => vec![format!("schema does not compile: {e}")],
    }
}

/// The dialtone plugin configurations a document carries, with where.
pub fn plugin_configs(doc: &Doc) -> Vec<(String, Value)> {
    match doc.kind() {
        "WasmPlugin" => doc
            .value
            .pointer("/spec/pluginConfig")
            .map(|c| vec![("spec.pluginConfig".to_owned(), c.clone())])
            .unwrap_or_default(),
        "EnvoyExtensionPolicy" => doc
            .value
            .pointer("/spec/wasm")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, w)| w.get("config").map(|c| (format!("spec.wasm[{i}].config"), c.clone())))
            .collect(),
        _ => Vec::new(),
    }
}

/// Runs the filter's own load-time validation on a plugin configuration.
pub fn check_plugin_config(config: &Value, env_admin_key: Option<&str>) -> Result<dialtone::policy::Config, String> {
    let bytes = serde_json::to_vec(config).map_err(|e| e.to_string())?;
    dialtone::policy::Config::from_json(&bytes, env_admin_key).map_err(|e| e.to_string())
}

/// Every problem in the manifests of `dirs` (schemas from `crds`): schema
/// errors and plugin configurations the filter would refuse.
pub fn check_dirs(crds: &Path, dirs: &[PathBuf]) -> Result<(usize, Vec<String>), String> {
    let schemas = Schemas::load(crds)?;
    let mut problems = Vec::new();
    let mut count = 0;
    for dir in dirs {
        for doc in load_dir(dir)? {
            count += 1;
            problems.extend(validate_doc(&schemas, &doc).into_iter().map(|e| format!("{doc}: {e}")));
            for (at, cfg) in plugin_configs(&doc) {
                if let Err(e) = check_plugin_config(&cfg, None) {
                    problems.push(format!("{doc}: {at}: invalid plugin configuration: {e}"));
                }
            }
        }
    }
    Ok((count, problems))
}
