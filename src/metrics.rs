//! The filter's metrics: names, and which one an outcome counts in. Pure; the
//! glue defines them once per VM and increments them. Envoy shows them in
//! `/stats` and `/stats/prometheus` (see README, "Observability").

use crate::denial::Denial;
use crate::identity::AuthMethod;

/// Requests let through, by how they authenticated.
pub const ALLOWED_PRIVY: &str = "dialtone.allowed.privy";
pub const ALLOWED_APIKEY: &str = "dialtone.allowed.apikey";
pub const ALLOWED_ADMIN: &str = "dialtone.allowed.admin";
/// Paid with x402 (no Bearer).
pub const ALLOWED_X402: &str = "dialtone.allowed.x402";
/// Public routes (and unmatched requests let through).
pub const ALLOWED_ANONYMOUS: &str = "dialtone.allowed.anonymous";

/// Requests refused, by the `error` code of the reply.
pub const DENIED_UNAUTHORIZED: &str = "dialtone.denied.unauthorized";
pub const DENIED_INSUFFICIENT_SCOPE: &str = "dialtone.denied.insufficient_scope";
pub const DENIED_INSUFFICIENT_CREDITS: &str = "dialtone.denied.insufficient_credits";
pub const DENIED_PAYMENT_REQUIRED: &str = "dialtone.denied.payment_required";
pub const DENIED_ROUTE_NOT_ALLOWED: &str = "dialtone.denied.route_not_allowed";
pub const DENIED_CREDITS_UNAVAILABLE: &str = "dialtone.denied.credits_unavailable";
pub const DENIED_RATE_LIMITED: &str = "dialtone.denied.rate_limited";
pub const DENIED_PAYMENT_FAILED: &str = "dialtone.denied.payment_failed";
pub const DENIED_PAYMENT_UNAVAILABLE: &str = "dialtone.denied.payment_unavailable";

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
    "dialtone.denied.unauthorized.kind_not_accepted",
];
pub const UNAVAILABLE_REASONS: &[&str] = &[
    "dialtone.denied.credits_unavailable.unreachable",
    "dialtone.denied.credits_unavailable.bad_status",
    "dialtone.denied.credits_unavailable.garbage",
    "dialtone.denied.credits_unavailable.too_large",
    "dialtone.denied.credits_unavailable.inconsistent",
    "dialtone.denied.credits_unavailable.dispatch_failed",
];

pub const PAYMENT_UNAVAILABLE_REASONS: &[&str] = &[
    "dialtone.denied.payment_unavailable.unreachable",
    "dialtone.denied.payment_unavailable.bad_status",
    "dialtone.denied.payment_unavailable.garbage",
    "dialtone.denied.payment_unavailable.too_large",
    "dialtone.denied.payment_unavailable.dispatch_failed",
];

/// x402 payments by outcome: verified by the facilitator; invalid (refused
/// here before any callout, by reason, or by the facilitator); settled;
/// settlement refused; the facilitator unusable.
pub const X402_VERIFIED: &str = "dialtone.x402.verified";
pub const X402_SETTLED: &str = "dialtone.x402.settled";
pub const X402_SETTLE_FAILED: &str = "dialtone.x402.settle_failed";
pub const X402_UNAVAILABLE: &str = "dialtone.x402.unavailable";
pub const X402_INVALID: &[&str] = &[
    "dialtone.x402.invalid.too_large",
    "dialtone.x402.invalid.repeated",
    "dialtone.x402.invalid.base64",
    "dialtone.x402.invalid.json",
    "dialtone.x402.invalid.version",
    "dialtone.x402.invalid.incomplete",
    "dialtone.x402.invalid.mismatch",
    "dialtone.x402.invalid.v1",
    "dialtone.x402.invalid.in_use",
    "dialtone.x402.invalid.facilitator",
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

/// Credit leases: paid requests charged from a lease (no callout), leases
/// granted and declined, reports sent (lease calls, as `callout.*` are the
/// requests' own), leases given back and recalled, and spends that were
/// served but could not be recorded (the lease closed under them).
pub const LEASE_SPENT: &str = "dialtone.lease.spent";
pub const LEASE_GRANTED: &str = "dialtone.lease.granted";
pub const LEASE_DECLINED: &str = "dialtone.lease.declined";
pub const LEASE_REPORTS: &str = "dialtone.lease.reports";
pub const LEASE_RETURNED: &str = "dialtone.lease.returned";
pub const LEASE_RECALLED: &str = "dialtone.lease.recalled";
pub const LEASE_LOST: &str = "dialtone.lease.lost";
/// Lease requests and reports sent (both kinds of lease call).
pub const LEASE_CALLS: &str = "dialtone.lease.calls";

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
    ALLOWED_X402,
    DENIED_PAYMENT_FAILED,
    DENIED_PAYMENT_UNAVAILABLE,
    X402_VERIFIED,
    X402_SETTLED,
    X402_SETTLE_FAILED,
    X402_UNAVAILABLE,
    LEASE_SPENT,
    LEASE_GRANTED,
    LEASE_DECLINED,
    LEASE_REPORTS,
    LEASE_RETURNED,
    LEASE_RECALLED,
    LEASE_LOST,
    LEASE_CALLS,
];

/// Every counter: the named ones and the reasons.
pub fn all_counters() -> impl Iterator<Item = &'static str> {
    COUNTERS
        .iter()
        .chain(UNAUTHORIZED_REASONS)
        .chain(UNAVAILABLE_REASONS)
        .chain(PAYMENT_UNAVAILABLE_REASONS)
        .chain(X402_INVALID)
        .copied()
}

/// The reason counter of a refusal, for 401s and 503s (each one of
/// [`UNAUTHORIZED_REASONS`] / [`UNAVAILABLE_REASONS`], as a test checks).
pub fn denied_reason(d: &Denial) -> Option<&'static str> {
    use crate::credits_api::ServiceError as S;
    use crate::denial::AuthFailure as A;
    use crate::x402::FacilitatorError as F;
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
            A::KindNotAccepted => "dialtone.denied.unauthorized.kind_not_accepted",
        },
        Denial::CreditsUnavailable(e) => match e {
            S::Unavailable => "dialtone.denied.credits_unavailable.unreachable",
            S::Status(_) => "dialtone.denied.credits_unavailable.bad_status",
            S::Garbage => "dialtone.denied.credits_unavailable.garbage",
            S::TooLarge => "dialtone.denied.credits_unavailable.too_large",
            S::Inconsistent => "dialtone.denied.credits_unavailable.inconsistent",
            S::DispatchFailed => "dialtone.denied.credits_unavailable.dispatch_failed",
        },
        Denial::PaymentUnavailable(e) => match e {
            F::Unavailable => "dialtone.denied.payment_unavailable.unreachable",
            F::Status(_) => "dialtone.denied.payment_unavailable.bad_status",
            F::Garbage => "dialtone.denied.payment_unavailable.garbage",
            F::TooLarge => "dialtone.denied.payment_unavailable.too_large",
            F::DispatchFailed => "dialtone.denied.payment_unavailable.dispatch_failed",
        },
        _ => return None,
    })
}

/// The x402 outcome a refusal counts as, if it is about a payment.
pub fn x402_outcome(d: &Denial) -> Option<&'static str> {
    use crate::denial::PaymentRefusal as R;
    use crate::x402::PaymentError as P;
    Some(match d {
        Denial::PaymentRequired { refused: Some(r), .. } => match r {
            R::Local(P::TooLarge) => "dialtone.x402.invalid.too_large",
            R::Local(P::Repeated) => "dialtone.x402.invalid.repeated",
            R::Local(P::Base64) => "dialtone.x402.invalid.base64",
            R::Local(P::Json) => "dialtone.x402.invalid.json",
            R::Local(P::Version) => "dialtone.x402.invalid.version",
            R::Local(P::Incomplete) => "dialtone.x402.invalid.incomplete",
            R::Local(P::Mismatch) => "dialtone.x402.invalid.mismatch",
            R::Local(P::V1) => "dialtone.x402.invalid.v1",
            R::Local(P::InUse) => "dialtone.x402.invalid.in_use",
            R::Facilitator(_) => "dialtone.x402.invalid.facilitator",
        },
        Denial::PaymentFailed { .. } => X402_SETTLE_FAILED,
        Denial::PaymentUnavailable(_) => X402_UNAVAILABLE,
        _ => return None,
    })
}

pub fn allowed(method: AuthMethod) -> &'static str {
    match method {
        AuthMethod::Privy => ALLOWED_PRIVY,
        AuthMethod::ApiKey => ALLOWED_APIKEY,
        AuthMethod::Admin => ALLOWED_ADMIN,
        AuthMethod::X402 => ALLOWED_X402,
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
        Denial::PaymentFailed { .. } => DENIED_PAYMENT_FAILED,
        Denial::PaymentUnavailable(_) => DENIED_PAYMENT_UNAVAILABLE,
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
            Denial::PaymentFailed { reason: "r".into(), receipt: String::new() },
            Denial::PaymentUnavailable(crate::x402::FacilitatorError::Garbage),
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
        whys.extend([A::PrivyNotConfigured, A::UnknownKey, A::Revoked, A::Expired, A::KindNotAccepted]);
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
            assert!(name.starts_with("dialtone.") && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_'));
        }
    }

    #[test]
    fn payment_outcomes_are_counted_by_reason() {
        use crate::denial::PaymentRefusal as R;
        use crate::x402::{FacilitatorError as F, PaymentError as P};
        let offer = crate::policy::X402Offer {
            description: String::new(),
            mime_type: String::new(),
            accepts: vec![],
            settle: crate::policy::Settle::AfterResponse,
        };
        let refused = |r: Option<R>| Denial::PaymentRequired { offer: Box::new(offer.clone()), resource_url: String::new(), refused: r };
        assert_eq!(x402_outcome(&refused(None)), None, "no payment sent: not a payment outcome");
        let mut given: Vec<&str> = [P::TooLarge, P::Repeated, P::Base64, P::Json, P::Version, P::Incomplete, P::Mismatch, P::V1, P::InUse]
            .into_iter()
            .map(|p| {
                let name = x402_outcome(&refused(Some(R::Local(p)))).unwrap();
                assert_eq!(name, format!("dialtone.x402.invalid.{}", p.reason()));
                name
            })
            .collect();
        given.push(x402_outcome(&refused(Some(R::Facilitator("x".into())))).unwrap());
        given.sort_unstable();
        let mut listed = X402_INVALID.to_vec();
        listed.sort_unstable();
        assert_eq!(given, listed);
        for e in [F::Unavailable, F::Status(500), F::Garbage, F::TooLarge, F::DispatchFailed] {
            let d = Denial::PaymentUnavailable(e);
            assert_eq!(denied_reason(&d), Some(format!("dialtone.denied.payment_unavailable.{}", e.reason())).as_deref());
            assert_eq!(x402_outcome(&d), Some(X402_UNAVAILABLE));
        }
    }
}
