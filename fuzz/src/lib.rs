//! What the fuzz targets share: the fixed key set, the fixed policies, token
//! minting, and the invariant checks. Also used by `examples/gen_seeds.rs`,
//! which writes the checked-in seed corpora.
//!
//! Every check here panics on a violation: under libFuzzer a panic is a
//! crash, saved to `fuzz/artifacts/<target>/`.

use std::sync::OnceLock;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use dialtone::denial::Denial;
use dialtone::policy::Config;
use dialtone::privy_jwt::{self, PrivyVerifier};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{EncodePublicKey, LineEnding};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// The issuer, audience, clock and leeway of the derived Privy conformance
/// corpus (`tests/vectors/derived/es256_privy_conformance.json`), so its
/// tokens are meaningful seeds.
pub const ISSUER: &str = "privy.io";
pub const APP_ID: &str = "conformance-app";
pub const NOW: i64 = 1_700_000_100;
pub const LEEWAY: i64 = 60;

/// The operator admin key of the fuzzing policies (given as the VM
/// environment's `DIAL_ADMIN_API_KEY`, or as its SHA-256 in the config).
pub const ADMIN_KEY: &str = "fuzz-operator-admin-key-0123456789";

/// The account the service answers for in `credits_answers` seeds (the
/// OpenAPI document's example account) and the hold id it hands out.
pub const ACCOUNT: &str = "did:privy:cm123abc";
pub const HOLD_ID: &str = "hold_3f9a1c0b7d2e4a65b1c2d3e4";

/// RFC 7515 A.3's published private scalar: the conformance corpus's key,
/// held in the JWKS under kid [`CONFORMANCE_KID`].
const RFC7515_A3_D: &str = "jpsQnnGQmL-YBIffH1136cspYG6-0iY7X1fCE9-E9LI";
pub const CONFORMANCE_KID: &str = "conformance-key";
/// A second JWKS key.
pub const JWKS2_KID: &str = "fuzz-jwks-2";
pub const FETCHED_KID: &str = "fuzz-fetched";

/// Which key signs a minted token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// The pinned PEM key (no kid: tried for every token).
    Pem,
    /// The conformance key, JWKS kid `conformance-key`.
    Jwks1,
    /// JWKS kid `fuzz-jwks-2`.
    Jwks2,
    /// A key nobody trusts.
    Attacker,
    /// The key of [`fetched_keys`]: trusted only when the request carries it.
    Fetched,
}

pub fn signing_key(which: Key) -> &'static SigningKey {
    static KEYS: OnceLock<[SigningKey; 5]> = OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        let from = |bytes: &[u8]| SigningKey::from_slice(bytes).expect("fixed scalar is a valid P-256 key");
        let a3 = URL_SAFE_NO_PAD.decode(RFC7515_A3_D).expect("RFC 7515 A.3 d is base64url");
        [from(&[0x5a; 32]), from(&a3), from(&[0x2b; 32]), from(&[0x33; 32]), from(&[0x4c; 32])]
    });
    match which {
        Key::Pem => &keys[0],
        Key::Jwks1 => &keys[1],
        Key::Jwks2 => &keys[2],
        Key::Attacker => &keys[3],
        Key::Fetched => &keys[4],
    }
}

/// Keys "fetched from the issuer's JWKS" (`Request::fetched_keys`), kid [`FETCHED_KID`].
pub fn fetched_keys() -> &'static [privy_jwt::EsKey] {
    static K: OnceLock<Vec<privy_jwt::EsKey>> = OnceLock::new();
    K.get_or_init(|| {
        privy_jwt::keys_from_jwks(&json!({"keys": [jwk(Key::Fetched, FETCHED_KID)]}), privy_jwt::DEFAULT_MAX_KEYS)
            .expect("fetched JWKS parses")
    })
}

/// The pinned key, as the Privy dashboard shows it (PEM, SPKI).
pub fn pem_public_key() -> String {
    signing_key(Key::Pem)
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("a P-256 key encodes as PEM")
}

fn jwk(which: Key, kid: &str) -> Value {
    let point = signing_key(which).verifying_key().to_encoded_point(false);
    let coord = |c: Option<&p256::FieldBytes>| URL_SAFE_NO_PAD.encode(c.expect("uncompressed point"));
    json!({"kty": "EC", "crv": "P-256", "x": coord(point.x()), "y": coord(point.y()),
           "kid": kid, "use": "sig", "alg": "ES256"})
}

/// The JWKS of the fixed key set: two ES256 keys and an RSA key to skip.
pub fn jwks() -> Value {
    json!({"keys": [
        {"kty": "RSA", "kid": "rsa-1", "n": "sXch", "e": "AQAB"},
        jwk(Key::Jwks1, CONFORMANCE_KID),
        jwk(Key::Jwks2, JWKS2_KID),
    ]})
}

/// The verifier of the `privy_verify` target, built by the filter's own key
/// parsers: the PEM key and the JWKS keys.
pub fn verifier() -> &'static PrivyVerifier {
    static V: OnceLock<PrivyVerifier> = OnceLock::new();
    V.get_or_init(|| {
        let mut keys = vec![privy_jwt::key_from_pem(&pem_public_key()).expect("PEM key parses")];
        keys.extend(privy_jwt::keys_from_jwks(&jwks(), privy_jwt::DEFAULT_MAX_KEYS).expect("JWKS parses"));
        assert_eq!(keys.len(), 3);
        PrivyVerifier { keys, issuer: ISSUER.into(), app_id: APP_ID.into(), leeway_secs: LEEWAY }
    })
}

/// A JWS compact serialization of `header` and `claims` (raw JSON text),
/// signed with ES256 (deterministic, RFC 6979).
pub fn mint(which: Key, header: &str, claims: &str) -> String {
    let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
    let sig: Signature = signing_key(which).sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
}

/// Claims Privy would issue, valid at [`NOW`].
pub fn good_claims(sub: &str, exp: i64) -> String {
    json!({"sid": "fuzz-session", "iss": ISSUER, "iat": NOW - 100, "aud": APP_ID, "sub": sub, "exp": exp})
        .to_string()
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// --- policies ----------------------------------------------------------------

/// The x402 requirements the fuzzing policies announce.
fn x402(amount: &str) -> Value {
    json!({"description": "fuzz", "mime_type": "application/json", "accepts": [
        {"scheme": "exact", "network": "eip155:84532", "amount": amount,
         "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
         "payTo": "0x000000000000000000000000000000000000dEaD", "maxTimeoutSeconds": 60,
         "extra": {"name": "USDC", "version": "2"}}]})
}

/// The same, settled before the upstream (a top-up).
fn x402_settled_first(amount: &str) -> Value {
    let mut v = x402(amount);
    v["settle"] = json!("before_upstream");
    v
}

/// The routes of the fuzzing policies: every kind of route the filter knows.
pub fn routes() -> Value {
    json!([
        {"name": "sms_send", "methods": ["POST"], "path": {"exact": "/api/v1/sms/send"}, "scope": "sms:send",
         "cost": 1, "payment": ["credits", "x402"], "x402": x402("10000")},
        {"name": "report", "methods": ["POST", "PUT"], "path": {"exact": "/api/v1/report"}, "scope": "sms:send",
         "cost": 3, "charge": "up_front"},
        {"name": "account", "methods": ["GET"], "path": {"exact": "/api/v1/account"}, "cost": 0},
        {"name": "key_get", "methods": ["GET", "DELETE"], "path": {"template": "/api/v1/keys/{id}"}, "scope": "keys:read"},
        {"name": "credits_top_up", "methods": ["POST"], "path": {"exact": "/api/v1/credits/top-up"},
         "credentials": ["privy", "api_key", "api_token"], "payment": ["x402"], "x402": x402_settled_first("1000000")},
        {"name": "files", "path": {"prefix": "/files/"}, "scope": "files:read", "cost": 2},
        {"name": "healthz", "methods": ["GET"], "path": {"exact": "/healthz"}, "public": true}
    ])
}

/// Policy A: rate limit, cookie tokens, unmatched requests denied, the admin
/// key from the VM environment ([`ADMIN_KEY`] is passed to `from_json`).
pub fn policy_a() -> Value {
    json!({
        "credits_service": {"cluster": "dialtone_credits", "authority": "credits.internal", "timeout_ms": 1000},
        "privy": {"app_id": APP_ID, "issuer": ISSUER, "verification_key": pem_public_key(), "jwks": jwks(),
                  "leeway_seconds": LEEWAY, "accept_cookie": true},
        "unmatched": "deny",
        "rate_limit": {"requests": 60, "window_seconds": 60, "burst": 10},
        "x402_facilitator": {"cluster": "x402_facilitator"},
        "routes": routes()
    })
}

/// Policy B: no rate limit, no cookies, unmatched requests allowed, the admin
/// key as a SHA-256 in the config, custom service paths.
pub fn policy_b() -> Value {
    json!({
        "credits_service": {"cluster": "credits", "timeout_ms": 250, "lookup_path": "/k/lookup",
                            "debit_path": "/k/debit", "holds_path": "/k/holds/", "ratelimit_path": "/k/rl",
                            "hold_ttl_seconds": 30, "max_response_bytes": 4096},
        "admin_key_sha256": hex(&sha256(ADMIN_KEY.as_bytes())),
        "privy": {"app_id": APP_ID, "verification_key": pem_public_key(), "jwks": jwks(), "leeway_seconds": 0},
        "unmatched": "allow",
        "forward_authorization": true,
        "max_token_bytes": 2048,
        "x402_facilitator": {"cluster": "facilitator", "verify_path": "/f/verify", "settle_path": "/f/settle",
                             "max_response_bytes": 2048, "max_payment_bytes": 1024},
        "routes": routes()
    })
}

/// The two compiled policies of the `decision` target.
pub fn decision_configs() -> &'static [Config; 2] {
    static C: OnceLock<[Config; 2]> = OnceLock::new();
    C.get_or_init(|| {
        let load = |v: Value, env: Option<&str>| {
            Config::from_json(v.to_string().as_bytes(), env).unwrap_or_else(|e| panic!("fuzz policy invalid: {e}"))
        };
        [load(policy_a(), Some(ADMIN_KEY)), load(policy_b(), None)]
    })
}

// --- invariant checks -------------------------------------------------------

/// A value that can go into an HTTP header: no controls, no CR/LF, ASCII.
pub fn header_value_ok(v: &str) -> bool {
    v.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// Every local reply: a refusal status, `content-type: application/json`, a
/// JSON object body with `"success": false` and the denial's `error` code,
/// header values that cannot split a response, and the extras its kind
/// promises.
pub fn check_denial(d: &Denial) {
    let r = d.reply();
    assert!(matches!(r.status, 401 | 402 | 403 | 429 | 503), "unexpected status {} for {d:?}", r.status);
    let body: Value = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("reply body is not JSON ({e}): {:?}", r.body));
    assert!(body.is_object(), "reply body is not an object: {}", r.body);
    assert_eq!(body.get("success"), Some(&Value::Bool(false)), "reply body: {}", r.body);
    assert_eq!(body.get("error").and_then(Value::as_str), Some(d.code()), "reply body: {}", r.body);
    assert!(r.headers.iter().any(|(n, v)| *n == "content-type" && v == "application/json"), "{:?}", r.headers);
    for (n, v) in &r.headers {
        assert!(header_value_ok(v), "header {n} has unsafe bytes: {v:?}");
    }
    let header = |name: &str| r.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str());
    match d {
        Denial::Unauthorized(_) => {
            assert_eq!(r.status, 401);
            assert!(header("www-authenticate").is_some_and(|w| w.starts_with("Bearer realm=")), "{:?}", r.headers);
        }
        Denial::InsufficientScope { scope } => {
            assert_eq!(r.status, 403);
            assert_eq!(body["required_scope"].as_str(), Some(scope.as_str()));
        }
        Denial::InsufficientCredits { credits, required } => {
            assert_eq!(r.status, 402);
            assert_eq!(body["credits"].as_i64(), Some(*credits));
            assert_eq!(body["required"].as_u64(), Some(*required));
        }
        Denial::PaymentRequired { .. } => {
            assert_eq!(r.status, 402);
            let raw = header("payment-required").unwrap_or_else(|| panic!("no PAYMENT-REQUIRED header: {:?}", r.headers));
            let decoded = STANDARD.decode(raw).unwrap_or_else(|e| panic!("PAYMENT-REQUIRED is not base64: {e}"));
            let req: Value = serde_json::from_slice(&decoded).unwrap_or_else(|e| panic!("PAYMENT-REQUIRED is not JSON: {e}"));
            assert_eq!(req["x402Version"], 2);
            assert_eq!(req["accepts"], body["accepts"]);
        }
        Denial::PaymentFailed { reason, receipt } => {
            assert_eq!(r.status, 402);
            assert_eq!(header("payment-response"), Some(receipt.as_str()));
            assert_eq!(header("cache-control"), Some("no-store"));
            assert_eq!(body["reason"].as_str(), Some(reason.as_str()));
        }
        Denial::PaymentUnavailable(e) => {
            assert_eq!(r.status, 503);
            assert!(!e.reason().is_empty());
        }
        Denial::RouteNotAllowed => assert_eq!(r.status, 403),
        Denial::CreditsUnavailable(e) => {
            assert_eq!(r.status, 503);
            assert!(!e.reason().is_empty());
        }
        Denial::RateLimited { retry_after } => {
            assert_eq!(r.status, 429);
            assert_eq!(header("retry-after"), Some(retry_after.to_string().as_str()));
        }
    }
}

/// A service answer's body as the oracle reads it: a JSON text by RFC 8259's
/// grammar (checked here, by [`is_json_text`], not by serde_json), in UTF-8
/// throughout, and an object. The filter's parsers must refuse anything
/// else: serde's derive alone would skip invalid UTF-8 in ignored members
/// and take the array form (fuzz/artifacts-found/README.md, fixed in the
/// filter's `credits_api::object`).
///
/// Valid JSON is not always something `serde_json::Value` can hold: a number
/// beyond `f64` (`1e400`), a lone surrogate escape (`"\ud800"`), nesting
/// deeper than serde_json's 128 levels. The filter's parsers skip unknown
/// members without building them, so they rightly take such an answer (the
/// `credits_answers-huge-number-in-ignored-member` artifact). Those members
/// are left out of the object returned here, so a check that needs one of
/// them sees it missing.
pub fn answer_json(body: &[u8]) -> Option<Value> {
    json_object(body).map(Value::Object)
}

/// The members of a JSON object text (see [`answer_json`]); None if `bytes`
/// is not an RFC 8259 JSON text whose value is an object.
pub fn json_object(bytes: &[u8]) -> Option<Map<String, Value>> {
    if !is_json_text(bytes) {
        return None;
    }
    let mut s = Scan { b: bytes, i: 0 };
    s.ws();
    if !s.eat(b'{') {
        return None;
    }
    if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(bytes) {
        return Some(m);
    }
    // Valid, but serde_json cannot hold all of it: member by member. The
    // text is known to be valid, so the scan cannot fail here.
    let mut members = Map::new();
    s.ws();
    if s.eat(b'}') {
        return Some(members);
    }
    loop {
        s.ws();
        let k = s.i;
        s.string();
        let key = serde_json::from_slice::<String>(bytes.get(k..s.i)?);
        s.ws();
        s.eat(b':');
        s.ws();
        let v = s.i;
        s.value();
        match (key, serde_json::from_slice::<Value>(bytes.get(v..s.i)?)) {
            // Later members replace earlier ones, as serde_json does.
            (Ok(key), Ok(value)) => {
                members.insert(key, value);
            }
            (Ok(key), Err(_)) => {
                members.remove(&key);
            }
            // A key with a lone surrogate names no member anyone reads.
            (Err(_), _) => {}
        }
        s.ws();
        if !s.eat(b',') {
            return Some(members);
        }
    }
}

/// Whether `bytes` is a JSON text (RFC 8259 §2): UTF-8, one value between
/// optional whitespace, by the grammar alone. The grammar puts no bound on
/// nesting, on a number's size or precision, or on which `\uXXXX` escapes
/// pair up; neither does this (RFC 8259 §9 lets a parser set limits, and
/// the filter's parsers apply their own only to the members they read).
pub fn is_json_text(bytes: &[u8]) -> bool {
    if std::str::from_utf8(bytes).is_err() {
        return false;
    }
    let mut s = Scan { b: bytes, i: 0 };
    if !s.value() {
        return false;
    }
    s.ws();
    s.i == bytes.len()
}

/// A cursor over a JSON text for [`is_json_text`] and [`json_object`].
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scan<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        if hit {
            self.i += 1;
        }
        hit
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        self.i - start
    }

    /// `number = [ "-" ] int [ frac ] [ exp ]`.
    fn number(&mut self) -> bool {
        self.eat(b'-');
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return false,
        }
        if self.eat(b'.') && self.digits() == 0 {
            return false;
        }
        if self.eat(b'e') || self.eat(b'E') {
            let _ = self.eat(b'+') || self.eat(b'-');
            if self.digits() == 0 {
                return false;
            }
        }
        true
    }

    /// A string, from its opening quote: no raw control characters, only
    /// the grammar's escapes (any four hex digits after `\u`).
    fn string(&mut self) -> bool {
        if !self.eat(b'"') {
            return false;
        }
        loop {
            match self.peek() {
                None => return false,
                Some(b'"') => {
                    self.i += 1;
                    return true;
                }
                Some(b'\\') => {
                    self.i += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 1,
                        Some(b'u') => {
                            self.i += 1;
                            for _ in 0..4 {
                                if !self.peek().is_some_and(|c| c.is_ascii_hexdigit()) {
                                    return false;
                                }
                                self.i += 1;
                            }
                        }
                        _ => return false,
                    }
                }
                Some(c) if c < 0x20 => return false,
                Some(_) => self.i += 1,
            }
        }
    }

    /// One value, leading whitespace included; iterative, so any depth.
    fn value(&mut self) -> bool {
        // The open arrays and objects, innermost last.
        let mut open: Vec<u8> = Vec::new();
        'value: loop {
            self.ws();
            let scalar = match self.peek() {
                Some(b'{') => {
                    self.i += 1;
                    self.ws();
                    if self.eat(b'}') {
                        true
                    } else {
                        open.push(b'{');
                        if !self.member_name() {
                            return false;
                        }
                        continue 'value;
                    }
                }
                Some(b'[') => {
                    self.i += 1;
                    self.ws();
                    if self.eat(b']') {
                        true
                    } else {
                        open.push(b'[');
                        continue 'value;
                    }
                }
                Some(b'"') => self.string(),
                Some(b'-' | b'0'..=b'9') => self.number(),
                Some(b't') => self.literal(b"true"),
                Some(b'f') => self.literal(b"false"),
                Some(b'n') => self.literal(b"null"),
                _ => false,
            };
            if !scalar {
                return false;
            }
            // A value is complete: close what it completes.
            loop {
                self.ws();
                let Some(&inner) = open.last() else { return true };
                if self.eat(b',') {
                    if inner == b'{' && !self.member_name() {
                        return false;
                    }
                    continue 'value;
                }
                if !self.eat(if inner == b'{' { b'}' } else { b']' }) {
                    return false;
                }
                open.pop();
            }
        }
    }

    /// `ws string ws ":"` inside an object.
    fn member_name(&mut self) -> bool {
        self.ws();
        if !self.string() {
            return false;
        }
        self.ws();
        self.eat(b':')
    }

    fn literal(&mut self, word: &[u8]) -> bool {
        let hit = self.b.get(self.i..).is_some_and(|rest| rest.starts_with(word));
        if hit {
            self.i += word.len();
        }
        hit
    }
}

/// A member of a service answer (an object, see [`answer_json`]).
pub fn answer_field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.as_object()?.get(name)
}

// --- inputs for the two-way checks --------------------------------------------

/// A fuzz input read as a stream of choices, for the checks that build a
/// valid input from it ("a valid X must be accepted"). Past the end every
/// choice is 0: bounded, and the same input always makes the same choices.
pub struct Choices<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Choices<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Choices { bytes, pos: 0 }
    }

    pub fn byte(&mut self) -> u8 {
        let b = self.bytes.get(self.pos).copied().unwrap_or(0);
        self.pos = self.pos.saturating_add(1);
        b
    }

    pub fn bool(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    pub fn u64(&mut self) -> u64 {
        (0..8).fold(0, |acc, _| (acc << 8) | u64::from(self.byte()))
    }

    /// `n` bytes (zeros past the end of the input).
    pub fn bytes<const N: usize>(&mut self) -> [u8; N] {
        std::array::from_fn(|_| self.byte())
    }

    /// A number in `0..n` (0 if `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let wide = if n > 256 { (usize::from(self.byte()) << 8) | usize::from(self.byte()) } else { usize::from(self.byte()) };
        wide % n
    }

    /// One of `items` (which must not be empty).
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    /// `len` bytes of `alphabet`, `len` in `min..=max`.
    pub fn text(&mut self, alphabet: &[u8], min: usize, max: usize) -> String {
        let len = min + self.below(max - min + 1);
        (0..len).map(|_| char::from(self.pick(alphabet))).collect()
    }

    /// Whitespace a JSON encoder may put between tokens (RFC 8259 `ws`).
    pub fn ws(&mut self) -> &'static str {
        self.pick(&["", "", "", " ", "\n", "\t", "\r\n  "])
    }

    /// `s` as a JSON string, with the escapes an encoder must write, and now
    /// and then one it may write (`\/`, `\u00XX` for any ASCII character).
    pub fn json_string(&mut self, s: &str) -> String {
        let mut out = String::from("\"");
        for ch in s.chars() {
            let optional = ch.is_ascii() && self.byte() >= 232;
            match ch {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '/' if optional && self.bool() => out.push_str("\\/"),
                c if (c as u32) < 0x20 || (optional && c.is_ascii()) => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    /// A JSON object of `members` (name, JSON value text), in an order and
    /// with whitespace chosen here.
    pub fn json_object(&mut self, mut members: Vec<(&str, String)>) -> String {
        // Fisher-Yates with the input's choices.
        for i in (1..members.len()).rev() {
            let j = self.below(i + 1);
            members.swap(i, j);
        }
        let mut out = format!("{}{{", self.ws());
        for (i, (name, value)) in members.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let (a, b, c, d) = (self.ws(), self.ws(), self.ws(), self.ws());
            let name = self.json_string(name);
            out.push_str(&format!("{a}{name}{b}:{c}{value}{d}"));
        }
        out.push_str(self.ws());
        out.push('}');
        out.push_str(self.ws());
        out
    }
}

/// Visible ASCII (0x21-0x7e): what may go into an upstream header.
pub const VISIBLE: &[u8] = b"!\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~";
pub const LOWER_HEX: &[u8] = b"0123456789abcdef";
pub const ALNUM: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
