//! The ES256 verifier against public conformance vectors vendored in
//! `tests/vectors/` (Wycheproof, RFC 7515 A.3, the JOSE cookbook and the
//! derived Privy-shaped corpus; provenance, licences and SHA-256 in
//! `tests/vectors/README.md`). Missing test data fails the suite.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use dialtone::privy_jwt::{self, EsKey, JwtError, PrivyVerifier};
use p256::ecdsa::VerifyingKey;
use serde_json::Value;

fn testdata(rel: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors").join(rel);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("test data {} is required: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Errors raised before the signature verified (the token was not trusted)
/// versus after it (the signature was good; claims were not).
fn failed_before_signature(e: JwtError) -> bool {
    matches!(
        e,
        JwtError::Structure
            | JwtError::Base64
            | JwtError::Header
            | JwtError::Algorithm
            | JwtError::Type
            | JwtError::Crit
            | JwtError::UnknownKid
            | JwtError::Signature
    )
}

fn verifier(keys: Vec<EsKey>, issuer: &str, aud: &str, leeway: i64) -> PrivyVerifier {
    PrivyVerifier { keys, issuer: issuer.into(), app_id: aud.into(), leeway_secs: leeway }
}

/// Did the signature layer accept the token? (Claims may still be refused.)
fn signature_accepted(v: &PrivyVerifier, token: &str) -> bool {
    match v.verify(token, 0) {
        Ok(_) => true,
        Err(e) => !failed_before_signature(e),
    }
}

#[test]
fn wycheproof_ecdsa_p256_sha256_p1363() {
    let data = testdata("wycheproof/ecdsa_secp256r1_sha256_p1363_test.json");
    let (mut valid, mut invalid) = (0, 0);
    for group in data["testGroups"].as_array().unwrap() {
        let point = hex::decode(group["publicKey"]["uncompressed"].as_str().unwrap()).unwrap();
        let key = VerifyingKey::from_sec1_bytes(&point);
        for t in group["tests"].as_array().unwrap() {
            let msg = hex::decode(t["msg"].as_str().unwrap()).unwrap();
            let sig = hex::decode(t["sig"].as_str().unwrap()).unwrap();
            let got = match (&key, privy_jwt::es256_signature(&sig)) {
                (Ok(k), Some(s)) => privy_jwt::es256_verify(k, &msg, &s),
                _ => false,
            };
            let want = match t["result"].as_str().unwrap() {
                "valid" => true,
                "invalid" => false,
                // The file has none; if a future version adds some, decide explicitly.
                other => panic!("tcId {}: result {other:?} needs a decision", t["tcId"]),
            };
            assert_eq!(got, want, "tcId {} ({})", t["tcId"], t["comment"]);
            if want { valid += 1 } else { invalid += 1 }
        }
    }
    // 262 vectors: 173 valid (70 of them high-S), 89 invalid.
    assert_eq!((valid, invalid), (173, 89));
}

#[test]
fn rfc7515_a3_high_s_example_verifies() {
    let a3 = testdata("jose-cookbook/rfc7515/a3_es256.json");
    let jwk = serde_json::json!({"keys": [{"kty":"EC","crv":"P-256","x":a3["input"]["key"]["x"],"y":a3["input"]["key"]["y"]}]});
    let v = verifier(privy_jwt::keys_from_jwks(&jwk, privy_jwt::DEFAULT_MAX_KEYS).unwrap(), "joe", "x", 0);
    let compact = a3["output"]["compact"].as_str().unwrap();
    // The payload is not a Privy token (no aud/sub/sid), so the verifier
    // must get past the signature and then refuse the claims.
    let err = v.verify(compact, 0).unwrap_err();
    assert!(!failed_before_signature(err), "signature refused: {err:?}");
    // One flipped bit in the signature and it must fail at the signature.
    let mut sig = URL_SAFE_NO_PAD.decode(compact.rsplit('.').next().unwrap()).unwrap();
    sig[10] ^= 1;
    let (head, _) = compact.rsplit_once('.').unwrap();
    let forged = format!("{head}.{}", URL_SAFE_NO_PAD.encode(sig));
    assert_eq!(v.verify(&forged, 0), Err(JwtError::Signature));
}

#[test]
fn derived_privy_corpus() {
    let data = testdata("derived/es256_privy_conformance.json");
    let cfg = &data["verifier_config"];
    let now = cfg["now_unix"].as_i64().unwrap();
    let leeway = cfg["leeway_seconds"].as_i64().unwrap();
    let iss = cfg["issuer"].as_str().unwrap();
    let aud = cfg["audience"].as_str().unwrap();
    // Both ways an operator can configure the key must give the same verdicts.
    let from_jwks = privy_jwt::keys_from_jwks(&serde_json::json!({"keys": [cfg["public_key_jwk"]]}), privy_jwt::DEFAULT_MAX_KEYS).unwrap();
    let from_pem = vec![privy_jwt::key_from_pem(cfg["public_key_pem"].as_str().unwrap()).unwrap()];
    let mut failures = Vec::new();
    let mut count = 0;
    for keys in [from_jwks, from_pem] {
        let v = verifier(keys, iss, aud, leeway);
        for case in data["cases"].as_array().unwrap() {
            let token = case["token"].as_str().unwrap();
            let want_accept = case["expect"] == "accept";
            let got = v.verify(token, now);
            if got.is_ok() != want_accept {
                failures.push(format!("{} ({}): expected {}, got {got:?}", case["id"], case["class"], case["expect"]));
            }
            count += 1;
        }
    }
    assert!(failures.is_empty(), "{} of {count} verdicts wrong:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(count, 128);
}

#[test]
fn wycheproof_jws_es256_signature_layer_and_everything_else_refused() {
    let data = testdata("wycheproof/json_web_signature_test.json");
    let es_key = |jwk: &Value| {
        let mut public = jwk.clone();
        public.as_object_mut().unwrap().remove("d");
        privy_jwt::keys_from_jwks(&serde_json::json!({"keys": [public]}), privy_jwt::DEFAULT_MAX_KEYS).unwrap()
    };
    let (mut es256_checked, mut others_refused) = (0, 0);
    let mut reference_key = None;
    for group in data["testGroups"].as_array().unwrap() {
        if matches!(group["comment"].as_str(), Some("es256" | "SpecialCaseEs256")) {
            let keys = es_key(if group["public"].is_object() { &group["public"] } else { &group["private"] });
            reference_key.get_or_insert_with(|| keys.clone());
            let v = verifier(keys, "x", "x", 0);
            for t in group["tests"].as_array().unwrap() {
                let Some(jws) = t["jws"].as_str() else { panic!("es256 groups are compact") };
                let want = t["result"] == "valid";
                assert_eq!(signature_accepted(&v, jws), want, "tcId {} ({})", t["tcId"], t["comment"]);
                es256_checked += 1;
            }
        }
    }
    // Every other group (HS*, RS*, PS*, none, wrong `use`, …) must be refused
    // by an ES256-only verifier. Groups with an EC P-256 key are verified
    // with that key as published (a `use: enc` key is refused at load);
    // the rest with the ES256 reference key, and must fail before any claim
    // is read.
    let reference = reference_key.unwrap();
    for group in data["testGroups"].as_array().unwrap() {
        if matches!(group["comment"].as_str(), Some("es256" | "SpecialCaseEs256")) {
            continue;
        }
        let own = ["public", "private"].iter().find_map(|side| {
            let jwk = &group[*side];
            (jwk["kty"] == "EC").then(|| {
                let mut public = jwk.clone();
                public.as_object_mut().unwrap().remove("d");
                privy_jwt::keys_from_jwks(&serde_json::json!({"keys": [public]}), privy_jwt::DEFAULT_MAX_KEYS).ok()
            })
        });
        for t in group["tests"].as_array().unwrap() {
            // tcId 17 is a JSON-serialization object: not a compact token at all.
            let Some(jws) = t["jws"].as_str() else { continue };
            match &own {
                Some(Some(keys)) => assert!(!signature_accepted(&verifier(keys.clone(), "x", "x", 0), jws), "tcId {}", t["tcId"]),
                Some(None) => {} // the key itself is refused at config load
                None => match verifier(reference.clone(), "x", "x", 0).verify(jws, 0) {
                    Err(e) => assert!(failed_before_signature(e), "tcId {}: refused too late ({e:?})", t["tcId"]),
                    Ok(s) => panic!("tcId {} accepted: {s:?}", t["tcId"]),
                },
            }
            others_refused += 1;
        }
    }
    assert_eq!(es256_checked, 39);
    assert!(others_refused > 300, "{others_refused}");
}

#[test]
fn wycheproof_jwk_sets() {
    let data = testdata("wycheproof/json_web_key_test.json");
    let mut checked = 0;
    for group in data["testGroups"].as_array().unwrap() {
        // Take the public set, or the private set with private parts removed.
        let mut set = if group["public"].is_object() { group["public"].clone() } else { group["private"].clone() };
        for k in set["keys"].as_array_mut().into_iter().flatten() {
            if let Some(o) = k.as_object_mut() {
                for private in ["d", "p", "q", "dp", "dq", "qi", "k"] {
                    o.remove(private);
                }
            }
        }
        // A set the config loader refuses (duplicate kid, bad point, no ES256
        // key) means every token is refused.
        let keys = privy_jwt::keys_from_jwks(&set, privy_jwt::DEFAULT_MAX_KEYS).ok();
        for t in group["tests"].as_array().unwrap() {
            let jws = t["jws"].as_str().unwrap();
            let got = keys.clone().is_some_and(|k| signature_accepted(&verifier(k, "x", "x", 0), jws));
            let alg_es256 = jws
                .split('.')
                .next()
                .and_then(|h| URL_SAFE_NO_PAD.decode(h).ok())
                .and_then(|h| serde_json::from_slice::<Value>(&h).ok())
                .is_some_and(|h| h["alg"] == "ES256");
            // Valid non-ES256 tokens are refused by design (ES256 only).
            let want = t["result"] == "valid" && alg_es256;
            assert_eq!(got, want, "{} tcId {} ({})", group["comment"], t["tcId"], t["comment"]);
            checked += 1;
        }
    }
    assert!(checked >= 26, "{checked}");
}

#[test]
fn jose_cookbook_non_es256_examples_are_refused() {
    let a3 = testdata("jose-cookbook/rfc7515/a3_es256.json");
    let jwk = serde_json::json!({"keys": [{"kty":"EC","crv":"P-256","x":a3["input"]["key"]["x"],"y":a3["input"]["key"]["y"]}]});
    let v = verifier(privy_jwt::keys_from_jwks(&jwk, privy_jwt::DEFAULT_MAX_KEYS).unwrap(), "joe", "x", 0);
    for rel in [
        "jose-cookbook/rfc7520/4_3.ecdsa_signature.json",
        "jose-cookbook/rfc7520/4_4.hmac-sha2_integrity_protection.json",
        "jose-cookbook/rfc7520/4_5.signature_with_detached_content.json",
        "jose-cookbook/rfc7520/5_5.key_agreement_using_ecdh-es_with_aes-cbc-hmac-sha2.json",
        "jose-cookbook/rfc7797/4.2.hmac-sha2_b64_false.json",
        "jose-cookbook/rfc7797/hmac-sha2_b64_false.json",
    ] {
        let doc = testdata(rel);
        // 4.2 has no compact form (its payload holds a '.'); use its flattened JSON parts.
        let compact = match doc["output"]["compact"].as_str() {
            Some(c) => c.to_owned(),
            None => {
                let f = &doc["output"]["json_flat"];
                format!("{}.{}.{}", f["protected"].as_str().unwrap(), f["payload"].as_str().unwrap(), f["signature"].as_str().unwrap())
            }
        };
        let compact = compact.as_str();
        let err = v.verify(compact, 0).unwrap_err();
        assert!(failed_before_signature(err), "{rel}: {err:?}");
    }
    // A P-521 key is not an ES256 key.
    let p521 = testdata("jose-cookbook/rfc7520/3_1.ec_public_key.json");
    assert!(privy_jwt::keys_from_jwks(&serde_json::json!({"keys": [p521]}), privy_jwt::DEFAULT_MAX_KEYS).is_err());
}
