//! Per-VM caches that take work off the hot path. Pure: the glue owns one
//! [`Caches`] per VM (each Envoy worker has its own) and hands it to
//! [`crate::decision::decide_cached`] / [`crate::decision::resume_cached`].
//!
//! - **Verified Privy tokens**, keyed by the SHA-256 of the token, valid
//!   until the token's `exp` (plus the configured leeway, exactly as the
//!   verifier would judge it). A hit skips the ES256 verification, which is
//!   the expensive part of a Privy request. The token itself is never kept.
//! - **API-key lookups**, keyed by the SHA-256 of the key (what the service
//!   is sent anyway), for at most `key_cache_ttl_ms` (≤ 1000 ms, so a
//!   revoked key is refused within a second on every worker and replica).
//!   Only active keys are cached: unknown, revoked and expired keys are
//!   asked about every time.
//!
//! Both are bounded (oldest entry out first) so a client sending a new
//! token per request can't grow a VM's memory.
//!
//! Verified tokens are also shared by the VMs of one Envoy (one per worker)
//! through proxy-wasm shared data ([`SharedStore`]), so a token is verified
//! once per Envoy, not once per worker: a fixed set of [`SHARED_SLOTS`]
//! slots (bounded host memory; a collision only overwrites), each holding
//! one token's digest, the session, its expiry, and the fingerprint of the
//! verifier that accepted it (issuer, audience, leeway, keys): an entry
//! written by another policy sharing the VM id, or before the issuer's
//! keys changed, is ignored.

use std::collections::{HashMap, VecDeque};

use sha2::{Digest, Sha256};

use crate::credits_api::KeyRecord;
use crate::privy_jwt::Session;

pub type Digest32 = [u8; 32];

pub fn sha256(bytes: &[u8]) -> Digest32 {
    Sha256::digest(bytes).into()
}

/// A verifier's fingerprint extended with `keys` (kid and SEC1 point each):
/// what a shared slot is bound to. The policy compiles the fingerprint of
/// its issuer, audience, leeway and pinned keys once; fetched keys extend it.
pub fn keys_fingerprint(base: &[u8], keys: &[crate::privy_jwt::EsKey]) -> Digest32 {
    let mut h = Sha256::new();
    h.update(base);
    for k in keys {
        h.update(k.kid.as_deref().unwrap_or("").as_bytes());
        h.update(b"\0");
        h.update(k.key.to_encoded_point(false).as_bytes());
    }
    h.finalize().into()
}

/// The host's key-value store shared by the VMs of one Envoy (same VM id).
pub trait SharedStore {
    fn get(&self, key: &str) -> Option<Vec<u8>>;
    fn set(&self, key: &str, value: &[u8]);
}

/// No sharing (tests, the fuzzers, and the uncached `decide`).
pub struct NoSharing;

impl SharedStore for NoSharing {
    fn get(&self, _key: &str) -> Option<Vec<u8>> {
        None
    }
    fn set(&self, _key: &str, _value: &[u8]) {}
}

/// Shared slots for verified tokens (a few hundred bytes each).
pub const SHARED_SLOTS: u16 = 4096;
const SHARED_MAGIC: &[u8; 4] = b"dt1\0";

/// The shared-data key of a token's slot.
pub fn shared_slot(digest: &Digest32) -> String {
    let [a, b, ..] = *digest;
    format!("dialtone.verified.{:03x}", u16::from_be_bytes([a, b]) % SHARED_SLOTS)
}

/// A slot's value: the token's digest, the verifier's fingerprint, the
/// first second the token is expired from, the session.
pub fn encode_shared(digest: &Digest32, verifier: &Digest32, session: &Session, expired_from: i64) -> Option<Vec<u8>> {
    let account = u16::try_from(session.account.len()).ok()?;
    let mut v = Vec::with_capacity(80 + session.account.len() + session.session_id.len());
    v.extend_from_slice(SHARED_MAGIC);
    v.extend_from_slice(digest);
    v.extend_from_slice(verifier);
    v.extend_from_slice(&expired_from.to_le_bytes());
    v.extend_from_slice(&account.to_le_bytes());
    v.extend_from_slice(session.account.as_bytes());
    v.extend_from_slice(session.session_id.as_bytes());
    Some(v)
}

/// The session in a slot, if it is this token's, written by this verifier,
/// and not expired at `now`. Anything else (another token, another policy,
/// old keys, garbage) is None.
pub fn decode_shared(value: &[u8], digest: &Digest32, verifier: &Digest32, now: i64) -> Option<(Session, i64)> {
    let rest = value.strip_prefix(SHARED_MAGIC.as_slice())?;
    let (d, rest) = rest.split_first_chunk::<32>()?;
    let (f, rest) = rest.split_first_chunk::<32>()?;
    let (e, rest) = rest.split_first_chunk::<8>()?;
    let (n, rest) = rest.split_first_chunk::<2>()?;
    if d != digest || f != verifier {
        return None;
    }
    let expired_from = i64::from_le_bytes(*e);
    if now >= expired_from {
        return None;
    }
    let (account, session_id) = rest.split_at_checked(usize::from(u16::from_le_bytes(*n)))?;
    let session = Session {
        account: String::from_utf8(account.to_vec()).ok()?,
        session_id: String::from_utf8(session_id.to_vec()).ok()?,
        expires_at: 0,
    };
    // What the verifier guarantees of a session, checked again: an entry
    // is only as trustworthy as the VMs that can write it.
    (!session.account.is_empty() && crate::privy_jwt::is_header_safe(&session.account) && !session.session_id.is_empty())
        .then_some((session, expired_from))
}

/// A bounded map that evicts its oldest insertion first.
#[derive(Debug)]
struct Bounded<V> {
    capacity: usize,
    map: HashMap<Digest32, (u64, V)>,
    /// Insertion order, with the insertion's sequence number so that a stale
    /// queue slot (its entry removed and inserted again) evicts nothing.
    order: VecDeque<(Digest32, u64)>,
    seq: u64,
}

impl<V> Bounded<V> {
    fn new(capacity: usize) -> Self {
        Bounded { capacity, map: HashMap::new(), order: VecDeque::new(), seq: 0 }
    }

    fn get(&self, key: &Digest32) -> Option<&V> {
        self.map.get(key).map(|(_, v)| v)
    }

    fn remove(&mut self, key: &Digest32) {
        self.map.remove(key);
    }

    fn insert(&mut self, key: Digest32, value: V) {
        if self.capacity == 0 {
            return;
        }
        self.seq = self.seq.wrapping_add(1);
        self.map.insert(key, (self.seq, value));
        self.order.push_back((key, self.seq));
        // The queue may hold stale slots; bound it too, or a client that
        // repeats one token after another could grow it.
        while self.map.len() > self.capacity || self.order.len() > self.capacity.saturating_mul(2) {
            let Some((old, seq)) = self.order.pop_front() else { break };
            if self.map.get(&old).is_some_and(|(s, _)| *s == seq) {
                self.map.remove(&old);
            }
        }
    }

    fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// A verified token: who it proves, and the first second at which the
/// verifier would call it expired.
#[derive(Debug, Clone)]
struct VerifiedToken {
    session: Session,
    expired_from: i64,
}

/// A key lookup and when it was answered (milliseconds, host clock).
#[derive(Debug, Clone)]
struct LookedUp {
    record: KeyRecord,
    at_ms: i64,
}

/// How often the caches answered since the glue last asked (for metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub token_hits: u32,
    /// Served from the slot another VM of this Envoy wrote.
    pub token_shared_hits: u32,
    pub token_misses: u32,
    pub key_hits: u32,
    pub key_misses: u32,
}

/// The caches of one VM.
#[derive(Debug)]
pub struct Caches {
    tokens: Bounded<VerifiedToken>,
    keys: Bounded<LookedUp>,
    key_ttl_ms: i64,
    stats: CacheStats,
}

impl Default for Caches {
    fn default() -> Self {
        Caches::disabled()
    }
}

impl Caches {
    /// `token_entries` verified tokens; `key_entries` lookups for
    /// `key_ttl_ms` each. Zero disables either.
    pub fn new(token_entries: usize, key_entries: usize, key_ttl_ms: u64) -> Caches {
        let key_entries = if key_ttl_ms == 0 { 0 } else { key_entries };
        Caches {
            tokens: Bounded::new(token_entries),
            keys: Bounded::new(key_entries),
            key_ttl_ms: i64::try_from(key_ttl_ms).unwrap_or(i64::MAX),
            stats: CacheStats::default(),
        }
    }

    /// Caches nothing.
    pub fn disabled() -> Caches {
        Caches::new(0, 0, 0)
    }

    /// The session a token was verified for, if it is cached and the
    /// verifier would still accept it at `now` (seconds).
    pub fn verified_token(&mut self, digest: &Digest32, now: i64) -> Option<Session> {
        if self.tokens.capacity == 0 {
            return None;
        }
        let hit = match self.tokens.get(digest) {
            Some(t) if now < t.expired_from => Some(t.session.clone()),
            Some(_) => {
                // Expired: let the verifier say so (and forget it).
                self.tokens.remove(digest);
                None
            }
            None => None,
        };
        if hit.is_some() {
            self.stats.token_hits = self.stats.token_hits.saturating_add(1);
        }
        hit
    }

    /// Neither this VM nor another had the token: the verifier runs.
    pub fn verifying_token(&mut self) {
        self.stats.token_misses = self.stats.token_misses.saturating_add(1);
    }

    /// Remembers a token the verifier accepted. `leeway` is the verifier's.
    /// Returns the first second it is expired from.
    pub fn token_verified(&mut self, digest: Digest32, session: &Session, leeway: i64) -> i64 {
        let expired_from = session.expires_at.saturating_add(leeway);
        self.tokens.insert(digest, VerifiedToken { session: session.clone(), expired_from });
        expired_from
    }

    /// Whether tokens are cached at all (sharing follows the local cache).
    pub fn caches_tokens(&self) -> bool {
        self.tokens.capacity > 0
    }

    /// A token another VM verified (read from its shared slot): kept locally too.
    pub fn token_from_shared(&mut self, digest: Digest32, session: &Session, expired_from: i64) {
        self.tokens.insert(digest, VerifiedToken { session: session.clone(), expired_from });
        self.stats.token_shared_hits = self.stats.token_shared_hits.saturating_add(1);
    }

    /// Forgets every verified token: the issuer's key set changed, and a
    /// token verified with a key that is gone must be checked again.
    pub fn keys_changed(&mut self) {
        self.tokens.clear();
    }

    /// An active key's lookup answered less than the TTL ago (`now_ms`).
    pub fn looked_up_key(&mut self, digest: &Digest32, now_ms: i64) -> Option<KeyRecord> {
        if self.keys.capacity == 0 {
            return None;
        }
        let hit = match self.keys.get(digest) {
            // A clock that went backwards counts as stale too.
            Some(l) if (0..self.key_ttl_ms).contains(&now_ms.saturating_sub(l.at_ms)) => Some(l.record.clone()),
            Some(_) => {
                self.keys.remove(digest);
                None
            }
            None => None,
        };
        if hit.is_some() {
            self.stats.key_hits = self.stats.key_hits.saturating_add(1);
        } else {
            self.stats.key_misses = self.stats.key_misses.saturating_add(1);
        }
        hit
    }

    /// Remembers an active key's lookup answered at `now_ms`.
    pub fn key_looked_up(&mut self, digest: Digest32, record: &KeyRecord, now_ms: i64) {
        self.keys.insert(digest, LookedUp { record: record.clone(), at_ms: now_ms });
    }

    /// Hits and misses since the last call.
    pub fn take_stats(&mut self) -> CacheStats {
        std::mem::take(&mut self.stats)
    }

    /// Entries held: (verified tokens, key lookups).
    pub fn sizes(&self) -> (usize, usize) {
        (self.tokens.len(), self.keys.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credits_api::KeyState;

    fn session(exp: i64) -> Session {
        Session { account: "did:privy:u1".into(), session_id: "s".into(), expires_at: exp }
    }

    fn record(prefix: &str) -> KeyRecord {
        KeyRecord {
            account: "acct".into(),
            key_prefix: prefix.into(),
            kind: "api_key".into(),
            scopes: vec!["sms:send".into()],
            state: KeyState::Active,
            expires_at: None,
            balance: 10,
        }
    }

    #[test]
    fn a_token_is_served_until_exp_plus_leeway_then_forgotten() {
        let mut c = Caches::new(4, 0, 0);
        let d = sha256(b"token");
        assert_eq!(c.verified_token(&d, 100), None);
        c.token_verified(d, &session(200), 5);
        assert_eq!(c.verified_token(&d, 204).map(|s| s.expires_at), Some(200));
        assert_eq!(c.verified_token(&d, 205), None, "the verifier calls it expired at exp + leeway");
        assert_eq!(c.sizes().0, 0, "an expired entry is dropped");
        assert_eq!(c.take_stats(), CacheStats { token_hits: 1, ..CacheStats::default() }, "misses are counted by the verifier's caller");
        assert_eq!(c.take_stats(), CacheStats::default());
    }

    #[test]
    fn bounded_oldest_out_first_and_stale_slots_evict_nothing() {
        let mut c = Caches::new(2, 0, 0);
        let (a, b, x) = (sha256(b"a"), sha256(b"b"), sha256(b"x"));
        c.token_verified(a, &session(1000), 0);
        c.token_verified(b, &session(1000), 0);
        c.token_verified(x, &session(1000), 0);
        assert!(c.verified_token(&a, 1).is_none());
        assert!(c.verified_token(&b, 1).is_some() && c.verified_token(&x, 1).is_some());
        // Re-inserting b leaves a stale slot for it at the front: evicting
        // that slot must not drop the fresh b.
        c.token_verified(b, &session(1000), 0);
        c.token_verified(a, &session(1000), 0);
        assert!(c.verified_token(&b, 1).is_some(), "the fresh entry survived its stale slot");
        assert!(c.verified_token(&a, 1).is_some());
        assert!(c.verified_token(&x, 1).is_none());
        for i in 0..1000u32 {
            c.token_verified(sha256(&i.to_le_bytes()), &session(1000), 0);
            c.token_verified(a, &session(1000), 0);
        }
        assert!(c.sizes().0 <= 2 && c.tokens.order.len() <= 4, "map and queue stay bounded");
    }

    #[test]
    fn keys_changed_forgets_tokens() {
        let mut c = Caches::new(4, 4, 500);
        let d = sha256(b"t");
        c.token_verified(d, &session(1000), 0);
        c.key_looked_up(d, &record("abc12345"), 0);
        c.keys_changed();
        assert!(c.verified_token(&d, 1).is_none());
        assert!(c.looked_up_key(&d, 1).is_some(), "key lookups do not depend on the issuer's keys");
    }

    #[test]
    fn a_lookup_lives_for_the_ttl_only() {
        let mut c = Caches::new(0, 4, 500);
        let d = sha256(b"dial_live_x");
        c.key_looked_up(d, &record("abc12345"), 10_000);
        assert!(c.looked_up_key(&d, 10_000).is_some());
        assert!(c.looked_up_key(&d, 10_499).is_some());
        assert!(c.looked_up_key(&d, 10_500).is_none(), "500 ms old is stale");
        c.key_looked_up(d, &record("abc12345"), 10_000);
        assert!(c.looked_up_key(&d, 9_999).is_none(), "a clock that went back is stale");
    }

    #[test]
    fn zero_disables() {
        let mut c = Caches::new(0, 8, 0);
        let d = sha256(b"k");
        c.token_verified(d, &session(1000), 0);
        c.key_looked_up(d, &record("abc12345"), 0);
        assert!(c.verified_token(&d, 1).is_none() && c.looked_up_key(&d, 1).is_none());
        assert_eq!(c.take_stats(), CacheStats::default(), "a disabled cache counts nothing");
    }

    #[test]
    fn a_shared_slot_round_trips_and_refuses_anything_else() {
        let (d, other) = (sha256(b"token"), sha256(b"other token"));
        let (f, f2) = (sha256(b"verifier"), sha256(b"another policy"));
        let s = Session { account: "did:privy:u1".into(), session_id: "sid-1".into(), expires_at: 200 };
        let v = encode_shared(&d, &f, &s, 260).unwrap();
        let (got, exp) = decode_shared(&v, &d, &f, 259).unwrap();
        assert_eq!((got.account.as_str(), got.session_id.as_str(), exp), ("did:privy:u1", "sid-1", 260));
        assert!(decode_shared(&v, &d, &f, 260).is_none(), "expired");
        assert!(decode_shared(&v, &other, &f, 0).is_none(), "another token in the slot");
        assert!(decode_shared(&v, &d, &f2, 0).is_none(), "written by another verifier (policy or keys)");
        // Cut anywhere before the session id: refused.
        for cut in 0..(4 + 32 + 32 + 8 + 2 + s.account.len()) {
            assert!(decode_shared(&v[..cut], &d, &f, 0).is_none(), "truncated at {cut}");
        }
        assert!(decode_shared(b"garbage", &d, &f, 0).is_none());
        let mut bad = v.clone();
        let at = 4 + 32 + 32 + 8;
        bad[at] = 0xff; // an account length past the end
        assert!(decode_shared(&bad, &d, &f, 0).is_none());
        let crlf = Session { account: "a\r\nx-evil: 1".into(), ..s.clone() };
        assert!(decode_shared(&encode_shared(&d, &f, &crlf, 260).unwrap(), &d, &f, 0).is_none(), "unsafe account");
        assert!(shared_slot(&d).starts_with("dialtone.verified.") && shared_slot(&d).len() == "dialtone.verified.".len() + 3);
    }
}
