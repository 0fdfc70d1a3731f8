//! Case files: a policy, then table-driven cases (request, clock, scripted
//! callout answers, expectations), run against the compiled filter. Format:
//! `docs/case-files.md`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use dialtone_devstack::tokens;
use p256::ecdsa::SigningKey;
use p256::pkcs8::DecodePrivateKey;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::host::header_value;
use crate::plugin::{CallAnswer, Outcome, Plugin, PluginOptions, Wasm};

const DEFAULT_CLOCK: i64 = 1_800_000_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    #[serde(default)]
    pub policy: Option<String>,
    #[serde(default)]
    pub config: Option<Value>,
    #[serde(default)]
    pub privy_signing_key: Option<String>,
    #[serde(default)]
    pub env: Map<String, Value>,
    #[serde(default)]
    pub clock: Option<i64>,
    pub cases: Vec<Case>,
}

/// A case: one request on a fresh plugin (`request`, `callouts`,
/// `upstream_response`, `expect`), or `steps` played in order on one plugin
/// (requests and root-context ticks: what leases and caches do over time).
/// The single-request fields repeat [`Step`]'s rather than flatten one in:
/// serde cannot flatten under `deny_unknown_fields`, and a misspelt field
/// in a case file must be an error. Both are read through [`StepView`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    #[serde(default)]
    pub clock: Option<i64>,
    #[serde(default)]
    pub request: Option<CaseRequest>,
    #[serde(default)]
    pub callouts: Vec<ScriptedCallout>,
    /// If the request passes: the upstream's answer, shown to the filter
    /// (charge on success settles its hold here; the script of callouts goes on).
    #[serde(default)]
    pub upstream_response: Option<UpstreamResponse>,
    #[serde(default)]
    pub expect: Option<Expect>,
    /// The filter's counters after the request (name → value; null = never defined).
    #[serde(default)]
    pub metrics: Map<String, Value>,
    #[serde(default)]
    pub steps: Vec<Step>,
}

/// One step of a multi-step case: a request (as a single-request case
/// has), or `tick: true` (the root context's timer fires; `callouts`
/// scripts the calls it makes, e.g. lease requests and reports).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// The clock moves this many milliseconds before the step.
    #[serde(default)]
    pub advance_ms: u64,
    #[serde(default)]
    pub tick: bool,
    #[serde(default)]
    pub request: Option<CaseRequest>,
    #[serde(default)]
    pub callouts: Vec<ScriptedCallout>,
    #[serde(default)]
    pub upstream_response: Option<UpstreamResponse>,
    #[serde(default)]
    pub expect: Option<Expect>,
    #[serde(default)]
    pub metrics: Map<String, Value>,
}

/// What a step is, borrowed from a [`Step`] or from a single-request case.
struct StepView<'a> {
    advance_ms: u64,
    /// `None`: a tick.
    request: Option<(&'a CaseRequest, &'a Expect)>,
    callouts: &'a [ScriptedCallout],
    upstream_response: Option<&'a UpstreamResponse>,
    metrics: &'a Map<String, Value>,
}

impl Case {
    /// The case's steps, checked for shape (a request step needs `expect`,
    /// a tick has neither request nor expectations of one).
    fn steps(&self) -> Result<Vec<StepView<'_>>> {
        if self.steps.is_empty() {
            let (Some(request), Some(expect)) = (&self.request, &self.expect) else {
                bail!("case {:?}: give `request` and `expect`, or `steps`", self.name);
            };
            return Ok(vec![StepView {
                advance_ms: 0,
                request: Some((request, expect)),
                callouts: &self.callouts,
                upstream_response: self.upstream_response.as_ref(),
                metrics: &self.metrics,
            }]);
        }
        if self.request.is_some() || self.expect.is_some() || !self.callouts.is_empty() || self.upstream_response.is_some() || !self.metrics.is_empty() {
            bail!("case {:?}: with `steps`, requests and expectations go in the steps", self.name);
        }
        self.steps
            .iter()
            .enumerate()
            .map(|(i, st)| {
                let request = match (st.tick, &st.request, &st.expect) {
                    (true, None, None) if st.upstream_response.is_none() => None,
                    (false, Some(r), Some(e)) => Some((r, e)),
                    _ => bail!("case {:?} step {}: a step is `tick: true` (with `callouts`, `metrics`) or a `request` with its `expect`", self.name, i + 1),
                };
                Ok(StepView { advance_ms: st.advance_ms, request, callouts: &st.callouts, upstream_response: st.upstream_response.as_ref(), metrics: &st.metrics })
            })
            .collect()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamResponse {
    pub status: u16,
    #[serde(default)]
    pub headers: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseRequest {
    #[serde(default = "default_method")]
    pub method: String,
    pub path: String,
    #[serde(default = "default_authority")]
    pub authority: String,
    #[serde(default = "default_scheme")]
    pub scheme: String,
    /// name → value, or name → [value, …] for a repeated header.
    #[serde(default)]
    pub headers: Map<String, Value>,
    /// Claims overrides for a minted Privy token (needs `privy_signing_key`).
    #[serde(default)]
    pub privy: Option<Map<String, Value>>,
}

fn default_method() -> String {
    "GET".into()
}
fn default_authority() -> String {
    "api.example.com".into()
}
fn default_scheme() -> String {
    "https".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedCallout {
    #[serde(default)]
    pub expect: Option<CalloutExpect>,
    pub respond: Respond,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalloutExpect {
    #[serde(default)]
    pub path: Option<String>,
    /// The Envoy cluster the callout went to.
    #[serde(default)]
    pub upstream: Option<String>,
    #[serde(default)]
    pub body: Option<Value>,
    #[serde(default)]
    pub body_absent: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Respond {
    /// `timeout` or `down`: the host reports the callout failed.
    Failure(String),
    Answer(Answer),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    pub status: u16,
    #[serde(default)]
    pub body: Option<Value>,
    #[serde(default)]
    pub headers: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub status: u16,
    #[serde(default)]
    pub body: Option<Value>,
    #[serde(default)]
    pub body_exact: Option<String>,
    #[serde(default)]
    pub headers: Map<String, Value>,
    #[serde(default)]
    pub upstream_headers: Map<String, Value>,
    /// Headers of the upstream's response as the client gets it (after the
    /// filter added its own, e.g. `payment-response`); needs `upstream_response`.
    #[serde(default)]
    pub response_headers: Map<String, Value>,
    #[serde(default)]
    pub callouts: Option<usize>,
}

/// A case file with its policy loaded and the signing key (if any) ready.
pub struct LoadedFile {
    pub path: PathBuf,
    pub file: CaseFile,
    pub config: Value,
    pub signing_key: Option<SigningKey>,
}

fn parse_yaml_or_json(text: &str, what: &Path) -> Result<Value> {
    // YAML is a superset of JSON: one parser reads both.
    serde_yaml::from_str(text).with_context(|| format!("{} is not valid YAML/JSON", what.display()))
}

fn read_pem(spec: &str, base: &Path) -> Result<String> {
    if spec.contains("-----BEGIN") {
        return Ok(spec.to_owned());
    }
    let p = base.join(spec);
    std::fs::read_to_string(&p).with_context(|| format!("privy_signing_key {}", p.display()))
}

pub fn load(path: &Path) -> Result<LoadedFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let raw = parse_yaml_or_json(&text, path)?;
    let file: CaseFile = serde_json::from_value(raw).with_context(|| format!("{}: not a case file", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut config = match (&file.policy, &file.config) {
        (Some(p), None) => {
            let pp = base.join(p);
            let t = std::fs::read_to_string(&pp).with_context(|| format!("policy {}", pp.display()))?;
            parse_yaml_or_json(&t, &pp)?
        }
        (None, Some(c)) => c.clone(),
        _ => bail!("{}: give exactly one of `policy` (a path) or `config` (inline)", path.display()),
    };
    let signing_key = match &file.privy_signing_key {
        None => None,
        Some(spec) => {
            let pem = read_pem(spec, base)?;
            let key = SigningKey::from_pkcs8_pem(pem.trim()).map_err(|e| anyhow!("privy_signing_key: not a P-256 PKCS#8 key: {e}"))?;
            let public = tokens::public_pem(&key).map_err(|e| anyhow!(e))?;
            let privy = config
                .get_mut("privy")
                .and_then(Value::as_object_mut)
                .ok_or_else(|| anyhow!("privy_signing_key given but the policy has no `privy` section"))?;
            privy.insert("verification_key".into(), Value::String(public));
            privy.remove("jwks");
            Some(key)
        }
    };
    Ok(LoadedFile { path: path.to_owned(), file, config, signing_key })
}

/// The result of one case.
#[derive(Debug)]
pub struct CaseResult {
    pub name: String,
    /// What differed; empty = passed.
    pub diffs: Vec<String>,
    /// The filter's log lines (shown for failures).
    pub logs: Vec<String>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.diffs.is_empty()
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Subset match: every field in `want` must be in `got` with the same value;
/// `null` in `want` means "absent".
pub fn subset(want: &Value, got: &Value, at: &str, diffs: &mut Vec<String>) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w {
                let here = format!("{at}.{k}");
                match (wv, g.get(k)) {
                    (Value::Null, None | Some(Value::Null)) => {}
                    (Value::Null, Some(gv)) => diffs.push(format!("{here}: expected absent, got {gv}")),
                    (_, None) => diffs.push(format!("{here}: expected {wv}, missing")),
                    (_, Some(gv)) => subset(wv, gv, &here, diffs),
                }
            }
        }
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                subset(wv, gv, &format!("{at}[{i}]"), diffs);
            }
        }
        _ if want == got => {}
        _ => diffs.push(format!("{at}: expected {want}, got {got}")),
    }
}

fn header_checks(want: &Map<String, Value>, got: &[(String, Vec<u8>)], what: &str, diffs: &mut Vec<String>) {
    for (name, wv) in want {
        let actual = header_value(got, name);
        match (wv, actual) {
            (Value::Null, None) => {}
            (Value::Null, Some(a)) => diffs.push(format!("{what} {name}: expected absent, got {a:?}")),
            (w, None) => diffs.push(format!("{what} {name}: expected {:?}, missing", text(w))),
            (w, Some(a)) if text(w) != a => diffs.push(format!("{what} {name}: expected {:?}, got {a:?}", text(w))),
            _ => {}
        }
    }
}

fn mint_privy(loaded: &LoadedFile, overrides: &Map<String, Value>, clock: i64) -> Result<String> {
    let key = loaded.signing_key.as_ref().ok_or_else(|| anyhow!("`privy:` needs `privy_signing_key` in the case file"))?;
    let privy = &loaded.config["privy"];
    let app = privy["app_id"].as_str().unwrap_or_default();
    let iss = privy["issuer"].as_str().unwrap_or("privy.io");
    let mut claims = tokens::privy_claims(app, "did:privy:case-user", clock - 10, clock + 3600);
    claims["iss"] = Value::String(iss.to_owned());
    claims["sid"] = Value::String("case-session".into());
    let mut header = serde_json::json!({"alg": "ES256", "typ": "JWT"});
    for (k, v) in overrides {
        match (k.as_str(), v) {
            ("header", h) => header = h.clone(),
            (_, Value::Null) => {
                claims.as_object_mut().map(|c| c.remove(k));
            }
            _ => claims[k] = v.clone(),
        }
    }
    Ok(tokens::sign_es256(key, &header, &claims))
}

fn answer_of(r: &Respond) -> Result<CallAnswer> {
    match r {
        Respond::Failure(f) if f == "timeout" || f == "down" => Ok(CallAnswer::Failed),
        Respond::Failure(f) => bail!("respond: {f:?} is not `timeout`, `down` or an answer"),
        Respond::Answer(a) => {
            let body = match &a.body {
                None => Vec::new(),
                Some(Value::String(s)) => s.clone().into_bytes(),
                Some(v) => v.to_string().into_bytes(),
            };
            let headers = a.headers.iter().map(|(k, v)| (k.clone(), text(v))).collect();
            Ok(CallAnswer::Response { status: a.status, headers, body })
        }
    }
}

/// Where callouts are answered: one HTTP stream, or the plugin (a tick's
/// callouts belong to the root context).
trait Callouts {
    fn pending(&self) -> Vec<crate::host::Callout>;
    fn answer_call(&mut self, token: u32, answer: CallAnswer) -> Result<()>;
}

impl Callouts for crate::plugin::HttpStream<'_> {
    fn pending(&self) -> Vec<crate::host::Callout> {
        self.pending_callouts()
    }
    fn answer_call(&mut self, token: u32, answer: CallAnswer) -> Result<()> {
        self.answer(token, answer)
    }
}

impl Callouts for Plugin {
    fn pending(&self) -> Vec<crate::host::Callout> {
        self.pending_callouts()
    }
    fn answer_call(&mut self, token: u32, answer: CallAnswer) -> Result<()> {
        self.answer(token, answer)
    }
}

/// Answers the pending callouts from the script, in order.
fn play_callouts(on: &mut impl Callouts, script: &[ScriptedCallout], made: &mut usize, at: &str, diffs: &mut Vec<String>) -> Result<()> {
    while let Some(callout) = on.pending().into_iter().next() {
        *made += 1;
        let n = *made;
        let Some(script) = script.get(n - 1) else {
            diffs.push(format!("{at}unexpected callout #{n} to {} {}", callout.upstream, callout.path()));
            on.answer_call(callout.token, CallAnswer::Failed)?;
            continue;
        };
        if let Some(e) = &script.expect {
            let at = format!("{at}callout #{n}");
            if let Some(p) = &e.path {
                if *p != callout.path() {
                    diffs.push(format!("{at} path: expected {p:?}, got {:?}", callout.path()));
                }
            }
            if let Some(u) = &e.upstream {
                if *u != callout.upstream {
                    diffs.push(format!("{at} upstream: expected {u:?}, got {:?}", callout.upstream));
                }
            }
            if let Some(b) = &e.body {
                subset(b, &callout.body_json(), &format!("{at} body"), diffs);
            }
            let body_text = String::from_utf8_lossy(&callout.body);
            for s in &e.body_absent {
                if body_text.contains(s.as_str()) {
                    diffs.push(format!("{at} body contains {s:?}, which must not leave the filter"));
                }
            }
        }
        on.answer_call(callout.token, answer_of(&script.respond)?)?;
    }
    Ok(())
}

/// Runs one case on a fresh plugin instance.
pub fn run_case(wasm: &Wasm, loaded: &LoadedFile, index: usize, case: &Case) -> Result<CaseResult> {
    let steps = case.steps()?;
    let clock = case.clock.or(loaded.file.clock).unwrap_or(DEFAULT_CLOCK);
    let mut opts = PluginOptions::new(loaded.config.to_string()).clock_secs(clock);
    for (k, v) in &loaded.file.env {
        opts = opts.env(k, &text(v));
    }
    let mut plugin = Plugin::start(wasm, opts).map_err(|e| anyhow!("{e}"))?;
    let mut diffs = Vec::new();
    let many = !case.steps.is_empty();
    for (i, step) in steps.iter().enumerate() {
        // Diffs of a multi-step case name their step.
        let at = if many { format!("step {}: ", i + 1) } else { String::new() };
        plugin.advance(std::time::Duration::from_millis(step.advance_ms));
        let mut step_diffs = Vec::new();
        let mut made = 0usize;
        match step.request {
            None => {
                plugin.tick()?;
                play_callouts(&mut plugin, step.callouts, &mut made, "", &mut step_diffs)?;
            }
            Some((request, expect)) => {
                let id = if many { format!("case-{index}-{}", i + 1) } else { format!("case-{index}") };
                let now = i64::try_from(plugin.now_nanos() / 1_000_000_000).unwrap_or(clock);
                run_request(&mut plugin, loaded, &id, now, request, expect, step, &mut made, &mut step_diffs)?;
            }
        }
        if made < step.callouts.len() {
            step_diffs.push(format!("expected {} callouts, the filter made {made}", step.callouts.len()));
        }
        for (name, want) in step.metrics {
            let got = plugin.metric(name).map_or(Value::Null, |m| Value::from(m.value));
            if got != *want {
                step_diffs.push(format!("metric {name}: expected {want}, got {got}"));
            }
        }
        diffs.extend(step_diffs.into_iter().map(|d| format!("{at}{d}")));
        if plugin.crashed().is_some() {
            break;
        }
    }
    if let Some(c) = plugin.crashed() {
        diffs.push(format!("the filter crashed: {c}"));
    }
    let logs = plugin.logs().iter().map(|l| format!("[{:?}] {}", l.level, l.message)).collect();
    Ok(CaseResult { name: case.name.clone(), diffs, logs })
}

/// One request step: the request, its callouts, the upstream's answer, the
/// expectations.
#[allow(clippy::too_many_arguments)]
fn run_request(
    plugin: &mut Plugin,
    loaded: &LoadedFile,
    default_id: &str,
    now: i64,
    r: &CaseRequest,
    e: &Expect,
    step: &StepView<'_>,
    made: &mut usize,
    diffs: &mut Vec<String>,
) -> Result<()> {
    let mut headers: Vec<(String, Vec<u8>)> = vec![
        (":method".into(), r.method.clone().into_bytes()),
        (":path".into(), r.path.clone().into_bytes()),
        (":authority".into(), r.authority.clone().into_bytes()),
        (":scheme".into(), r.scheme.clone().into_bytes()),
    ];
    for (k, v) in &r.headers {
        match v {
            Value::Array(vs) => headers.extend(vs.iter().map(|x| (k.to_ascii_lowercase(), text(x).into_bytes()))),
            other => headers.push((k.to_ascii_lowercase(), text(other).into_bytes())),
        }
    }
    if !headers.iter().any(|(k, _)| k == "x-request-id") {
        headers.push(("x-request-id".into(), default_id.as_bytes().to_vec()));
    }
    if let Some(claims) = &r.privy {
        if headers.iter().any(|(k, _)| k == "authorization") {
            bail!("give `privy` or an authorization header, not both");
        }
        headers.push(("authorization".into(), format!("Bearer {}", mint_privy(loaded, claims, now)?).into_bytes()));
    }
    let raw: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();

    let mut stream = plugin.http()?;
    stream.send_request_headers(&raw, true)?;
    play_callouts(&mut stream, step.callouts, made, "", diffs)?;
    if let (Some(up), Outcome::Passed(_)) = (step.upstream_response, stream.outcome()) {
        let status = up.status.to_string();
        let mut h: Vec<(String, String)> = vec![(":status".into(), status)];
        h.extend(up.headers.iter().map(|(k, v)| (k.clone(), text(v))));
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let action = stream.send_response_headers(&h)?;
        play_callouts(&mut stream, step.callouts, made, "", diffs)?;
        if action == crate::abi::Action::Pause && !stream.response_resumed() && stream.local_reply().is_none() {
            diffs.push("the filter left the upstream's response paused".into());
        }
    }
    if let Some(n) = e.callouts {
        if n != *made {
            diffs.push(format!("callouts: expected {n}, got {made}"));
        }
    }
    match stream.outcome() {
        Outcome::Paused => diffs.push("the filter left the request paused".into()),
        Outcome::Passed(upstream) => {
            if e.status != 200 {
                diffs.push(format!("status: expected {} (a local reply), but the request was passed upstream", e.status));
            }
            header_checks(&e.upstream_headers, &upstream, "upstream header", diffs);
            header_checks(&e.response_headers, &stream.response_headers(), "response header", diffs);
            if e.body.is_some() || e.body_exact.is_some() || !e.headers.is_empty() {
                diffs.push("body/headers expected, but the request was passed upstream (no local reply)".into());
            }
        }
        Outcome::Replied(reply) => {
            if u32::from(e.status) != reply.status {
                diffs.push(format!("status: expected {}, got {} with body {}", e.status, reply.status, reply.body_str()));
            }
            if let Some(b) = &e.body {
                let got: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
                subset(b, &got, "body", diffs);
            }
            if let Some(x) = &e.body_exact {
                if *x != reply.body_str() {
                    diffs.push(format!("body: expected exactly {x}, got {}", reply.body_str()));
                }
            }
            header_checks(&e.headers, &reply.headers, "reply header", diffs);
            if !e.upstream_headers.is_empty() {
                diffs.push("upstream headers expected, but the filter replied locally".into());
            }
        }
    }
    stream.close()?;
    Ok(())
}

/// Runs every case of a file. A case that cannot run at all is a failure.
pub fn run_file(wasm: &Wasm, path: &Path) -> Result<Vec<CaseResult>> {
    let loaded = load(path)?;
    Ok(loaded
        .file
        .cases
        .iter()
        .enumerate()
        .map(|(i, case)| {
            run_case(wasm, &loaded, i, case).unwrap_or_else(|e| CaseResult {
                name: case.name.clone(),
                diffs: vec![format!("could not run: {e:#}")],
                logs: vec![],
            })
        })
        .collect())
}
