//! JSON Schema validation of a policy, with human messages and `$.a[0].b` paths.

use std::sync::OnceLock;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::{ValidationError, Validator};
use serde_json::Value;

use crate::{Problem, Source};

/// The JSON Schema of the plugin configuration (draft 2020-12).
pub const SCHEMA_TEXT: &str = include_str!("../../policy/schema/dialtone-plugin-config.schema.json");

struct Compiled {
    schema: Value,
    validator: Validator,
}

fn compiled() -> Result<&'static Compiled, String> {
    static CELL: OnceLock<Result<Compiled, String>> = OnceLock::new();
    CELL.get_or_init(|| {
        let schema: Value = serde_json::from_str(SCHEMA_TEXT).map_err(|e| format!("the built-in schema is not JSON: {e}"))?;
        let validator = jsonschema::draft202012::new(&schema).map_err(|e| format!("the built-in schema is invalid: {e}"))?;
        Ok(Compiled { schema, validator })
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// The schema as a JSON value (for tests and `schema`).
pub fn schema_value() -> Result<Value, String> {
    compiled().map(|c| c.schema.clone())
}

/// Every JSON Schema violation in `policy`, as human messages.
pub fn schema_errors(policy: &Value) -> Vec<Problem> {
    let c = match compiled() {
        Ok(c) => c,
        Err(e) => return vec![Problem { path: "$".into(), message: e, source: Source::Schema }],
    };
    let mut out: Vec<Problem> = Vec::new();
    for err in c.validator.iter_errors(policy) {
        for p in describe(&c.schema, policy, &err) {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// `$` + JSON-path steps for a JSON pointer into `instance`.
fn json_path(instance: &Value, pointer: &str) -> String {
    let mut path = "$".to_owned();
    let mut cur = Some(instance);
    for raw in pointer.split('/').skip(1) {
        let seg = raw.replace("~1", "/").replace("~0", "~");
        match cur {
            Some(Value::Array(a)) => {
                path.push_str(&format!("[{seg}]"));
                cur = seg.parse::<usize>().ok().and_then(|i| a.get(i));
            }
            Some(Value::Object(m)) => {
                cur = m.get(&seg);
                path = join_property(&path, &seg);
            }
            _ => {
                path = join_property(&path, &seg);
                cur = None;
            }
        }
    }
    path
}

/// `$.a` + `b` → `$.a.b`; names that are not plain identifiers are quoted: `$.a["x y"]`.
pub fn join_property(path: &str, name: &str) -> String {
    let plain = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        format!("{path}.{name}")
    } else {
        format!("{path}[{}]", Value::String(name.to_owned()))
    }
}

/// The value at a JSON pointer.
fn at_pointer<'a>(v: &'a Value, pointer: &str) -> Option<&'a Value> {
    if pointer.is_empty() {
        Some(v)
    } else {
        v.pointer(pointer)
    }
}

/// The schema node describing the instance at `pointer` (following
/// `properties`, `items`, `$ref` and `anyOf` branches of this schema).
fn schema_node<'a>(schema: &'a Value, pointer: &str) -> Option<&'a Value> {
    let mut node = schema;
    for raw in pointer.split('/').skip(1) {
        let seg = raw.replace("~1", "/").replace("~0", "~");
        let resolved = resolve(schema, node);
        let next = resolved
            .iter()
            .find_map(|n| n.get("properties").and_then(|p| p.get(&seg)))
            .or_else(|| resolved.iter().find_map(|n| n.get("items")))?;
        node = next;
    }
    Some(node)
}

/// A node and what it refers to (`$ref`) or branches into (`anyOf`).
fn resolve<'a>(schema: &'a Value, node: &'a Value) -> Vec<&'a Value> {
    let mut out = vec![node];
    if let Some(target) = node.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix('#')) {
        if let Some(t) = schema.pointer(target) {
            out.extend(resolve(schema, t));
        }
    }
    if let Some(branches) = node.get("anyOf").and_then(Value::as_array) {
        for b in branches {
            out.extend(resolve(schema, b));
        }
    }
    out
}

/// The `properties` names the schema allows at `pointer`.
fn allowed_fields(schema: &Value, pointer: &str) -> Vec<String> {
    let Some(node) = schema_node(schema, pointer) else { return Vec::new() };
    resolve(schema, node)
        .into_iter()
        .filter_map(|n| n.get("properties").and_then(Value::as_object))
        .flat_map(|m| m.keys().cloned())
        .collect()
}

fn backticked(names: &[String]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

/// Edit distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev.get(j).copied().unwrap_or(0) + usize::from(ca != *cb);
            let del = prev.get(j + 1).copied().unwrap_or(0) + 1;
            let ins = cur.get(j).copied().unwrap_or(0) + 1;
            cur.push(sub.min(del).min(ins));
        }
        prev = cur;
    }
    prev.last().copied().unwrap_or(0)
}

fn suggestion(name: &str, options: &[String]) -> String {
    let lower = name.to_ascii_lowercase();
    options
        .iter()
        .map(|o| (distance(&lower, &o.to_ascii_lowercase()), o))
        .filter(|(d, o)| *d <= 2.max(o.len() / 4) && *d < o.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, o)| format!(" (did you mean `{o}`?)"))
        .unwrap_or_default()
}

/// A short rendering of a value for messages.
fn show(v: &Value) -> String {
    let what = match v {
        Value::Null => return "null".into(),
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => return "an array".into(),
        Value::Object(_) => return "an object".into(),
    };
    let mut text = v.to_string();
    if text.chars().count() > 40 {
        text = text.chars().take(37).collect::<String>() + "…";
    }
    format!("{what} ({text})")
}

fn type_name(t: &str) -> &'static str {
    match t {
        "string" => "a string",
        "integer" => "an integer",
        "number" => "a number",
        "boolean" => "true or false",
        "array" => "a list",
        "object" => "an object",
        "null" => "null",
        _ => "a value of another type",
    }
}

/// What the schema at `pointer` says the type must be.
fn expected_type(schema: &Value, pointer: &str, kind: &TypeKind) -> String {
    let from_schema: Vec<String> = schema_node(schema, pointer)
        .map(|n| resolve(schema, n))
        .unwrap_or_default()
        .into_iter()
        .filter_map(|n| n.get("type"))
        .flat_map(|t| match t {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
            _ => vec![],
        })
        .collect();
    let mut names: Vec<String> = if from_schema.is_empty() {
        match kind {
            TypeKind::Single(t) => vec![t.to_string()],
            TypeKind::Multiple(ts) => ts.iter().map(|t| t.to_string()).collect(),
        }
    } else {
        from_schema
    };
    names.dedup();
    let has_null = names.iter().any(|n| n == "null");
    let main: Vec<&str> = names.iter().filter(|n| *n != "null").map(|n| type_name(n)).collect();
    let mut s = main.join(" or ");
    if has_null && !s.is_empty() {
        s.push_str(" (or null to leave it unset)");
    }
    s
}

/// A human phrase for each `pattern` of the schema (same words as the filter
/// where the filter checks the same thing).
pub fn pattern_phrase(pattern: &str) -> Option<&'static str> {
    Some(match pattern {
        "^[0-9A-Fa-f]{64}$" => "must be 64 hex digits (SHA-256 of the admin key)",
        "^[a-z0-9_.-]{1,64}$" => "must be 1-64 characters of a-z, 0-9, '_', '-', '.'",
        "^[A-Za-z0-9:_.-]{1,128}$" => "must be 1-128 characters of letters, digits, ':', '_', '.', '-'",
        "^[A-Z]{1,20}$" => "is not an upper-case HTTP method",
        "^/" => "must start with '/'",
        "^/[^?#]*$" => "must start with '/' and must not contain '?' or '#' (paths are matched without the query)",
        "\\S" => "must not be empty",
        _ => return None,
    })
}

fn describe(schema: &Value, instance: &Value, err: &ValidationError<'_>) -> Vec<Problem> {
    let pointer = err.instance_path().as_str().to_owned();
    let path = json_path(instance, &pointer);
    let found = at_pointer(instance, &pointer).map(show).unwrap_or_else(|| "nothing".into());
    let structural = |message: String| Problem { path: path.clone(), message, source: Source::Schema };
    let value_rule = |message: String| Problem { path: path.clone(), message, source: Source::SchemaValue };
    match err.kind() {
        ValidationErrorKind::AdditionalProperties { unexpected }
        | ValidationErrorKind::UnevaluatedProperties { unexpected } => {
            let allowed = allowed_fields(schema, &pointer);
            unexpected
                .iter()
                .map(|name| Problem {
                    path: join_property(&path, name),
                    message: format!(
                        "unknown field `{name}`{}; expected one of {}",
                        suggestion(name, &allowed),
                        backticked(&allowed)
                    ),
                    source: Source::Schema,
                })
                .collect()
        }
        ValidationErrorKind::Required { property } => {
            let name = property.as_str().map_or_else(|| property.to_string(), str::to_owned);
            vec![structural(format!("missing required field `{name}`"))]
        }
        ValidationErrorKind::Type { kind } => {
            vec![structural(format!("expected {}, found {found}", expected_type(schema, &pointer, kind)))]
        }
        ValidationErrorKind::Enum { options } => {
            let opts: Vec<String> = options
                .as_array()
                .map(|a| a.iter().map(|o| o.as_str().map_or_else(|| o.to_string(), str::to_owned)).collect())
                .unwrap_or_default();
            let hint = at_pointer(instance, &pointer)
                .and_then(Value::as_str)
                .map(|s| suggestion(s, &opts))
                .unwrap_or_default();
            vec![structural(format!("must be one of {}{hint}; found {found}", backticked(&opts)))]
        }
        ValidationErrorKind::Constant { expected_value } => {
            vec![structural(format!("must be {expected_value}; found {found}"))]
        }
        ValidationErrorKind::MinProperties { .. } | ValidationErrorKind::MaxProperties { .. } => {
            let allowed = allowed_fields(schema, &pointer);
            let present: Vec<String> = at_pointer(instance, &pointer)
                .and_then(Value::as_object)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            let msg = if present.is_empty() {
                format!("needs exactly one of {}", backticked(&allowed))
            } else {
                format!("needs exactly one of {}; found {}", backticked(&allowed), backticked(&present))
            };
            vec![structural(msg)]
        }
        ValidationErrorKind::Minimum { limit } | ValidationErrorKind::ExclusiveMinimum { limit } => {
            let range = range_of(schema, &pointer).unwrap_or_else(|| format!("at least {limit}"));
            vec![value_rule(format!("must be {range}; found {found}"))]
        }
        ValidationErrorKind::Maximum { limit } | ValidationErrorKind::ExclusiveMaximum { limit } => {
            let range = range_of(schema, &pointer).unwrap_or_else(|| format!("at most {limit}"));
            vec![value_rule(format!("must be {range}; found {found}"))]
        }
        ValidationErrorKind::MinItems { limit } => vec![value_rule(if *limit == 1 {
            "must not be empty (list at least one entry)".to_owned()
        } else {
            format!("must list at least {limit} entries")
        })],
        ValidationErrorKind::MinLength { .. } => vec![value_rule("must not be empty".into())],
        ValidationErrorKind::Pattern { pattern } => {
            let phrase = pattern_phrase(pattern)
                .map_or_else(|| format!("does not match the pattern `{pattern}`"), str::to_owned);
            vec![value_rule(format!("{phrase}; found {found}"))]
        }
        ValidationErrorKind::AnyOf { context } | ValidationErrorKind::OneOfNotValid { context } => {
            // Report the branch that got furthest (fewest errors), not "matches none".
            let best = context.iter().filter(|b| !b.is_empty()).min_by_key(|b| b.len());
            match best {
                Some(branch) => branch.iter().flat_map(|e| describe(schema, instance, e)).collect(),
                None => vec![structural(err.to_string())],
            }
        }
        _ => vec![structural(err.to_string())],
    }
}

/// "between 1 and 60000" when the schema node has both bounds.
fn range_of(schema: &Value, pointer: &str) -> Option<String> {
    let node = schema_node(schema, pointer)?;
    let nodes = resolve(schema, node);
    let min = nodes.iter().find_map(|n| n.get("minimum"));
    let max = nodes.iter().find_map(|n| n.get("maximum"));
    match (min, max) {
        (Some(a), Some(b)) => Some(format!("between {a} and {b}")),
        (Some(a), None) => Some(format!("at least {a}")),
        (None, Some(b)) => Some(format!("at most {b}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_are_json_paths() {
        let v = json!({"routes": [{"path": {"a/b": 1}}], "0": {"x": 1}});
        assert_eq!(json_path(&v, ""), "$");
        assert_eq!(json_path(&v, "/routes/0/path"), "$.routes[0].path");
        assert_eq!(json_path(&v, "/routes/0/path/a~1b"), "$.routes[0].path[\"a/b\"]");
        assert_eq!(json_path(&v, "/0/x"), "$.0.x");
    }

    #[test]
    fn schema_nodes_follow_refs() {
        let s = schema_value().unwrap();
        let fields = allowed_fields(&s, "/routes/0");
        assert!(fields.contains(&"cost".to_owned()), "{fields:?}");
        assert_eq!(allowed_fields(&s, "/routes/3/path"), ["exact", "prefix", "template"]);
        assert!(allowed_fields(&s, "/routes/0/x402/accepts/0").contains(&"payTo".to_owned()));
        assert!(allowed_fields(&s, "/privy").contains(&"verification_key".to_owned()));
        assert_eq!(range_of(&s, "/credits_service/timeout_ms").as_deref(), Some("between 1 and 60000"));
    }

    #[test]
    fn did_you_mean() {
        let opts = ["cost".to_owned(), "scope".to_owned(), "name".to_owned()];
        assert_eq!(suggestion("cots", &opts), " (did you mean `cost`?)");
        assert_eq!(suggestion("zzzzzzzz", &opts), "");
    }

    #[test]
    fn every_schema_pattern_has_a_phrase() {
        fn walk(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(p)) = m.get("pattern") {
                        out.push(p.clone());
                    }
                    m.values().for_each(|c| walk(c, out));
                }
                Value::Array(a) => a.iter().for_each(|c| walk(c, out)),
                _ => {}
            }
        }
        let mut patterns = Vec::new();
        walk(&schema_value().unwrap(), &mut patterns);
        assert!(!patterns.is_empty());
        for p in patterns {
            assert!(pattern_phrase(&p).is_some(), "no phrase for pattern {p}");
        }
    }
}
