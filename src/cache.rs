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
//! Every verified token is bound to the verifier that accepted it (the
//! fingerprint of the issuer, audience, leeway and keys): a token verified
//! under another policy or an older key set is verified again.
//!
//! Verified tokens are also shared by the VMs of one Envoy (one per worker)
//! through proxy-wasm shared data ([`SharedStore`]), so a token is verified
//! once per Envoy, not once per worker: a fixed set of [`SHARED_SLOTS`]
//! slots (bounded host memory; a collision only overwrites), each holding
//! one token's digest, the session, its expiry, the verifier's fingerprint,
//! and an HMAC-SHA256 over all of it. Shared data is readable and writable
//! by every Wasm module with the same `vm_id` (another plugin, or an older
//! dialtone during a rollout), and the fingerprint is made of public values
//! only, so without the MAC anyone there could mint "verified" tokens. The
//! MAC key is derived from a secret that only dialtone's VMs get from the
//! host environment ([`SHARED_SECRET_ENV`], like the admin key) and from
//! this build's id ([`crate::BUILD_ID`]): without the secret nothing is
//! shared, and a slot written by another build (say, one with a verifier
//! bug since fixed) does not verify.

use std::collections::{HashMap, VecDeque};

use hmac::{Hmac, Mac};
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

/// The VM environment variable holding the secret that authenticates shared
/// verified-token slots (Envoy: `vm_config.environment_variables`, from a
/// Secret in Istio / Envoy Gateway). Without it, tokens are cached per VM only.
pub const SHARED_SECRET_ENV: &str = "DIAL_SHARED_CACHE_SECRET";
/// Shorter secrets are refused at load.
pub const MIN_SHARED_SECRET_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// The key shared slots are authenticated with: derived from the secret and
/// this build's id, so only VMs of this very build with the secret agree.
/// Held as the HMAC state already keyed with it, which each MAC clones:
/// that saves two of a slot MAC's four SHA-256 blocks.
#[derive(Clone)]
pub struct SlotKey(HmacSha256);

impl std::fmt::Debug for SlotKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SlotKey(…)") // never the key
    }
}

/// Why the shared-slot secret was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecretTooShort;

impl std::fmt::Display for SecretTooShort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{SHARED_SECRET_ENV} must be at least {MIN_SHARED_SECRET_LEN} characters")
    }
}

impl SlotKey {
    /// The key for `secret` in `build` (see [`crate::BUILD_ID`]).
    pub fn derive(secret: &[u8], build: &str) -> Result<SlotKey, SecretTooShort> {
        if secret.len() < MIN_SHARED_SECRET_LEN {
            return Err(SecretTooShort);
        }
        let mut mac = HmacSha256::new_from_slice(secret).map_err(|_| SecretTooShort)?;
        mac.update(b"dialtone shared verified-token slot\0");
        mac.update(build.as_bytes());
        let derived: [u8; 32] = mac.finalize().into_bytes().into();
        HmacSha256::new_from_slice(&derived).map(SlotKey).map_err(|_| SecretTooShort)
    }

    /// The key from the VM environment's value: none (no sharing) when the
    /// variable is unset or empty; an error when it is too short.
    pub fn from_env(value: Option<&str>) -> Result<Option<SlotKey>, SecretTooShort> {
        match value.filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => SlotKey::derive(v.as_bytes(), crate::BUILD_ID).map(Some),
        }
    }

    fn mac(&self) -> HmacSha256 {
        self.0.clone()
    }
}

/// A store and the key its slots are authenticated with.
#[derive(Clone, Copy)]
pub struct Sharing<'a> {
    pub store: &'a dyn SharedStore,
    pub key: &'a SlotKey,
}

/// Shared slots for verified tokens (a few hundred bytes each).
pub const SHARED_SLOTS: u16 = 4096;
const SHARED_MAGIC: &[u8; 4] = b"dt2\0";
const MAC_LEN: usize = 32;

/// The shared-data key of a token's slot.
pub fn shared_slot(digest: &Digest32) -> String {
    let [a, b, ..] = *digest;
    format!("dialtone.verified.{:03x}", u16::from_be_bytes([a, b]) % SHARED_SLOTS)
}

/// A slot's value: the token's digest, the verifier's fingerprint, the
/// first second the token is expired from, the session; then the MAC of
/// all of it.
pub fn encode_shared(key: &SlotKey, digest: &Digest32, verifier: &Digest32, session: &Session, expired_from: i64) -> Option<Vec<u8>> {
    let account = u16::try_from(session.account.len()).ok()?;
    let mut v = Vec::with_capacity(80 + MAC_LEN + session.account.len() + session.session_id.len());
    v.extend_from_slice(SHARED_MAGIC);
    v.extend_from_slice(digest);
    v.extend_from_slice(verifier);
    v.extend_from_slice(&expired_from.to_le_bytes());
    v.extend_from_slice(&account.to_le_bytes());
    v.extend_from_slice(session.account.as_bytes());
    v.extend_from_slice(session.session_id.as_bytes());
    let mut mac = key.mac();
    mac.update(&v);
    v.extend_from_slice(&mac.finalize().into_bytes());
    Some(v)
}

/// The session in a slot, if its MAC is right (written by a VM of this
/// build holding the secret), and it is this token's, written by this
/// verifier, and not expired at `now`. Anything else (a forged or foreign
/// slot, another token, another policy, old keys, garbage) is None.
pub fn decode_shared(key: &SlotKey, value: &[u8], digest: &Digest32, verifier: &Digest32, now: i64) -> Option<(Session, i64)> {
    let (body, tag) = value.split_at_checked(value.len().checked_sub(MAC_LEN)?)?;
    let mut mac = key.mac();
    mac.update(body);
    // Constant time (hmac's verify).
    mac.verify_slice(tag).ok()?;
    let rest = body.strip_prefix(SHARED_MAGIC.as_slice())?;
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
    // What the verifier guarantees of a session, checked again (defence in
    // depth: the MAC already says a VM of this build wrote it).
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

/// A verified token: who it proves, the first second at which the
/// verifier would call it expired, and the verifier that accepted it.
#[derive(Debug, Clone)]
struct VerifiedToken {
    session: Session,
    expired_from: i64,
    verifier: Digest32,
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
    /// This VM's credit leases (kept across a policy reload: its spends are
    /// the accounts' money).
    pub leases: crate::lease::LeaseBook,
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
            leases: crate::lease::LeaseBook::default(),
        }
    }

    /// Caches nothing.
    pub fn disabled() -> Caches {
        Caches::new(0, 0, 0)
    }

    /// The session a token was verified for, if it is cached, was verified
    /// by `verifier` (this policy, these keys), and the verifier would still
    /// accept it at `now` (seconds).
    pub fn verified_token(&mut self, digest: &Digest32, verifier: &Digest32, now: i64) -> Option<Session> {
        if self.tokens.capacity == 0 {
            return None;
        }
        let hit = match self.tokens.get(digest) {
            Some(t) if now < t.expired_from && t.verifier == *verifier => Some(t.session.clone()),
            Some(_) => {
                // Expired, or verified under other keys: let the verifier
                // say (and forget it).
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
    pub fn token_verified(&mut self, digest: Digest32, verifier: &Digest32, session: &Session, leeway: i64) -> i64 {
        let expired_from = session.expires_at.saturating_add(leeway);
        self.tokens.insert(digest, VerifiedToken { session: session.clone(), expired_from, verifier: *verifier });
        expired_from
    }

    /// Whether tokens are cached at all (sharing follows the local cache).
    pub fn caches_tokens(&self) -> bool {
        self.tokens.capacity > 0
    }

    /// A token another VM verified (read from its shared slot): kept locally too.
    pub fn token_from_shared(&mut self, digest: Digest32, verifier: &Digest32, session: &Session, expired_from: i64) {
        self.tokens.insert(digest, VerifiedToken { session: session.clone(), expired_from, verifier: *verifier });
        self.stats.token_shared_hits = self.stats.token_shared_hits.saturating_add(1);
    }

    /// Forgets every verified token: the issuer's key set changed. Entries
    /// are bound to their verifier anyway (they would no longer be served);
    /// this frees their memory.
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

    const V: Digest32 = [7; 32];

    fn key() -> SlotKey {
        SlotKey::derive(b"a shared-cache secret of 32 chars", "test-build").unwrap()
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
        assert_eq!(c.verified_token(&d, &V, 100), None);
        c.token_verified(d, &V, &session(200), 5);
        assert_eq!(c.verified_token(&d, &V, 204).map(|s| s.expires_at), Some(200));
        assert_eq!(c.verified_token(&d, &V, 205), None, "the verifier calls it expired at exp + leeway");
        assert_eq!(c.sizes().0, 0, "an expired entry is dropped");
        assert_eq!(c.take_stats(), CacheStats { token_hits: 1, ..CacheStats::default() }, "misses are counted by the verifier's caller");
        assert_eq!(c.take_stats(), CacheStats::default());
    }

    #[test]
    fn bounded_oldest_out_first_and_stale_slots_evict_nothing() {
        let mut c = Caches::new(2, 0, 0);
        let (a, b, x) = (sha256(b"a"), sha256(b"b"), sha256(b"x"));
        c.token_verified(a, &V, &session(1000), 0);
        c.token_verified(b, &V, &session(1000), 0);
        c.token_verified(x, &V, &session(1000), 0);
        assert!(c.verified_token(&a, &V, 1).is_none());
        assert!(c.verified_token(&b, &V, 1).is_some() && c.verified_token(&x, &V, 1).is_some());
        // Re-inserting b leaves a stale slot for it at the front: evicting
        // that slot must not drop the fresh b.
        c.token_verified(b, &V, &session(1000), 0);
        c.token_verified(a, &V, &session(1000), 0);
        assert!(c.verified_token(&b, &V, 1).is_some(), "the fresh entry survived its stale slot");
        assert!(c.verified_token(&a, &V, 1).is_some());
        assert!(c.verified_token(&x, &V, 1).is_none());
        for i in 0..1000u32 {
            c.token_verified(sha256(&i.to_le_bytes()), &V, &session(1000), 0);
            c.token_verified(a, &V, &session(1000), 0);
        }
        assert!(c.sizes().0 <= 2 && c.tokens.order.len() <= 4, "map and queue stay bounded");
    }

    #[test]
    fn keys_changed_forgets_tokens() {
        let mut c = Caches::new(4, 4, 500);
        let d = sha256(b"t");
        c.token_verified(d, &V, &session(1000), 0);
        c.key_looked_up(d, &record("abc12345"), 0);
        c.keys_changed();
        assert!(c.verified_token(&d, &V, 1).is_none());
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
        c.token_verified(d, &V, &session(1000), 0);
        c.key_looked_up(d, &record("abc12345"), 0);
        assert!(c.verified_token(&d, &V, 1).is_none() && c.looked_up_key(&d, 1).is_none());
        assert_eq!(c.take_stats(), CacheStats::default(), "a disabled cache counts nothing");
    }

    #[test]
    fn a_token_verified_under_other_keys_is_not_served() {
        let mut c = Caches::new(4, 0, 0);
        let d = sha256(b"token");
        c.token_verified(d, &V, &session(1000), 0);
        assert!(c.verified_token(&d, &[8; 32], 1).is_none(), "another verifier (policy or key set)");
        assert!(c.verified_token(&d, &V, 1).is_none(), "and it was forgotten");
    }

    #[test]
    fn a_shared_slot_round_trips_and_refuses_anything_else() {
        let k = key();
        let (d, other) = (sha256(b"token"), sha256(b"other token"));
        let (f, f2) = (sha256(b"verifier"), sha256(b"another policy"));
        let s = Session { account: "did:privy:u1".into(), session_id: "sid-1".into(), expires_at: 200 };
        let v = encode_shared(&k, &d, &f, &s, 260).unwrap();
        let (got, exp) = decode_shared(&k, &v, &d, &f, 259).unwrap();
        assert_eq!((got.account.as_str(), got.session_id.as_str(), exp), ("did:privy:u1", "sid-1", 260));
        assert!(decode_shared(&k, &v, &d, &f, 260).is_none(), "expired");
        assert!(decode_shared(&k, &v, &other, &f, 0).is_none(), "another token in the slot");
        assert!(decode_shared(&k, &v, &d, &f2, 0).is_none(), "written by another verifier (policy or keys)");
        // Cut anywhere: refused (the MAC covers every byte).
        for cut in 0..v.len() {
            assert!(decode_shared(&k, &v[..cut], &d, &f, 0).is_none(), "truncated at {cut}");
        }
        assert!(decode_shared(&k, b"garbage", &d, &f, 0).is_none());
        // Any flipped bit: refused.
        for at in 0..v.len() {
            let mut bad = v.clone();
            bad[at] ^= 0x01;
            assert!(decode_shared(&k, &bad, &d, &f, 0).is_none(), "bit flipped at {at}");
        }
        let crlf = Session { account: "a\r\nx-evil: 1".into(), ..s.clone() };
        assert!(decode_shared(&k, &encode_shared(&k, &d, &f, &crlf, 260).unwrap(), &d, &f, 0).is_none(), "unsafe account");
        assert!(shared_slot(&d).starts_with("dialtone.verified.") && shared_slot(&d).len() == "dialtone.verified.".len() + 3);
    }

    #[test]
    fn a_slot_minted_without_the_secret_or_by_another_build_is_refused() {
        let (d, f) = (sha256(b"eyJhIn0.eyJhIn0.AA"), sha256(b"public fingerprint"));
        let victim = Session { account: "did:privy:victim".into(), session_id: "s".into(), expires_at: i64::MAX - 1 };
        let ours = key();
        // Everything in a slot but the MAC is public: an attacker on the same
        // vm_id writes the slot with every field right and a MAC of its own.
        let forged_with = |k: &SlotKey| encode_shared(k, &d, &f, &victim, i64::MAX).unwrap();
        let attacker = SlotKey::derive(b"the attacker guesses another secret", "test-build").unwrap();
        assert!(decode_shared(&ours, &forged_with(&attacker), &d, &f, 0).is_none(), "another secret");
        let older_build = SlotKey::derive(b"a shared-cache secret of 32 chars", "0.0.9+oldbuild").unwrap();
        assert!(decode_shared(&ours, &forged_with(&older_build), &d, &f, 0).is_none(), "another build, same secret");
        // The pre-MAC slot layout (dt1, no MAC) of an older dialtone.
        let mut old = b"dt1\0".to_vec();
        old.extend_from_slice(&d);
        old.extend_from_slice(&f);
        old.extend_from_slice(&i64::MAX.to_le_bytes());
        old.extend_from_slice(&16u16.to_le_bytes());
        old.extend_from_slice(b"did:privy:victims");
        assert!(decode_shared(&ours, &old, &d, &f, 0).is_none(), "an unauthenticated slot");
        assert!(decode_shared(&ours, &forged_with(&ours), &d, &f, 0).is_some(), "only the holder of the secret can write one");
    }

    #[test]
    fn the_shared_secret_is_optional_but_not_weak() {
        assert!(SlotKey::from_env(None).unwrap().is_none());
        assert!(SlotKey::from_env(Some("")).unwrap().is_none(), "empty = unset: no sharing");
        assert_eq!(SlotKey::from_env(Some("short")).unwrap_err(), SecretTooShort);
        assert!(SlotKey::from_env(Some(&"x".repeat(MIN_SHARED_SECRET_LEN))).unwrap().is_some());
        assert_eq!(format!("{:?}", key()), "SlotKey(…)", "the key is never printed");
    }
}
