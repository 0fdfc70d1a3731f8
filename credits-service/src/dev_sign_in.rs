//! The **dev** sign-in of the local stack: mints a Privy-shaped access token
//! with the stack's dev key and sets it as the `privy-token` cookie, which
//! the filter reads when `privy.accept_cookie` is on, exactly as it reads
//! the cookie Privy's own SDK sets in production.
//!
//! Off unless `serve --dev-sign-in-key` names the dev key: only `make run`
//! and the tests do. A production deployment has no such route (its Envoy
//! routes and policy do not name `/dev/`, and this service does not serve
//! it without the flag); `tests/e2e/tests/dashboard.rs` checks both.

use crate::http::Reply;
use crate::self_service::{SelfError, SelfState};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::DecodePrivateKey;
use serde::Deserialize;
use serde_json::json;
use std::path::Path;

/// Name of the cookie Privy's SDK sets and the filter reads.
pub const PRIVY_COOKIE: &str = "privy-token";
/// Lifetime of a dev token (a Privy access token lives an hour).
pub const DEFAULT_TTL_SECONDS: i64 = 3600;
/// Longest account id the dev sign-in mints for.
const MAX_ACCOUNT_CHARS: usize = 100;

/// The dev key and the claims it signs.
pub struct DevSignIn {
    key: SigningKey,
    app_id: String,
    ttl_seconds: i64,
}

impl std::fmt::Debug for DevSignIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevSignIn").field("app_id", &self.app_id).finish_non_exhaustive()
    }
}

impl DevSignIn {
    /// Load the dev key (PKCS#8 PEM, P-256).
    pub fn load(key_path: &Path, app_id: &str, ttl_seconds: i64) -> Result<DevSignIn, String> {
        let pem = std::fs::read_to_string(key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
        let key = SigningKey::from_pkcs8_pem(&pem)
            .map_err(|e| format!("{}: not a P-256 PKCS#8 key: {e}", key_path.display()))?;
        if app_id.is_empty() {
            return Err("the dev sign-in needs the Privy app id (--dev-app-id)".into());
        }
        Ok(DevSignIn { key, app_id: app_id.to_string(), ttl_seconds: ttl_seconds.clamp(60, 86_400) })
    }

    /// An ES256 access token in the shape Privy issues, for `account` from `now`.
    pub fn mint(&self, account: &str, now: i64) -> String {
        let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        let header = json!({"alg": "ES256", "typ": "JWT"});
        let claims = json!({
            "sid": "dev-session", "iss": "privy.io", "iat": now, "aud": self.app_id,
            "sub": account, "exp": now.saturating_add(self.ttl_seconds),
        });
        let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let sig: Signature = self.key.sign(input.as_bytes());
        format!("{input}.{}", b64(&sig.to_bytes()))
    }
}

/// A dev account id: `did:privy:` + 1..=90 of `[A-Za-z0-9_-]`.
pub fn valid_dev_account(account: &str) -> bool {
    account.len() <= MAX_ACCOUNT_CHARS
        && account
            .strip_prefix("did:privy:")
            .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-')))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignInBody {
    account: String,
}

/// `GET /dev/sign-in`: the form (the dashboard's script drives it).
pub async fn page() -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'self'; style-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
            ),
        ],
        include_str!("../dashboard/dev-sign-in.html"),
    )
        .into_response()
}

/// `POST /dev/sign-in {"account":"did:privy:…"}`: sets the `privy-token`
/// cookie and answers the token and its expiry.
pub async fn sign_in(State(state): State<SelfState>, body: Body) -> Reply {
    let Some(dev) = state.dev_sign_in.clone() else {
        return Reply::error(404, "not_found");
    };
    let bytes = match crate::http::read_body(body, 4096, state.http.header_read_timeout).await {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    let account = match serde_json::from_slice::<SignInBody>(&bytes) {
        Ok(b) if valid_dev_account(&b.account) => b.account,
        _ => {
            return SelfError::BadRequest("send {\"account\":\"did:privy:<1-90 of A-Z a-z 0-9 _ ->\"}".into()).reply()
        }
    };
    let now = (state.clock)();
    let token = dev.mint(&account, now);
    tracing::info!(%account, "dev sign-in");
    Reply::ok(json!({ "account": account, "expires_at": now.saturating_add(dev.ttl_seconds), "token": token }))
        .with_header(
            "Set-Cookie",
            format!("{PRIVY_COOKIE}={token}; Path=/; Max-Age={}; SameSite=Strict", dev.ttl_seconds),
        )
        .with_header("Cache-Control", "no-store")
}

/// `POST /dev/sign-out`: clears the cookie.
pub async fn sign_out() -> Reply {
    Reply::ok(json!({ "signed_out": true }))
        .with_header("Set-Cookie", format!("{PRIVY_COOKIE}=; Path=/; Max-Age=0; SameSite=Strict"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_accounts_are_privy_shaped() {
        assert!(valid_dev_account("did:privy:demo-user"));
        assert!(!valid_dev_account("did:privy:"));
        assert!(!valid_dev_account("did:web:x"));
        assert!(!valid_dev_account("did:privy:a b"));
        assert!(!valid_dev_account("did:privy:a;Path=/x"));
        assert!(!valid_dev_account(&format!("did:privy:{}", "a".repeat(91))));
    }
}
