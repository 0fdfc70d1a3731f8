//! The filter's metrics: names, and which one an outcome counts in. Pure; the
//! glue defines them once per VM and increments them. Envoy shows them in
//! `/stats` and `/stats/prometheus` (see README, "Observability").

use crate::denial::Denial;
use crate::identity::AuthMethod;

/// Requests let through, by how they authenticated.
pub const ALLOWED_PRIVY: &str = "dialtone.allowed.privy";
pub const ALLOWED_APIKEY: &str = "dialtone.allowed.apikey";
pub const ALLOWED_ADMIN: &str = "dialtone.allowed.admin";
/// Public routes and x402 payments.
pub const ALLOWED_ANONYMOUS: &str = "dialtone.allowed.anonymous";

/// Requests refused, by the `error` code of the reply.
pub const DENIED_UNAUTHORIZED: &str = "dialtone.denied.unauthorized";
pub const DENIED_INSUFFICIENT_SCOPE: &str = "dialtone.denied.insufficient_scope";
pub const DENIED_INSUFFICIENT_CREDITS: &str = "dialtone.denied.insufficient_credits";
pub const DENIED_PAYMENT_REQUIRED: &str = "dialtone.denied.payment_required";
pub const DENIED_ROUTE_NOT_ALLOWED: &str = "dialtone.denied.route_not_allowed";
pub const DENIED_CREDITS_UNAVAILABLE: &str = "dialtone.denied.credits_unavailable";
pub const DENIED_RATE_LIMITED: &str = "dialtone.denied.rate_limited";

/// Refusals by reason, under their code: `dialtone.denied.<code>.<reason>`
/// (401s by what was wrong with the credential, 503s by what was wrong with
/// the service). Each is counted besides its code's counter.
pub const UNAUTHORIZED_REASONS: &[&str] = &[
    "dialtone.denied.unauthorized.missing",
    "dialtone.denied.unauthorized.malformed_header",
    "dialtone.denied.unauthorized.unknown_format",
    "dialtone.denied.unauthorized.token_malformed",
    "dialtone.denied.unauthorized.token_unknown_kid",
    "dialtone.denied.unauthorized.token_signature",
    "dialtone.denied.unauthorized.token_claims",
    "dialtone.denied.unauthorized.token_time",
    "dialtone.denied.unauthorized.privy_not_accepted",
    "dialtone.denied.unauthorized.unknown_key",
    "dialtone.denied.unauthorized.key_revoked",
    "dialtone.denied.unauthorized.key_expired",
];
pub const UNAVAILABLE_REASONS: &[&str] = &[
    "dialtone.denied.credits_unavailable.unreachable",
    "dialtone.denied.credits_unavailable.bad_status",
    "dialtone.denied.credits_unavailable.garbage",
    "dialtone.denied.credits_unavailable.too_large",
    "dialtone.denied.credits_unavailable.inconsistent",
    "dialtone.denied.credits_unavailable.dispatch_failed",
];

/// Callouts to the key/credits service by result: answered (any status the
/// contract defines), failed in transport (no answer, Envoy's 503/504), retried.
pub const CALLOUT_ANSWERED: &str = "dialtone.callout.answered";
pub const CALLOUT_FAILED: &str = "dialtone.callout.failed";
pub const CALLOUT_RETRIED: &str = "dialtone.callout.retried";
/// Holds settled when the upstream answered.
pub const HOLD_CAPTURED: &str = "dialtone.hold.captured";
pub const HOLD_RELEASED: &str = "dialtone.hold.released";

/// The VM's caches (src/cache.rs): verified Privy tokens and key lookups.
pub const CACHE_TOKEN_HIT: &str = "dialtone.cache.token.hit";
/// Verified by another VM of this Envoy (read from shared data).
pub const CACHE_TOKEN_SHARED_HIT: &str = "dialtone.cache.token.shared_hit";
/// Verified here (the ES256 check ran).
pub const CACHE_TOKEN_MISS: &str = "dialtone.cache.token.miss";
pub const CACHE_KEY_HIT: &str = "dialtone.cache.key.hit";
pub const CACHE_KEY_MISS: &str = "dialtone.cache.key.miss";

/// Fetches of the issuer's JWKS: documents taken, and fetches that failed
/// (no answer, a status other than 200, too large, not JSON, no usable key).
pub const JWKS_FETCHED: &str = "dialtone.jwks.fetched";
pub const JWKS_FAILED: &str = "dialtone.jwks.failed";
/// Fetched keys dropped because no fetch succeeded for `max_stale_seconds`
/// (counted per key).
pub const JWKS_EXPIRED: &str = "dialtone.jwks.expired";

/// Histogram: milliseconds from dispatch to answer, per callout.
pub const CALLOUT_LATENCY_MS: &str = "dialtone.callout.latency_ms";

pub const COUNTERS: &[&str] = &[
    ALLOWED_PRIVY,
    ALLOWED_APIKEY,
    ALLOWED_ADMIN,
    ALLOWED_ANONYMOUS,
    DENIED_UNAUTHORIZED,
    DENIED_INSUFFICIENT_SCOPE,
    DENIED_INSUFFICIENT_CREDITS,
    DENIED_PAYMENT_REQUIRED,
    DENIED_ROUTE_NOT_ALLOWED,
    DENIED_CREDITS_UNAVAILABLE,
    DENIED_RATE_LIMITED,
    CALLOUT_ANSWERED,
    CALLOUT_FAILED,
    CALLOUT_RETRIED,
    HOLD_CAPTURED,
    HOLD_RELEASED,
    CACHE_TOKEN_HIT,
    CACHE_TOKEN_SHARED_HIT,
    CACHE_TOKEN_MISS,
    CACHE_KEY_HIT,
    CACHE_KEY_MISS,
    JWKS_FETCHED,
    JWKS_FAILED,
    JWKS_EXPIRED,
];

/// Every counter: the named ones and the reasons.
pub fn all_counters() -> impl Iterator<Item = &'static str> {
    COUNTERS.iter().chain(UNAUTHORIZED_REASONS).chain(UNAVAILABLE_REASONS).copied()
}

/// The reason counter of a refusal, for 401s and 503s (each one of
/// [`UNAUTHORIZED_REASONS`] / [`UNAVAILABLE_REASONS`], as a test checks).
pub fn denied_reason(d: &Denial) -> Option<&'static str> {
    use crate::credits_api::ServiceError as S;
    use crate::denial::AuthFailure as A;
    use crate::privy_jwt::JwtError as J;
    Some(match d {
        Denial::Unauthorized(why) => match why {
            A::Missing => "dialtone.denied.unauthorized.missing",
            A::Header(_) => "dialtone.denied.unauthorized.malformed_header",
            A::Format(_) => "dialtone.denied.unauthorized.unknown_format",
            A::Jwt(J::UnknownKid) => "dialtone.denied.unauthorized.token_unknown_kid",
            A::Jwt(J::Signature) => "dialtone.denied.unauthorized.token_signature",
            A::Jwt(J::Issuer | J::Audience) => "dialtone.denied.unauthorized.token_claims",
            A::Jwt(J::Expired | J::NotYetValid | J::IssuedInFuture) => "dialtone.denied.unauthorized.token_time",
            A::Jwt(_) => "dialtone.denied.unauthorized.token_malformed",
            A::PrivyNotConfigured => "dialtone.denied.unauthorized.privy_not_accepted",
            A::UnknownKey => "dialtone.denied.unauthorized.unknown_key",
            A::Revoked => "dialtone.denied.unauthorized.key_revoked",
            A::Expired => "dialtone.denied.unauthorized.key_expired",
        },
        Denial::CreditsUnavailable(e) => match e {
            S::Unavailable => "dialtone.denied.credits_unavailable.unreachable",
            S::Status(_) => "dialtone.denied.credits_unavailable.bad_status",
            S::Garbage => "dialtone.denied.credits_unavailable.garbage",
            S::TooLarge => "dialtone.denied.credits_unavailable.too_large",
            S::Inconsistent => "dialtone.denied.credits_unavailable.inconsistent",
            S::DispatchFailed => "dialtone.denied.credits_unavailable.dispatch_failed",
        },
        _ => return None,
    })
}

pub fn allowed(method: AuthMethod) -> &'static str {
    match method {
        AuthMethod::Privy => ALLOWED_PRIVY,
        AuthMethod::ApiKey => ALLOWED_APIKEY,
        AuthMethod::Admin => ALLOWED_ADMIN,
        AuthMethod::Anonymous => ALLOWED_ANONYMOUS,
    }
}

pub fn denied(d: &Denial) -> &'static str {
    match d {
        Denial::Unauthorized(_) => DENIED_UNAUTHORIZED,
        Denial::InsufficientScope { .. } => DENIED_INSUFFICIENT_SCOPE,
        Denial::InsufficientCredits { .. } => DENIED_INSUFFICIENT_CREDITS,
        Denial::PaymentRequired { .. } => DENIED_PAYMENT_REQUIRED,
        Denial::RouteNotAllowed => DENIED_ROUTE_NOT_ALLOWED,
        Denial::CreditsUnavailable(_) => DENIED_CREDITS_UNAVAILABLE,
        Denial::RateLimited { .. } => DENIED_RATE_LIMITED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_denial_has_its_own_counter_named_after_its_code() {
        let denials = [
            Denial::Unauthorized(crate::denial::AuthFailure::Missing),
            Denial::InsufficientScope { scope: "s".into() },
            Denial::InsufficientCredits { credits: 0, required: 1 },
            Denial::RouteNotAllowed,
            Denial::CreditsUnavailable(crate::credits_api::ServiceError::Unavailable),
            Denial::RateLimited { retry_after: 1 },
        ];
        for d in &denials {
            assert_eq!(denied(d), format!("dialtone.denied.{}", d.code()));
            assert!(COUNTERS.contains(&denied(d)));
        }
        let mut names: Vec<&str> = all_counters().collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all_counters().count());
    }

    #[test]
    fn reasons_sit_under_their_code_and_match_the_service_reason() {
        use crate::credits_api::ServiceError as S;
        use crate::denial::AuthFailure as A;
        use crate::privy_jwt::JwtError as J;
        let cases = [
            (Denial::Unauthorized(A::Missing), "dialtone.denied.unauthorized.missing"),
            (Denial::Unauthorized(A::Jwt(J::Signature)), "dialtone.denied.unauthorized.token_signature"),
            (Denial::Unauthorized(A::Jwt(J::Crit)), "dialtone.denied.unauthorized.token_malformed"),
            (Denial::Unauthorized(A::Jwt(J::Expired)), "dialtone.denied.unauthorized.token_time"),
            (Denial::Unauthorized(A::Jwt(J::Audience)), "dialtone.denied.unauthorized.token_claims"),
            (Denial::Unauthorized(A::Revoked), "dialtone.denied.unauthorized.key_revoked"),
        ];
        for (d, want) in cases {
            assert_eq!(denied_reason(&d), Some(want));
        }
        for e in [S::Unavailable, S::Status(500), S::Garbage, S::TooLarge, S::Inconsistent, S::DispatchFailed] {
            let name = denied_reason(&Denial::CreditsUnavailable(e));
            assert_eq!(name, Some(format!("dialtone.denied.credits_unavailable.{}", e.reason())).as_deref());
        }
        assert_eq!(denied_reason(&Denial::RouteNotAllowed), None);
        // Every reason the match can give is a defined counter.
        use crate::bearer::{BearerError, ClassifyError};
        let mut whys = vec![A::Missing, A::Header(BearerError::TooLong), A::Format(ClassifyError::UnknownFormat)];
        whys.extend([A::PrivyNotConfigured, A::UnknownKey, A::Revoked, A::Expired]);
        whys.extend(
            [J::Structure, J::UnknownKid, J::Signature, J::Issuer, J::Audience, J::Expired, J::NotYetValid, J::IssuedInFuture]
                .map(A::Jwt),
        );
        let mut given: Vec<&str> = whys.into_iter().filter_map(|w| denied_reason(&Denial::Unauthorized(w))).collect();
        given.sort_unstable();
        given.dedup();
        let mut listed = UNAUTHORIZED_REASONS.to_vec();
        listed.sort_unstable();
        assert_eq!(given, listed, "the match and the list name the same reasons");
        for name in all_counters() {
            assert!(name.starts_with("dialtone.") && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'.' || b == b'_'));
        }
    }
}
