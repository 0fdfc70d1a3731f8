//! Minting Privy-shaped access tokens with a local dev key: for `make run`
//! (DEMO_PRIVY_TOKEN) and for the tests, which also mint the hostile ones
//! (tampered, `alg: none`, HS256 keyed with the public key, …).

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use serde_json::{json, Value};
use sha2::Sha256;

/// Loads the dev signing key (PKCS#8 PEM) or creates one.
pub fn load_or_create_key(path: &Path) -> Result<SigningKey, String> {
    if let Ok(pem) = std::fs::read_to_string(path) {
        return SigningKey::from_pkcs8_pem(&pem).map_err(|e| format!("{}: not a P-256 PKCS#8 key: {e}", path.display()));
    }
    let key = loop {
        let mut d = [0u8; 32];
        getrandom::getrandom(&mut d).map_err(|e| format!("no randomness: {e}"))?;
        if let Ok(k) = SigningKey::from_slice(&d) {
            break k;
        }
    };
    let pem = key.to_pkcs8_pem(LineEnding::LF).map_err(|e| format!("encoding key: {e}"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(path, pem.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(key)
}

/// The SPKI PEM the filter is configured with (what the Privy dashboard shows).
pub fn public_pem(key: &SigningKey) -> Result<String, String> {
    key.verifying_key().to_public_key_pem(LineEnding::LF).map_err(|e| e.to_string())
}

/// Claims in the shape Privy issues.
pub fn privy_claims(app_id: &str, sub: &str, iat: i64, exp: i64) -> Value {
    json!({"sid": "dev-session", "iss": "privy.io", "iat": iat, "aud": app_id, "sub": sub, "exp": exp})
}

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// An ES256 compact JWS over the given header and claims, as given.
pub fn sign_es256(key: &SigningKey, header: &Value, claims: &Value) -> String {
    let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
    let sig: Signature = key.sign(input.as_bytes());
    format!("{input}.{}", b64(&sig.to_bytes()))
}

/// A Privy access token valid from `now` for `ttl` seconds.
pub fn privy_token(key: &SigningKey, app_id: &str, sub: &str, now: i64, ttl: i64) -> String {
    sign_es256(key, &json!({"alg": "ES256", "typ": "JWT"}), &privy_claims(app_id, sub, now, now + ttl))
}

/// HS256 over header and claims with `secret` (the algorithm-confusion attack
/// uses the verifier's public key as the secret).
pub fn sign_hs256(secret: &[u8], header: &Value, claims: &Value) -> Result<String, String> {
    let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).map_err(|e| e.to_string())?;
    mac.update(input.as_bytes());
    Ok(format!("{input}.{}", b64(&mac.finalize().into_bytes())))
}

/// An unsigned token (`alg: none`, empty signature).
pub fn unsigned(claims: &Value) -> String {
    format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), b64(claims.to_string().as_bytes()))
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
        .unwrap_or(0)
}
