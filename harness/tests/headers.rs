//! Headers from hell, through the compiled filter: every odd `Authorization`
//! header gets the answer `src/bearer.rs` documents (docs/security-tests.md
//! has the table), nothing reaches a callout or the upstream, client-sent
//! `x-dialtone-*` headers never survive, and the VM never crashes.
//!
//! Bytes are sent as given: the harness does not normalise header values the
//! way Envoy does (Envoy refuses control bytes itself with a 400, and trims
//! surrounding whitespace), so the filter's own parser is tested here at its
//! rawest; tests/e2e/tests/attacks.rs sends a few through a real Envoy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::*;
use base64::{engine::general_purpose::STANDARD, Engine as _};
use dialtone_harness::{Action, CallAnswer, Callout, Outcome, Plugin};
use serde_json::json;

const ACCOUNT: &str = "/api/v1/account";
const SMS: &str = "/api/v1/sms/send";
/// The payer the scripted facilitator reports (anvil's second account).
const PAYER: &str = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";

const MULTIPLE: &str = "more than one Authorization header";
const NOT_BEARER: &str = "the Authorization scheme must be Bearer";
const EMPTY: &str = "the Bearer token is empty";
const TOO_LONG: &str = "the Bearer token is too long";
const BAD_CHARS: &str = "the Bearer token has characters RFC 6750 does not allow";
const UNKNOWN: &str = "the Bearer token is not a recognised credential";

fn base(path: &str) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (":method", b"GET".to_vec()),
        (":path", path.as_bytes().to_vec()),
        (":authority", b"api.example.com".to_vec()),
        (":scheme", b"https".to_vec()),
        ("x-request-id", b"req-1".to_vec()),
    ]
}

fn counter(p: &Plugin, name: &str) -> i64 {
    p.metric(name).map(|m| m.value).unwrap_or_else(|| panic!("{name} not defined"))
}

/// Sends `auth` (zero or more raw Authorization values) with a *good*
/// `privy-token` cookie next to them (the demo policy reads that cookie; a
/// bad header must not be rescued by it) and checks the whole 401.
fn refused(p: &mut Plugin, what: &str, auth: &[&[u8]], message: &str, rfc6750: &str) {
    let denied = counter(p, "dialtone.denied.unauthorized");
    let callouts = p.callout_log().len();
    let cookie = format!("privy-token={}", privy_token());
    let mut headers = base(ACCOUNT);
    headers.extend(auth.iter().map(|v| ("authorization", v.to_vec())));
    headers.push(("cookie", cookie.into_bytes()));
    let raw: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    let mut s = p.http().unwrap();
    let action = s.send_request_headers(&raw, true).unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert_eq!(action, Action::Pause, "{what}");
    let Outcome::Replied(r) = s.outcome() else { panic!("{what}: not refused: {:?}", s.outcome()) };
    common::assert_unauthorized(&r, what, message, rfc6750);
    assert!(s.callouts().is_empty(), "{what}");
    s.close().unwrap();
    assert_eq!(p.callout_log().len(), callouts, "{what}");
    assert_eq!(counter(p, "dialtone.denied.unauthorized"), denied + 1, "{what}");
    assert!(p.crashed().is_none(), "{what}: {:?}", p.crashed());
}

/// `auth` is read as the good Privy token: the free route passes with the session.
fn accepted(p: &mut Plugin, what: &str, auth: &[u8]) {
    let mut headers = base(ACCOUNT);
    headers.push(("authorization", auth.to_vec()));
    let raw: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    let mut s = p.http().unwrap();
    s.send_request_headers(&raw, true).unwrap();
    let Outcome::Passed(_) = s.outcome() else { panic!("{what}: {:?}", s.outcome()) };
    assert_eq!(s.upstream_header("x-dialtone-account").as_deref(), Some(USER), "{what}");
    assert_eq!(s.upstream_header("x-dialtone-auth-method").as_deref(), Some("privy"), "{what}");
    assert_eq!(s.upstream_header("authorization"), None, "{what}: the credential stays at the edge");
    s.close().unwrap();
}

/// RFC 7235: the scheme is case-insensitive. Whitespace around the value and
/// any run of spaces/tabs after the first space are tolerated.
#[test]
fn scheme_is_case_insensitive_and_surrounding_whitespace_is_trimmed() {
    let t = privy_token();
    let mut p = demo();
    for v in [
        format!("Bearer {t}"),
        format!("bearer {t}"),
        format!("BEARER {t}"),
        format!("bEaReR {t}"),
        format!("Bearer     {t}"),
        format!("Bearer \t\t{t}"),
        format!("Bearer {t}   "),
        format!("Bearer {t}\t"),
        format!("   Bearer {t}"),
        format!("\tBearer {t}\t"),
        format!(" \t Bearer \t {t} \t "),
    ] {
        accepted(&mut p, &format!("{v:?}"), v.as_bytes());
    }
    assert!(p.crashed().is_none());
}

#[test]
fn empty_and_non_bearer_values() {
    let t = privy_token();
    let mut p = demo();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty value", b"".to_vec(), NOT_BEARER),
        ("only spaces", b"    ".to_vec(), NOT_BEARER),
        ("Bearer", b"Bearer".to_vec(), EMPTY),
        ("bearer", b"bearer".to_vec(), EMPTY),
        ("Bearer and one space", b"Bearer ".to_vec(), EMPTY),
        ("Bearer and spaces", b"Bearer        ".to_vec(), EMPTY),
        ("Bearer, spaces and tabs", b"Bearer \t \t ".to_vec(), EMPTY),
        ("tab instead of the space", format!("Bearer\t{t}").into_bytes(), NOT_BEARER),
        ("no separator", format!("Bearer{t}").into_bytes(), NOT_BEARER),
        ("colon", format!("Bearer:{t}").into_bytes(), NOT_BEARER),
        ("colon and space", format!("Bearer: {t}").into_bytes(), NOT_BEARER),
        ("Basic", b"Basic dXNlcjpwYXNz".to_vec(), NOT_BEARER),
        ("Token scheme", format!("Token {t}").into_bytes(), NOT_BEARER),
        ("DPoP scheme", format!("DPoP {t}").into_bytes(), NOT_BEARER),
        ("token without a scheme", t.clone().into_bytes(), NOT_BEARER),
        ("NBSP as the separator", [b"Bearer\xc2\xa0".as_slice(), t.as_bytes()].concat(), NOT_BEARER),
        ("NUL before the scheme", [b"\x00Bearer ".as_slice(), t.as_bytes()].concat(), NOT_BEARER),
        ("non-UTF-8 before the scheme", [b"\xffBearer ".as_slice(), t.as_bytes()].concat(), NOT_BEARER),
        ("non-UTF-8 only", b"\xff\xfe\xfd".to_vec(), NOT_BEARER),
        ("comma list, Basic first", format!("Basic dXNlcjpwYXNz, Bearer {t}").into_bytes(), NOT_BEARER),
    ];
    for (what, v, message) in &cases {
        let rfc = "invalid_request";
        refused(&mut p, what, &[v], message, rfc);
    }
    assert!(p.crashed().is_none());
}

#[test]
fn bytes_outside_rfc6750_are_refused() {
    let t = privy_token();
    let mut p = demo();
    let with = |prefix: &[u8], suffix: &[u8]| [b"Bearer ".as_slice(), prefix, t.as_bytes(), suffix].concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("comma list, Bearer first", format!("Bearer {t}, Basic dXNlcjpwYXNz").into_bytes()),
        ("two tokens, comma", format!("Bearer {t},{t}").into_bytes()),
        ("two tokens, space", format!("Bearer {t} {t}").into_bytes()),
        ("quoted token", with(b"\"", b"\"")),
        ("NUL inside", with(b"", b"\x00")),
        ("NUL in the middle", [b"Bearer a".as_slice(), b"\x00b"].concat()),
        ("SOH", b"Bearer a\x01b".to_vec()),
        ("DEL", with(b"", b"\x7f")),
        ("vertical tab", with(b"", b"\x0bx")),
        ("CR LF (header injection)", with(b"", b"\r\nx-dialtone-auth-method: admin")),
        ("LF", with(b"", b"\nx")),
        ("bare CR", with(b"", b"\r")),
        ("ESC sequence", with(b"\x1b[31m", b"")),
        ("invalid UTF-8", b"Bearer \xff\xfe".to_vec()),
        ("invalid UTF-8 after the token", with(b"", b"\xff")),
        ("overlong UTF-8 slash", with(b"", b"\xc0\xaf")),
        ("valid UTF-8, not ASCII", b"Bearer caf\xc3\xa9".to_vec()),
        ("NBSP before the token", with(b"\xc2\xa0", b"")),
        ("zero-width space", with(b"\xe2\x80\x8b", b"")),
        ("only padding", b"Bearer ====".to_vec()),
        ("padding in the middle", b"Bearer a=b".to_vec()),
        ("semicolon", with(b"", b";")),
    ];
    for (what, v) in &cases {
        refused(&mut p, what, &[v], BAD_CHARS, "invalid_request");
    }
    assert!(p.crashed().is_none());
    accepted(&mut p, "good token after the bytes", format!("Bearer {t}").as_bytes());
}

/// The cap (`max_token_bytes`, 4096 by default) applies to the token, before
/// its bytes are looked at; at the cap a token is read (and here, being
/// neither a key nor a JWS, refused for what it is).
#[test]
fn oversized_authorization() {
    let mut p = demo();
    let over = format!("Bearer {}", "a".repeat(4097));
    let huge_bytes = [b"Bearer ".as_slice(), &vec![0xffu8; 5000]].concat();
    let huge = format!("Bearer {}", "a".repeat(70_000));
    let cases: Vec<(&str, &[u8])> = vec![("4097 bytes", over.as_bytes()), ("5000 non-UTF-8 bytes", &huge_bytes), ("70 KB", huge.as_bytes())];
    for (what, v) in cases {
        refused(&mut p, what, &[v], TOO_LONG, "invalid_request");
    }
    let at_cap = format!("Bearer {}", "a".repeat(4096));
    refused(&mut p, "4096 bytes", &[at_cap.as_bytes()], UNKNOWN, "invalid_token");
    // The cap is the policy's: at 256 bytes a real Privy token is too long.
    let mut cfg = demo_config();
    cfg["max_token_bytes"] = json!(256);
    let mut p = start(&cfg);
    let t = privy_token();
    assert!(t.len() > 256);
    refused(&mut p, "Privy token over a 256-byte cap", &[format!("Bearer {t}").as_bytes()], TOO_LONG, "invalid_request");
    assert!(p.crashed().is_none());
}

/// Two headers are ambiguous, whatever they say (the same token twice too).
#[test]
fn two_or_more_authorization_headers() {
    let t = privy_token();
    let good = format!("Bearer {t}");
    let mut p = demo();
    let cases: Vec<(&str, Vec<&[u8]>)> = vec![
        ("the same good token twice", vec![good.as_bytes(), good.as_bytes()]),
        ("good then garbage", vec![good.as_bytes(), b"Bearer x"]),
        ("garbage then good", vec![b"Basic eA==", good.as_bytes()]),
        ("good then empty", vec![good.as_bytes(), b""]),
        ("empty then good", vec![b"", good.as_bytes()]),
        ("admin key and a token", vec![format!("Bearer {ADMIN_KEY}").leak().as_bytes(), good.as_bytes()]),
        ("three", vec![good.as_bytes(), good.as_bytes(), good.as_bytes()]),
        ("two non-UTF-8", vec![b"\xff", b"\xfe"]),
    ];
    for (what, auth) in &cases {
        refused(&mut p, what, auth, MULTIPLE, "invalid_request");
    }
    // Header names are case-insensitive: `Authorization` and `authorization` are two of one.
    let mut s = p.http().unwrap();
    let mut headers = base(ACCOUNT);
    headers.push(("Authorization", good.clone().into_bytes()));
    headers.push(("AUTHORIZATION", good.clone().into_bytes()));
    let raw: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    s.send_request_headers(&raw, true).unwrap();
    assert_eq!(s.local_reply().map(|r| r.json()["message"].clone()), Some(json!(MULTIPLE)));
    s.close().unwrap();
    assert!(p.crashed().is_none());
}

/// Not Bearer-shaped, but parsed: the token's own format decides.
#[test]
fn parsed_tokens_that_are_no_credential() {
    let mut p = demo();
    for (what, v, message) in [
        ("a word", "Bearer hello", UNKNOWN),
        ("a UUID", "Bearer 123e4567-e89b-12d3-a456-426614174000", UNKNOWN),
        ("the admin key, one character short", &*format!("Bearer {}", &ADMIN_KEY[..ADMIN_KEY.len() - 1]).leak(), UNKNOWN),
        ("a dial_test_ key", "Bearer dial_test_abc12345deadbeefdeadbeefdeadbeef", UNKNOWN),
        ("a short dial_live_ key", "Bearer dial_live_abc", "malformed API key"),
        ("an upper-case privy_ token", "Bearer privy_0123456789ABCDEF0123456789abcdef01234567", "malformed API token"),
        ("eyJ garbage", "Bearer eyJ.eyJ.eyJ", "malformed token encoding"),
    ] {
        refused(&mut p, what, &[v.as_bytes()], message, "invalid_token");
    }
    assert!(p.crashed().is_none());
}

/// Client-sent `x-dialtone-*` headers (any case, any bytes, repeated, empty)
/// are removed before the decision on every path; only the filter's own reach
/// the upstream. Look-alike names are not ours and are left alone.
#[test]
fn client_sent_identity_headers_never_survive() {
    let spoof: Vec<(&str, &[u8])> = vec![
        ("x-dialtone-account", b"did:privy:victim"),
        ("x-dialtone-account", b"did:privy:victim-2"),
        ("X-Dialtone-Auth-Method", b"admin"),
        ("X-DIALTONE-KEY-PREFIX", b"deadbeef"),
        ("x-dialtone-credits-remaining", b"999999"),
        ("x-dialtone-charged", b"0"),
        ("x-dialtone-route", b"healthz"),
        ("x-dialtone-", b"bare prefix"),
        ("x-dialtone-whatever", b"\xff\xfe"),
        ("x-dialtone-empty", b""),
    ];
    let lookalikes: Vec<(&str, &[u8])> = vec![("x-dialtonex", b"1"), ("x-dial-tone-account", b"2"), ("dialtone-account", b"3")];
    // Each answer is made from the callout it answers (an x402 claim echoes
    // the claim id the filter sent).
    type Answer<'a> = &'a dyn Fn(&Callout) -> CallAnswer;
    let send = |p: &mut Plugin, method: &str, path: &str, extra: &[(&str, &[u8])], answers: &[Answer]| -> Vec<(String, Vec<u8>)> {
        let mut headers = base(path);
        headers[0].1 = method.as_bytes().to_vec();
        let mut raw: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        raw.extend(spoof.iter().cloned());
        raw.extend(lookalikes.iter().cloned());
        raw.extend(extra.iter().cloned());
        let mut s = p.http().unwrap();
        s.send_request_headers(&raw, true).unwrap();
        for a in answers {
            let pending = s.pending_callouts().into_iter().next().expect("a callout to answer");
            let c = s.answer_next(a(&pending)).unwrap();
            let wire = format!("{:?}{}", c.headers, String::from_utf8_lossy(&c.body));
            assert!(!wire.contains("victim") && !wire.contains("999999"), "a spoofed header reached a callout: {wire}");
        }
        let Outcome::Passed(h) = s.outcome() else { panic!("{path}: {:?}", s.outcome()) };
        for (name, value) in &lookalikes {
            assert_eq!(h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice()), Some(*value), "{name} is not ours: left alone");
        }
        h.into_iter().filter(|(k, _)| k.to_ascii_lowercase().starts_with("x-dialtone-")).collect()
    };
    let ours = |pairs: &[(&str, &str)]| -> Vec<(String, Vec<u8>)> { pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect() };
    let mut p = demo();
    let privy_auth = format!("Bearer {}", privy_token());
    let admin_auth = format!("Bearer {ADMIN_KEY}");
    let key_auth = format!("Bearer {API_KEY}");

    // Public route: only the route name.
    assert_eq!(send(&mut p, "GET", "/healthz", &[], &[]), ours(&[("x-dialtone-route", "healthz")]));
    // x402 payment (verified by the facilitator, claimed): the filter's own
    // x402 identity, nothing of the client's.
    let accepted = demo_config()["routes"][0]["x402"]["accepts"][0].clone();
    let payment = STANDARD.encode(json!({"x402Version": 2, "accepted": accepted, "payload": {"signature": "0x1"}}).to_string());
    let verified = |_: &Callout| CallAnswer::json(200, &json!({"isValid": true, "payer": PAYER}));
    let claimed = |c: &Callout| CallAnswer::json(201, &json!({"claim": c.body_json()["claim"], "claimed": true}));
    let mut got = send(&mut p, "POST", SMS, &[("payment-signature", payment.as_bytes())], &[&verified, &claimed]);
    got.sort();
    let mut want = ours(&[
        ("x-dialtone-auth-method", "x402"),
        ("x-dialtone-route", "sms_send"),
        ("x-dialtone-x402-amount", accepted["amount"].as_str().unwrap()),
        ("x-dialtone-x402-asset", accepted["asset"].as_str().unwrap()),
        ("x-dialtone-x402-network", accepted["network"].as_str().unwrap()),
        ("x-dialtone-x402-payer", PAYER),
    ]);
    want.sort();
    assert_eq!(got, want);
    // Privy session on a free route.
    let mut got = send(&mut p, "GET", ACCOUNT, &[("authorization", privy_auth.as_bytes())], &[]);
    got.sort();
    let mut want = ours(&[("x-dialtone-auth-method", "privy"), ("x-dialtone-account", USER), ("x-dialtone-charged", "0"), ("x-dialtone-route", "account")]);
    want.sort();
    assert_eq!(got, want);
    // Admin key on a paid route: no account, nothing charged.
    let got = send(&mut p, "POST", SMS, &[("authorization", admin_auth.as_bytes())], &[]);
    assert!(got.iter().all(|(k, v)| k != "x-dialtone-account" && v != b"999999"), "{got:?}");
    assert!(got.contains(&("x-dialtone-auth-method".to_string(), b"admin".to_vec())), "{got:?}");
    // API key on a paid route: lookup and hold, then the real identity.
    let got = send(&mut p, "POST", SMS, &[("authorization", key_auth.as_bytes())], &[&|_: &Callout| key_record(&["sms:send"], "active", 5), &|_: &Callout| held("hold_h", 1, 4)]);
    assert!(got.contains(&("x-dialtone-account".to_string(), USER.as_bytes().to_vec())), "{got:?}");
    assert!(got.contains(&("x-dialtone-key-prefix".to_string(), API_KEY_PREFIX.as_bytes().to_vec())), "{got:?}");
    assert!(got.contains(&("x-dialtone-credits-remaining".to_string(), b"4".to_vec())), "{got:?}");
    assert_eq!(got.iter().filter(|(k, _)| k == "x-dialtone-account").count(), 1, "{got:?}");
    assert!(!got.iter().any(|(_, v)| v == b"did:privy:victim" || v == b"bare prefix" || v == b"\xff\xfe"), "{got:?}");
    assert!(p.crashed().is_none());
}
