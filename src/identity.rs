//! The identity headers the upstream can trust. The filter removes every
//! request header starting with [`IDENTITY_HEADER_PREFIX`] before it adds its
//! own, so a client can never forge one.

pub const IDENTITY_HEADER_PREFIX: &str = "x-dialtone-";

/// The account charged: a Privy user id (`did:privy:…`) or the account that
/// owns the API key. Absent for admin and anonymous (x402) requests.
pub const ACCOUNT: &str = "x-dialtone-account";
/// `privy`, `apikey` or `admin`.
pub const AUTH_METHOD: &str = "x-dialtone-auth-method";
/// The 8 characters after `dial_live_` / `privy_`: which key was used.
pub const KEY_PREFIX: &str = "x-dialtone-key-prefix";
/// The account's balance after this request's debit (or at lookup, for free routes).
pub const CREDITS_REMAINING: &str = "x-dialtone-credits-remaining";
/// Credits charged for this request (0 on free routes).
pub const CHARGED: &str = "x-dialtone-charged";
/// The policy route that matched.
pub const ROUTE: &str = "x-dialtone-route";
/// An x402 payment the facilitator verified: who paid, on which network,
/// how much of which asset, and (once settled) the transaction.
pub const X402_PAYER: &str = "x-dialtone-x402-payer";
pub const X402_NETWORK: &str = "x-dialtone-x402-network";
pub const X402_AMOUNT: &str = "x-dialtone-x402-amount";
pub const X402_ASSET: &str = "x-dialtone-x402-asset";
pub const X402_TRANSACTION: &str = "x-dialtone-x402-transaction";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Privy,
    ApiKey,
    Admin,
    /// No Bearer credential, paid with x402.
    X402,
    /// No credential at all: a public route (or an unmatched request let through).
    Anonymous,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Privy => "privy",
            AuthMethod::ApiKey => "apikey",
            AuthMethod::Admin => "admin",
            AuthMethod::X402 => "x402",
            AuthMethod::Anonymous => "none",
        }
    }
}

/// Who made an allowed request, as the upstream will be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub method: AuthMethod,
    pub account: Option<String>,
    pub key_prefix: Option<String>,
    pub credits_remaining: Option<i64>,
    pub charged: u64,
    /// The x402 payment of this request, once the facilitator verified it.
    pub payment: Option<PaidWith>,
}

/// A verified x402 payment, as the upstream is told about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaidWith {
    pub payer: String,
    pub network: String,
    pub amount: String,
    pub asset: String,
    /// Set once settled (before the upstream, for `settle: before_upstream`).
    pub transaction: Option<String>,
}

impl Identity {
    pub fn anonymous() -> Self {
        Identity { method: AuthMethod::Anonymous, account: None, key_prefix: None, credits_remaining: None, charged: 0, payment: None }
    }

    pub fn admin() -> Self {
        Identity { method: AuthMethod::Admin, ..Identity::anonymous() }
    }

    /// The headers to add upstream (after every client `x-dialtone-*` header was removed).
    pub fn headers(&self, route: Option<&str>) -> Vec<(&'static str, String)> {
        let mut h = Vec::with_capacity(6);
        if self.method != AuthMethod::Anonymous {
            h.push((AUTH_METHOD, self.method.as_str().to_owned()));
        }
        // Credits charged: not a thing for an x402 payment (its headers say what was paid).
        if !matches!(self.method, AuthMethod::Anonymous | AuthMethod::X402) {
            h.push((CHARGED, self.charged.to_string()));
        }
        if let Some(a) = &self.account {
            h.push((ACCOUNT, a.clone()));
        }
        if let Some(p) = &self.key_prefix {
            h.push((KEY_PREFIX, p.clone()));
        }
        if let Some(c) = self.credits_remaining {
            h.push((CREDITS_REMAINING, c.to_string()));
        }
        if let Some(r) = route {
            h.push((ROUTE, r.to_owned()));
        }
        if let Some(p) = &self.payment {
            h.push((X402_PAYER, p.payer.clone()));
            h.push((X402_NETWORK, p.network.clone()));
            h.push((X402_AMOUNT, p.amount.clone()));
            h.push((X402_ASSET, p.asset.clone()));
            if let Some(tx) = &p.transaction {
                h.push((X402_TRANSACTION, tx.clone()));
            }
        }
        h
    }
}

/// True for a client-sent header that must be removed before forwarding.
pub fn is_identity_header(name: &str) -> bool {
    name.len() >= IDENTITY_HEADER_PREFIX.len()
        && name
            .get(..IDENTITY_HEADER_PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(IDENTITY_HEADER_PREFIX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_identity_headers_in_any_case() {
        assert!(is_identity_header("x-dialtone-account"));
        assert!(is_identity_header("X-Dialtone-Auth-Method"));
        assert!(is_identity_header("x-dialtone-"));
        assert!(!is_identity_header("x-dialtone"));
        assert!(!is_identity_header("authorization"));
    }

    #[test]
    fn headers_for_an_api_key() {
        let id = Identity {
            method: AuthMethod::ApiKey,
            account: Some("did:privy:a".into()),
            key_prefix: Some("abc12345".into()),
            credits_remaining: Some(9),
            charged: 1,
            payment: None,
        };
        let h = id.headers(Some("sms_send"));
        assert!(h.contains(&(AUTH_METHOD, "apikey".into())));
        assert!(h.contains(&(ACCOUNT, "did:privy:a".into())));
        assert!(h.contains(&(KEY_PREFIX, "abc12345".into())));
        assert!(h.contains(&(CREDITS_REMAINING, "9".into())));
        assert!(h.contains(&(CHARGED, "1".into())));
        assert!(h.contains(&(ROUTE, "sms_send".into())));
        assert!(Identity::anonymous().headers(None).is_empty());
    }
}
