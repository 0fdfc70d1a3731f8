//! The issuer's JWKS, fetched over a callout and kept up to date: when to
//! fetch, and what to keep. Pure: the glue dispatches the fetches and feeds
//! the answers here. Keys rotate without an outage: a token naming an
//! unknown `kid` triggers a fetch at once (at most once per cooldown), and a
//! failed fetch keeps the last good keys, but only for
//! `max_stale_seconds`: then they are dropped (a key the issuer removed must
//! not stay trusted while every refetch fails). A VM's state starts afresh
//! with each policy (`on_configure`).

use crate::cache::{self, Digest32};
use crate::credits_api::CallOutcome;
use crate::policy::JwksFetch;
use crate::privy_jwt::{self, EsKey, KeyError};

/// Why a fetched document was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksError {
    Unavailable,
    Status(u16),
    TooLarge,
    NotJson,
    Keys(KeyError),
}

impl std::fmt::Display for JwksError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwksError::Unavailable => write!(f, "no answer"),
            JwksError::Status(s) => write!(f, "status {s}"),
            JwksError::TooLarge => write!(f, "document too large"),
            JwksError::NotJson => write!(f, "not JSON"),
            JwksError::Keys(e) => write!(f, "{e}"),
        }
    }
}

/// A fetch's keys were taken: were they the ones already in use?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub keys: usize,
    /// The key set differs from the one it replaces (kids or points): only
    /// then do tokens verified with the old set need checking again.
    pub changed: bool,
}

/// The fetched keys and the fetch schedule of one VM.
#[derive(Debug, Default)]
pub struct JwksCache {
    pub keys: Vec<EsKey>,
    /// The verifier's fingerprint with these keys (the policy's, extended by
    /// [`cache::keys_fingerprint`]): what a verified token is bound to.
    pub fingerprint: Option<Digest32>,
    /// When the keys in use were fetched.
    pub fetched_at: Option<i64>,
    /// When the last fetch was sent (successful or not).
    pub last_attempt: Option<i64>,
    /// When a token's unknown `kid` last caused a fetch.
    pub last_unknown_kid_fetch: Option<i64>,
    /// A fetch is in flight until its answer, or until this second at the
    /// latest: a fetch a request sent dies with the request (Envoy cancels a
    /// stream's callouts), and its answer never comes.
    pub in_flight_until: Option<i64>,
}

/// After a failed fetch, try again this soon (not only at the next refresh).
const RETRY_AFTER_FAILURE_SECS: i64 = 10;

impl JwksCache {
    /// Is a scheduled fetch due at `now`?
    pub fn due(&self, fetch: &JwksFetch, now: i64) -> bool {
        if self.in_flight(now) {
            return false;
        }
        let refresh = i64::try_from(fetch.refresh_seconds).unwrap_or(i64::MAX);
        match (self.fetched_at, self.last_attempt) {
            (_, None) => true,
            (Some(done), Some(tried)) => {
                now.saturating_sub(done) >= refresh && now.saturating_sub(tried) >= RETRY_AFTER_FAILURE_SECS.min(refresh)
            }
            (None, Some(tried)) => now.saturating_sub(tried) >= RETRY_AFTER_FAILURE_SECS,
        }
    }

    /// May a token with an unknown `kid` trigger a fetch at `now`?
    pub fn may_fetch_for_unknown_kid(&self, fetch: &JwksFetch, now: i64) -> bool {
        let cooldown = i64::try_from(fetch.unknown_kid_cooldown_seconds).unwrap_or(i64::MAX);
        self.last_unknown_kid_fetch.is_none_or(|t| now.saturating_sub(t) >= cooldown)
    }

    /// Is a fetch still expected to answer at `now`?
    pub fn in_flight(&self, now: i64) -> bool {
        self.in_flight_until.is_some_and(|until| now < until)
    }

    /// A fetch was sent at `now`.
    pub fn started(&mut self, fetch: &JwksFetch, now: i64, for_unknown_kid: bool) {
        self.not_sent(now, for_unknown_kid);
        // Envoy gives up on it after timeout_ms; a second of margin.
        let timeout = i64::try_from(fetch.timeout_ms.div_ceil(1000)).unwrap_or(i64::MAX);
        self.in_flight_until = Some(now.saturating_add(timeout).saturating_add(1));
    }

    /// A fetch could not even be sent at `now` (say, no such cluster): it
    /// counts as an attempt, so the next one waits for the retry delay (or
    /// the cooldown) instead of failing again on every tick or request.
    pub fn not_sent(&mut self, now: i64, for_unknown_kid: bool) {
        self.last_attempt = Some(now);
        if for_unknown_kid {
            self.last_unknown_kid_fetch = Some(now);
        }
    }

    /// Takes a fetch's answer. On success the fetched keys replace the old
    /// ones; on any failure the last good keys stay (until they are stale).
    /// `base` is the policy's verifier fingerprint.
    pub fn accept(&mut self, outcome: CallOutcome, fetch: &JwksFetch, base: &Digest32, now: i64) -> Result<Accepted, JwksError> {
        self.in_flight_until = None;
        let keys = parse_document(outcome, fetch, &self.keys)?;
        let fingerprint = cache::keys_fingerprint(base, &keys);
        let changed = self.fingerprint != Some(fingerprint);
        let n = keys.len();
        self.keys = keys;
        self.fingerprint = Some(fingerprint);
        self.fetched_at = Some(now);
        Ok(Accepted { keys: n, changed })
    }

    /// Are the fetched keys too old to trust at `now` (no good fetch for
    /// longer than `max_stale_seconds`)?
    pub fn stale(&self, fetch: &JwksFetch, now: i64) -> bool {
        let max = i64::try_from(fetch.max_stale_seconds).unwrap_or(i64::MAX);
        !self.keys.is_empty() && self.fetched_at.is_none_or(|at| now.saturating_sub(at) >= max)
    }

    /// Drops stale fetched keys. Returns how many were dropped.
    pub fn drop_stale(&mut self, fetch: &JwksFetch, now: i64) -> usize {
        if !self.stale(fetch, now) {
            return 0;
        }
        self.fingerprint = None;
        std::mem::take(&mut self.keys).len()
    }

    /// The keys to verify with at `now`: none once they are stale (even
    /// before the next tick drops them), with their fingerprint.
    pub fn usable(&self, fetch: Option<&JwksFetch>, now: i64) -> (&[EsKey], Option<&Digest32>) {
        match fetch {
            Some(f) if !self.stale(f, now) => (&self.keys, self.fingerprint.as_ref()),
            _ => (&[], None),
        }
    }
}

fn parse_document(outcome: CallOutcome, fetch: &JwksFetch, previous: &[EsKey]) -> Result<Vec<EsKey>, JwksError> {
    let max_bytes = fetch.max_bytes;
    let (status, body) = match outcome {
        CallOutcome::Failed => return Err(JwksError::Unavailable),
        CallOutcome::Answered { truncated: true, .. } => return Err(JwksError::TooLarge),
        CallOutcome::Answered { status, body, .. } => (status, body),
    };
    if status != 200 {
        return Err(JwksError::Status(status));
    }
    if body.len() > max_bytes {
        return Err(JwksError::TooLarge);
    }
    let doc: serde_json::Value = serde_json::from_slice(&body).map_err(|_| JwksError::NotJson)?;
    privy_jwt::keys_from_jwks_reusing(&doc, previous, fetch.max_keys).map_err(JwksError::Keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetch() -> JwksFetch {
        JwksFetch {
            cluster: "jwks".into(),
            authority: "jwks".into(),
            path: "/jwks.json".into(),
            refresh_seconds: 300,
            timeout_ms: 1000,
            max_bytes: 4096,
            unknown_kid_cooldown_seconds: 30,
            max_stale_seconds: 3600,
            max_keys: 16,
        }
    }

    // A P-256 public key (RFC 7515 A.3) as a one-key JWKS.
    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"a3","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

    const BASE: Digest32 = [3; 32];

    fn answer(status: u16, body: &str) -> CallOutcome {
        CallOutcome::Answered { status, body: body.as_bytes().to_vec(), truncated: false }
    }

    #[test]
    fn schedule() {
        let f = fetch();
        let mut c = JwksCache::default();
        assert!(c.due(&f, 0), "fetch at start");
        c.started(&f, 0, false);
        assert!(!c.due(&f, 1), "not while one is in flight");
        assert_eq!(c.accept(answer(200, JWKS), &f, &BASE, 1), Ok(Accepted { keys: 1, changed: true }));
        assert!(!c.due(&f, 300));
        assert!(c.due(&f, 301));
        // A failure keeps the keys and retries sooner than the refresh.
        c.started(&f, 301, false);
        assert_eq!(c.accept(answer(500, "oops"), &f, &BASE, 301), Err(JwksError::Status(500)));
        assert_eq!(c.keys.len(), 1);
        assert!(!c.due(&f, 305));
        assert!(c.due(&f, 311));
    }

    #[test]
    fn unknown_kid_cooldown() {
        let f = fetch();
        let mut c = JwksCache::default();
        assert!(c.may_fetch_for_unknown_kid(&f, 100));
        c.started(&f, 100, true);
        c.accept(CallOutcome::Failed, &f, &BASE, 100).unwrap_err();
        assert!(!c.may_fetch_for_unknown_kid(&f, 129));
        assert!(c.may_fetch_for_unknown_kid(&f, 130));
    }

    #[test]
    fn a_fetch_that_never_answers_stops_blocking_the_schedule() {
        let f = fetch(); // timeout 1000 ms
        let mut c = JwksCache::default();
        c.started(&f, 0, false);
        c.accept(answer(200, JWKS), &f, &BASE, 0).unwrap();
        // A request's unknown-kid fetch, cancelled with its stream: no answer.
        c.started(&f, 100, true);
        assert!(c.in_flight(101));
        assert!(!c.in_flight(102), "given up after the timeout plus a second");
        assert!(!c.due(&f, 299));
        assert!(c.due(&f, 300), "the refresh schedule goes on");
    }

    #[test]
    fn a_fetch_that_cannot_be_sent_waits_for_the_retry_delay() {
        let f = fetch();
        let mut c = JwksCache::default();
        assert!(c.due(&f, 0));
        c.not_sent(0, false);
        assert!(!c.due(&f, 9) && c.due(&f, 10));
        c.not_sent(20, true);
        assert!(!c.may_fetch_for_unknown_kid(&f, 49) && c.may_fetch_for_unknown_kid(&f, 50));
    }

    #[test]
    fn bad_documents_keep_the_last_good_keys() {
        let f = fetch();
        let mut c = JwksCache::default();
        c.accept(answer(200, JWKS), &f, &BASE, 0).unwrap();
        let big = format!(r#"{{"keys":[],"pad":"{}"}}"#, "a".repeat(5000));
        assert_eq!(c.accept(answer(200, &big), &f, &BASE, 1), Err(JwksError::TooLarge));
        assert_eq!(c.accept(answer(200, "<html>"), &f, &BASE, 2), Err(JwksError::NotJson));
        assert!(matches!(c.accept(answer(200, r#"{"keys":[{"kty":"RSA"}]}"#), &f, &BASE, 3), Err(JwksError::Keys(_))));
        assert_eq!(c.keys.len(), 1);
        assert_eq!(c.fetched_at, Some(0));
    }

    #[test]
    fn only_a_changed_key_set_counts_as_a_change() {
        let f = fetch();
        let mut c = JwksCache::default();
        assert_eq!(c.accept(answer(200, JWKS), &f, &BASE, 0), Ok(Accepted { keys: 1, changed: true }));
        let first = c.fingerprint;
        assert_eq!(c.accept(answer(200, JWKS), &f, &BASE, 300), Ok(Accepted { keys: 1, changed: false }), "same keys again");
        assert_eq!(c.fingerprint, first);
        let renamed = JWKS.replace("\"kid\":\"a3\"", "\"kid\":\"a4\"");
        assert_eq!(c.accept(answer(200, &renamed), &f, &BASE, 600), Ok(Accepted { keys: 1, changed: true }), "a kid renamed");
        assert_ne!(c.fingerprint, first);
        let mut other_policy = JwksCache::default();
        other_policy.accept(answer(200, JWKS), &f, &[4; 32], 0).unwrap();
        assert_ne!(other_policy.fingerprint, first, "bound to the policy's verifier too");
    }

    #[test]
    fn fetched_keys_age_out_when_every_refetch_fails() {
        let f = fetch(); // max_stale_seconds 3600
        let mut c = JwksCache::default();
        c.accept(answer(200, JWKS), &f, &BASE, 1000).unwrap();
        for t in (1300..4600).step_by(300) {
            c.accept(answer(503, "down"), &f, &BASE, t).unwrap_err();
        }
        assert_eq!(c.usable(Some(&f), 4599).0.len(), 1, "still within max_stale_seconds");
        assert!(!c.stale(&f, 4599) && c.stale(&f, 4600));
        assert!(c.usable(Some(&f), 4600).0.is_empty(), "not used once stale, even before they are dropped");
        assert_eq!(c.drop_stale(&f, 4599), 0);
        assert_eq!(c.drop_stale(&f, 4600), 1, "dropped and counted");
        assert_eq!((c.keys.len(), c.fingerprint), (0, None));
        assert_eq!(c.drop_stale(&f, 9999), 0, "nothing left to drop");
        // A good fetch brings them back.
        assert_eq!(c.accept(answer(200, JWKS), &f, &BASE, 5000), Ok(Accepted { keys: 1, changed: true }));
        assert_eq!(c.usable(Some(&f), 5001).0.len(), 1);
        assert!(c.usable(None, 5001).0.is_empty(), "no jwks_fetch in the policy: no fetched keys");
    }

    #[test]
    fn a_document_with_too_many_keys_is_refused_before_any_table_is_built() {
        let mut f = fetch();
        f.max_keys = 2;
        let key = |i: u8| {
            let pt = p256::ecdsa::SigningKey::from_slice(&[i; 32]).unwrap().verifying_key().to_encoded_point(false);
            use base64::Engine;
            let b = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
            format!(r#"{{"kty":"EC","crv":"P-256","kid":"k{i}","x":"{}","y":"{}"}}"#, b(pt.x().unwrap()), b(pt.y().unwrap()))
        };
        let doc = |n: u8| format!(r#"{{"keys":[{}]}}"#, (1..=n).map(key).collect::<Vec<_>>().join(","));
        let mut c = JwksCache::default();
        assert_eq!(c.accept(answer(200, &doc(2)), &f, &BASE, 0).map(|a| a.keys), Ok(2));
        assert_eq!(c.accept(answer(200, &doc(3)), &f, &BASE, 1), Err(JwksError::Keys(KeyError::TooManyKeys { max: 2 })));
        assert_eq!(c.keys.len(), 2, "the last good keys stay");
        // A kid named twice is refused; the keys stay.
        let twice = format!(r#"{{"keys":[{},{}]}}"#, key(1), key(1));
        assert_eq!(c.accept(answer(200, &twice), &f, &BASE, 2), Err(JwksError::Keys(KeyError::DuplicateKid("k1".into()))));
        assert_eq!(c.keys.len(), 2);
    }
}
