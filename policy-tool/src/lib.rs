//! `dialtone-policy`: write dialtone policies (the filter's plugin
//! configuration) in YAML or JSON, validate them with every error at once,
//! convert them to the compact JSON Envoy takes, and explain them.
//!
//! Validation has two layers:
//! 1. the JSON Schema (`policy/schema/dialtone-plugin-config.schema.json`):
//!    every structural problem at once (unknown fields, wrong types, missing
//!    fields), with editor-friendly paths;
//! 2. [`dialtone::policy::Config::from_json`]: the very validation the filter
//!    runs when Envoy loads the plugin (cross-field rules, templates, keys).

pub mod parse;
mod schema;

use std::collections::HashMap;
use std::fmt;

use dialtone::policy::{Config, RawConfig};
use serde_json::Value;

pub use parse::{Format, SyntaxError};
pub use schema::{pattern_phrase, schema_errors, schema_value, SCHEMA_TEXT};

/// Which layer found a problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The JSON Schema, structural (unknown field, type, missing field, enum).
    Schema,
    /// The JSON Schema, a value rule the filter checks too (pattern, range, length).
    SchemaValue,
    /// The filter's own load-time validation.
    Filter,
}

/// One problem, at a `$.a.b[0]` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
    pub source: Source,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// What validating a file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Valid: the policy (as JSON) and its number of routes.
    Valid { policy: Value, routes: usize },
    /// Not JSON/YAML at all.
    Syntax(SyntaxError),
    /// Parsed, but invalid: every problem, in document order.
    Invalid(Vec<Problem>),
}

/// The filter's validation of `policy`, exactly as the plugin runs it at load
/// (no `DIAL_ADMIN_API_KEY` in the environment).
pub fn filter_errors(policy: &Value) -> Vec<Problem> {
    filter_check(policy).err().unwrap_or_default()
}

fn filter_check(policy: &Value) -> Result<usize, Vec<Problem>> {
    let bytes = serde_json::to_vec(policy).map_err(|e| {
        vec![Problem { path: "$".into(), message: e.to_string(), source: Source::Filter }]
    })?;
    match Config::from_json(&bytes, None) {
        Ok(cfg) => Ok(cfg.routes.len()),
        Err(errs) => Err(errs
            .0
            .into_iter()
            .map(|e| Problem {
                path: e.path,
                // serde's position refers to the compact JSON, not the author's file.
                message: parse::strip_position(&e.message),
                source: Source::Filter,
            })
            .collect()),
    }
}

/// Validates a parsed policy: the schema, then the filter's own validation.
/// Returns the number of routes, or every problem (deduplicated, in document order).
pub fn validate_value(policy: &Value) -> Result<usize, Vec<Problem>> {
    let schema = schema_errors(policy);
    let filter = filter_check(policy);
    let filter = match filter {
        Ok(n) if schema.is_empty() => return Ok(n),
        Ok(_) => Vec::new(),
        Err(f) => f,
    };
    // Did the filter stop at deserialization (one structural error) or get
    // through to its semantic checks (all of them)?
    let filter_structural = serde_json::from_value::<RawConfig>(policy.clone()).is_err();
    let mut out: Vec<Problem> = Vec::new();
    if filter_structural {
        // The schema reports every structural problem; the filter's single
        // deserialization error restates one of them unless it is elsewhere.
        out.extend(schema.iter().cloned());
        for f in filter {
            if !schema.iter().any(|s| related(&s.path, &f.path)) {
                out.push(f);
            }
        }
    } else {
        // Only value rules failed in the schema: the filter checked them too,
        // with its own words, and every cross-field rule besides.
        for s in &schema {
            let restated = s.source == Source::SchemaValue && filter.iter().any(|f| f.path == s.path);
            if !restated {
                out.push(s.clone());
            }
        }
        out.extend(filter);
    }
    sort_by_document(policy, &mut out);
    Err(out)
}

/// One path is the other or an ancestor of it.
fn related(a: &str, b: &str) -> bool {
    let under = |long: &str, short: &str| {
        long == short
            || long.strip_prefix(short).is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
    };
    under(a, b) || under(b, a)
}

/// Sorts problems in the order their paths appear in the document (stable;
/// paths outside the document, like the environment, go last).
fn sort_by_document(policy: &Value, problems: &mut [Problem]) {
    let mut order: HashMap<String, usize> = HashMap::new();
    fn walk(v: &Value, path: String, order: &mut HashMap<String, usize>) {
        let n = order.len();
        order.insert(path.clone(), n);
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    walk(child, schema::join_property(&path, k), order);
                }
            }
            Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    walk(child, format!("{path}[{i}]"), order);
                }
            }
            _ => {}
        }
    }
    walk(policy, "$".into(), &mut order);
    let rank = |p: &str| -> usize {
        // The deepest ancestor that exists in the document (a missing field
        // sorts with its parent).
        let mut cur = p;
        loop {
            if let Some(r) = order.get(cur) {
                return *r;
            }
            match cur.rfind(['.', '[']) {
                Some(i) if i > 0 => cur = cur.get(..i).unwrap_or("$"),
                _ => return usize::MAX,
            }
        }
    };
    problems.sort_by_key(|p| rank(&p.path));
}

/// Parses and validates policy text.
pub fn validate_text(text: &str, format: Format) -> Outcome {
    let policy = match parse::parse(text, format) {
        Ok(v) => v,
        Err(e) => return Outcome::Syntax(e),
    };
    match validate_value(&policy) {
        Ok(routes) => Outcome::Valid { policy, routes },
        Err(problems) => Outcome::Invalid(problems),
    }
}

/// The compact JSON for Envoy's `configuration` (a `StringValue`), or why the
/// policy cannot be converted.
pub fn convert_text(text: &str, format: Format) -> Result<String, Outcome> {
    match validate_text(text, format) {
        Outcome::Valid { policy, .. } => serde_json::to_string(&policy).map_err(|e| {
            Outcome::Invalid(vec![Problem { path: "$".into(), message: e.to_string(), source: Source::Filter }])
        }),
        other => Err(other),
    }
}

/// Formats every line `validate` prints for one file.
pub fn report_lines(file: &str, outcome: &Outcome) -> Vec<String> {
    match outcome {
        Outcome::Valid { routes, .. } => {
            vec![format!("{file}: ok ({routes} route{})", if *routes == 1 { "" } else { "s" })]
        }
        Outcome::Syntax(e) => match (e.line, e.column) {
            (Some(l), Some(c)) => vec![format!("{file}:{l}:{c}: syntax error: {}", e.message)],
            (Some(l), None) => vec![format!("{file}:{l}: syntax error: {}", e.message)],
            _ => vec![format!("{file}: syntax error: {}", e.message)],
        },
        Outcome::Invalid(problems) => problems.iter().map(|p| format!("{file}: {p}")).collect(),
    }
}

/// A table of the routes of a valid policy: name, methods, path, scope, cost, payment.
pub fn explain(policy: &Value) -> String {
    let str_of = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_owned();
    let mut rows: Vec<[String; 7]> =
        vec![["NAME", "METHODS", "PATH", "CREDENTIALS", "SCOPE", "COST", "PAYMENT"].map(str::to_owned)];
    let routes = policy.get("routes").and_then(Value::as_array).cloned().unwrap_or_default();
    for r in &routes {
        let methods = match r.get("methods").and_then(Value::as_array) {
            Some(ms) => ms.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","),
            None => "any".into(),
        };
        let path = match r.get("path").and_then(Value::as_object).and_then(|m| m.iter().next()) {
            Some((kind, p)) => {
                let p = p.as_str().unwrap_or_default();
                match kind.as_str() {
                    "prefix" => format!("{p}*"),
                    _ => p.to_owned(),
                }
            }
            None => String::new(),
        };
        let public = r.get("public").and_then(Value::as_bool).unwrap_or(false);
        let scope = r.get("scope").and_then(Value::as_str).map_or_else(|| "-".to_owned(), str::to_owned);
        let cost = r.get("cost").and_then(Value::as_u64).unwrap_or(0);
        let modes: Vec<String> = match r.get("payment").and_then(Value::as_array) {
            Some(ms) => ms.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
            None => vec!["credits".into()],
        };
        let (cost, payment) = if public {
            ("-".to_owned(), "public (no credential)".to_owned())
        } else {
            let mut parts = Vec::new();
            if modes.iter().any(|m| m == "credits") {
                parts.push(if cost == 0 { "free (authenticated)".to_owned() } else { "credits".to_owned() });
            }
            if modes.iter().any(|m| m == "x402") {
                let offers = r
                    .get("x402")
                    .and_then(|x| x.get("accepts"))
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .map(|o| format!("{} {} on {}", str_of(o.get("amount")), str_of(o.get("scheme")), str_of(o.get("network"))))
                            .collect::<Vec<_>>()
                            .join(" | ")
                    })
                    .unwrap_or_default();
                let settle = match r.get("x402").and_then(|x| x.get("settle")).and_then(Value::as_str) {
                    Some("before_upstream") => ", settled before the upstream",
                    _ => "",
                };
                parts.push(format!("x402 ({offers}{settle})"));
            }
            (cost.to_string(), parts.join(" + "))
        };
        let credentials = match (public, r.get("credentials").and_then(Value::as_array)) {
            (true, _) => "-".to_owned(),
            (false, Some(kinds)) => kinds.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","),
            (false, None) => "any".to_owned(),
        };
        rows.push([str_of(r.get("name")), methods, path, credentials, if public { "-".into() } else { scope }, cost, payment]);
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths.iter()).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let unmatched = policy.get("unmatched").and_then(Value::as_str).unwrap_or("deny");
    out.push_str(&match unmatched {
        "allow" => "unmatched requests: passed through unchecked (\"unmatched\": \"allow\")\n".to_owned(),
        _ => "unmatched requests: 403 route_not_allowed\n".to_owned(),
    });
    out
}
