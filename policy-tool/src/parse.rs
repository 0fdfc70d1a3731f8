//! Reading a policy file (YAML or JSON) into a JSON value, refusing
//! duplicate keys (the filter's serde derive refuses them in JSON, and a YAML
//! mapping with a key twice is a mistake whichever value wins).

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// The syntax a policy file is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Yaml,
    /// Unknown extension: try JSON, then YAML.
    Auto,
}

impl Format {
    /// `.json` → JSON, `.yaml`/`.yml` → YAML, anything else → [`Format::Auto`].
    pub fn from_path(path: &str) -> Format {
        let lower = path.to_ascii_lowercase();
        if lower.ends_with(".json") {
            Format::Json
        } else if lower.ends_with(".yaml") || lower.ends_with(".yml") {
            Format::Yaml
        } else {
            Format::Auto
        }
    }
}

/// A file that is not well-formed JSON/YAML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// 1-based, when the parser knows it.
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "line {l}, column {c}: {}", self.message),
            (Some(l), None) => write!(f, "line {l}: {}", self.message),
            _ => write!(f, "{}", self.message),
        }
    }
}

/// Parses `text` in `format` into a JSON value (key order preserved).
pub fn parse(text: &str, format: Format) -> Result<Value, SyntaxError> {
    match format {
        Format::Json => parse_json(text),
        Format::Yaml => parse_yaml(text),
        // JSON is a subset of YAML 1.2, but JSON's error positions are better
        // for a file that is meant to be JSON; report YAML's error otherwise.
        Format::Auto => parse_json(text).or_else(|json_err| {
            if text.trim_start().starts_with(['{', '[']) {
                parse_yaml(text).map_err(|_| json_err)
            } else {
                parse_yaml(text)
            }
        }),
    }
}

fn parse_json(text: &str) -> Result<Value, SyntaxError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let v = StrictValue.deserialize(&mut de).map_err(json_error)?;
    de.end().map_err(json_error)?;
    Ok(v)
}

fn json_error(e: serde_json::Error) -> SyntaxError {
    let (line, column) = (e.line(), e.column());
    SyntaxError {
        line: (line > 0).then_some(line),
        column: (line > 0).then_some(column),
        message: strip_position(&e.to_string()),
    }
}

fn parse_yaml(text: &str) -> Result<Value, SyntaxError> {
    if text.trim().is_empty() {
        return Err(SyntaxError { line: None, column: None, message: "the file is empty".into() });
    }
    let de = serde_yaml::Deserializer::from_str(text);
    StrictValue.deserialize(de).map_err(|e| {
        let loc = e.location();
        SyntaxError {
            line: loc.as_ref().map(|l| l.line()),
            column: loc.as_ref().map(|l| l.column()),
            message: strip_position(&e.to_string()),
        }
    })
}

/// Removes the ` at line N column M` that serde_json/serde_yaml append (the
/// position is reported separately, or is meaningless after a conversion).
pub fn strip_position(msg: &str) -> String {
    if let Some(i) = msg.rfind(" at line ") {
        let tail = msg.get(i + " at line ".len()..).unwrap_or_default();
        let mut words = tail.split(' ');
        let looks_like_position = words.next().is_some_and(|n| n.parse::<usize>().is_ok())
            && words.next() == Some("column")
            && words.next().is_some_and(|n| n.parse::<usize>().is_ok())
            && words.next().is_none();
        if looks_like_position {
            return msg.get(..i).unwrap_or(msg).to_owned();
        }
    }
    msg.to_owned()
}

/// Builds a [`Value`] like serde_json's own, but refuses duplicate object keys
/// and non-finite numbers.
struct StrictValue;

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON-compatible value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom(format!("{v} is not a finite number")))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        StrictValue.deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(StrictValue)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key `{key}`")));
            }
            let v = map.next_value_seed(StrictValue)?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_yaml() {
        let j = parse(r#"{"b":1,"a":[true,null,"x"]}"#, Format::Json).unwrap();
        let y = parse("b: 1\na: [true, null, x]\n", Format::Yaml).unwrap();
        assert_eq!(j, y);
        // Order is kept.
        assert_eq!(serde_json::to_string(&y).unwrap(), r#"{"b":1,"a":[true,null,"x"]}"#);
        assert_eq!(parse("a: 1", Format::Auto).unwrap(), serde_json::json!({"a": 1}));
        assert_eq!(parse(r#"{"a": 1}"#, Format::Auto).unwrap(), serde_json::json!({"a": 1}));
    }

    #[test]
    fn syntax_errors_have_positions() {
        let e = parse("{\n  \"a\": 1,\n  \"b\": }\n", Format::Json).unwrap_err();
        assert_eq!(e.line, Some(3), "{e:?}");
        assert!(!e.message.contains(" at line "), "{e:?}");
        let e = parse("a: 1\nb: [1, 2\n", Format::Yaml).unwrap_err();
        assert!(e.line.is_some(), "{e:?}");
        let e = parse("", Format::Yaml).unwrap_err();
        assert!(e.message.contains("empty"));
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let e = parse(r#"{"a":1,"a":2}"#, Format::Json).unwrap_err();
        assert!(e.message.contains("duplicate key `a`"), "{e:?}");
        let e = parse("routes:\n  - name: a\n    cost: 1\n    cost: 2\n", Format::Yaml).unwrap_err();
        assert!(e.message.contains("duplicate"), "{e:?}");
        assert!(e.line.is_some(), "{e:?}");
    }

    #[test]
    fn format_from_extension() {
        assert_eq!(Format::from_path("a/b.YAML"), Format::Yaml);
        assert_eq!(Format::from_path("b.yml"), Format::Yaml);
        assert_eq!(Format::from_path("b.json"), Format::Json);
        assert_eq!(Format::from_path("policy"), Format::Auto);
    }

    #[test]
    fn strips_only_real_positions() {
        assert_eq!(strip_position("unknown field `x` at line 1 column 20"), "unknown field `x`");
        assert_eq!(strip_position("stop at line noise"), "stop at line noise");
    }
}
