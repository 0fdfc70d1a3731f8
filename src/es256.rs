//! ES256 verification with fixed-base tables, for keys known ahead of time.
//!
//! p256's `VerifyingKey::verify` computes `u1·G + u2·Q` as two independent
//! constant-time scalar multiplications (256 doublings and 64 additions with a
//! constant-time table scan, each). Verification handles only public data, so
//! none of that constant-time work buys anything here, and both bases are
//! known long before a token arrives: `G` always, `Q` when the key is loaded
//! from config or from the issuer's JWKS. So both get a table of precomputed
//! multiples, built once, and a verification is ~2·⌈257/w⌉ additions, no
//! doublings, then one field inversion (`to_affine`) and the `x mod n == r`
//! test. (Comparing `r·Z == X` projectively would save that inversion, ~13 %
//! of a verification in V8, but p256 0.13 keeps X and Z private.)
//!
//! The tables keep projective points (see [`TableEntry`] for why not affine:
//! building is ~25× faster, a few ms per key in V8, for ~7 % slower
//! additions). The group law is p256's own (complete Renes–Costello–Batina
//! formulas), so there are no exceptional cases to get wrong; nothing here
//! does field arithmetic. What is accepted is exactly what
//! `VerifyingKey::verify` accepts: the same digest reduction, the same
//! `0 < r, s < n` signature type, the same final `r == x(R) mod n` test (the
//! unit tests compare both on random, tampered and edge-case signatures).
//!
//! Table layout, window `w`, `half = 2^(w-1)`, `windows = ⌈257/w⌉`: entry
//! `i·half + (j-1)` is `j·2^(w·i)·P` for `j` in `1..=half`. A scalar is recoded
//! into signed digits `d_i` in `[-half, half]` with `k = Σ d_i·2^(w·i)`; one
//! more bit than the scalar (257) absorbs the final carry.

use std::sync::OnceLock;

use p256::ecdsa::{Signature, VerifyingKey};
use p256::elliptic_curve::group::Group;
use p256::elliptic_curve::ops::{Invert, Reduce};
use p256::elliptic_curve::point::AffineCoordinates;
use p256::{AffinePoint, FieldBytes, ProjectivePoint, Scalar, U256};
use sha2::{Digest, Sha256};

/// Window of the issuer key's table: 37 windows × 64 projective points × 96
/// bytes = 227,328 bytes per key. Measured in V8 (`examples/es256_bench.rs`):
/// each window size step saves ~10 % of a table multiplication and nearly
/// doubles the memory; w = 8 would be 405 KB per key.
pub const KEY_WINDOW: u32 = 7;
/// Window of the generator's table (405,504 bytes): one per VM, shared by
/// every key, so it gets the larger window.
pub const GENERATOR_WINDOW: u32 = 8;

/// How table entries are stored. Affine entries make each addition ~7 %
/// cheaper (mixed addition) but cost a field inversion each to build (p256
/// 0.13 can't batch-normalise: its FieldElement lacks the `Invert` impl that
/// needs, and field arithmetic is private), which makes a w = 7 key table
/// take ~70-110 ms in V8 instead of ~5 ms, on every config load and JWKS key
/// rotation, per worker. Projective entries are 96 bytes instead of 72 (68 on
/// wasm32). Both are kept so the bench can compare them.
pub trait TableEntry: Copy + std::ops::Neg<Output = Self> + Sized
where
    for<'a> ProjectivePoint: std::ops::AddAssign<&'a Self>,
{
    fn from_projective(p: &ProjectivePoint) -> Self;
}

impl TableEntry for AffinePoint {
    fn from_projective(p: &ProjectivePoint) -> Self {
        p.to_affine()
    }
}

impl TableEntry for ProjectivePoint {
    fn from_projective(p: &ProjectivePoint) -> Self {
        *p
    }
}

/// The multiples of one base point, for variable-time fixed-base multiplication.
pub struct FixedBaseTable<P = ProjectivePoint> {
    window: u32,
    half: usize,
    windows: usize,
    points: Vec<P>,
}

impl<P> std::fmt::Debug for FixedBaseTable<P> {
    // The points themselves are 100s of KB of noise in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FixedBaseTable")
            .field("window", &self.window)
            .field("points", &self.points.len())
            .finish()
    }
}

impl<P: TableEntry> FixedBaseTable<P>
where
    for<'a> ProjectivePoint: std::ops::AddAssign<&'a P>,
{
    /// Builds the table of `base` for windows of `window` bits (2..=12; None
    /// otherwise, so a typo can neither panic nor allocate gigabytes).
    pub fn new(base: &ProjectivePoint, window: u32) -> Option<Self> {
        if !(2..=12).contains(&window) {
            return None;
        }
        let half = 1usize << (window - 1);
        let windows = usize::try_from(257u32.div_ceil(window)).ok()?;
        let mut projective = Vec::with_capacity(windows.checked_mul(half)?);
        let mut b = *base;
        for _ in 0..windows {
            let mut acc = b;
            projective.push(acc);
            for _ in 1..half {
                acc = ProjectivePoint::add(&acc, &b);
                projective.push(acc);
            }
            // acc = half·b, so the next window's base 2^w·b is acc doubled.
            b = acc.double();
        }
        let points = projective.iter().map(P::from_projective).collect();
        Some(FixedBaseTable { window, half, windows, points })
    }

    /// Heap bytes held by the table.
    pub fn memory_bytes(&self) -> usize {
        self.points.len() * std::mem::size_of::<P>()
    }

    /// `acc + k·base`, in variable time (k is public: it comes from the
    /// signature and the digest). None only if the table is inconsistent,
    /// which `new` never builds.
    pub fn mul_add(&self, mut acc: ProjectivePoint, k: &Scalar) -> Option<ProjectivePoint> {
        let bytes = k.to_bytes(); // big-endian
        let mut limbs = [0u64; 4];
        for (limb, chunk) in limbs.iter_mut().rev().zip(bytes.chunks_exact(8)) {
            let mut be = [0u8; 8];
            be.copy_from_slice(chunk);
            *limb = u64::from_be_bytes(be);
        }
        let full = 1u64 << self.window;
        let half = full >> 1;
        let mut carry = 0u64;
        for i in 0..self.windows {
            let v = window_bits(&limbs, u32::try_from(i).ok()? * self.window, self.window) + carry;
            // v is in 0..=2^w; digits above half borrow from the next window.
            let (magnitude, negative) = if v > half {
                carry = 1;
                (full - v, true)
            } else {
                carry = 0;
                (v, false)
            };
            if magnitude == 0 {
                continue;
            }
            let index = i.checked_mul(self.half)?.checked_add(usize::try_from(magnitude - 1).ok()?)?;
            let point = self.points.get(index)?;
            if negative {
                acc += &-*point;
            } else {
                acc += point;
            }
        }
        // 257 bits of windows always absorb the last carry of a 256-bit scalar.
        (carry == 0).then_some(acc)
    }
}

/// `width` bits of the little-endian 256-bit `limbs` from bit `pos` (bits
/// past the top read as zero).
fn window_bits(limbs: &[u64; 4], pos: u32, width: u32) -> u64 {
    let word = |i: u32| usize::try_from(i).ok().and_then(|i| limbs.get(i)).copied().unwrap_or(0);
    let (idx, off) = (pos / 64, pos % 64);
    let lo = word(idx) >> off;
    let hi = if off == 0 { 0 } else { word(idx + 1) << (64 - off) };
    (lo | hi) & ((1u64 << width) - 1)
}

/// The generator's table, built on first use (a VM builds it once; key
/// loading calls this so that no request pays for it).
pub fn generator_table() -> Option<&'static FixedBaseTable> {
    static TABLE: OnceLock<Option<FixedBaseTable>> = OnceLock::new();
    TABLE.get_or_init(|| FixedBaseTable::new(&ProjectivePoint::generator(), GENERATOR_WINDOW)).as_ref()
}

/// A verification key with its precomputed table.
#[derive(Debug)]
pub struct PreparedKey {
    key: VerifyingKey,
    table: FixedBaseTable,
}

impl PreparedKey {
    /// Precomputes the tables for `key` (and the generator's, if not yet).
    pub fn new(key: &VerifyingKey) -> Option<Self> {
        generator_table()?;
        let table = FixedBaseTable::new(&ProjectivePoint::from(*key.as_affine()), KEY_WINDOW)?;
        Some(PreparedKey { key: *key, table })
    }

    /// The key the table was built from.
    pub fn key(&self) -> &VerifyingKey {
        &self.key
    }

    /// Heap bytes of this key's table (the generator's is shared and extra).
    pub fn memory_bytes(&self) -> usize {
        self.table.memory_bytes()
    }

    /// ES256 over `msg`: same verdict as `VerifyingKey::verify`.
    pub fn verify(&self, msg: &[u8], sig: &Signature) -> bool {
        self.verify_prehashed(&Sha256::digest(msg), sig)
    }

    /// ECDSA verification of a SHA-256 digest (as ecdsa's `verify_prehashed`,
    /// with a 32-byte digest `bits2field` is the identity).
    pub fn verify_prehashed(&self, digest: &FieldBytes, sig: &Signature) -> bool {
        let Some(g) = generator_table() else {
            return false;
        };
        let z = <Scalar as Reduce<U256>>::reduce_bytes(digest);
        // `Signature` guarantees 0 < r, s < n: s is invertible.
        let (r, s) = sig.split_scalars();
        let s_inv = *s.invert_vartime();
        let u1 = z * s_inv;
        let u2 = *r * s_inv;
        let sum = g
            .mul_add(ProjectivePoint::IDENTITY, &u1)
            .and_then(|acc| self.table.mul_add(acc, &u2));
        let Some(sum) = sum else {
            return false;
        };
        // The identity normalises to x = 0, which never equals r ≠ 0.
        let x = sum.to_affine().x();
        *r == <Scalar as Reduce<U256>>::reduce_bytes(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::hazmat::PrehashVerifier;
    use p256::ecdsa::signature::{Signer, Verifier};
    use p256::ecdsa::SigningKey;
    use p256::elliptic_curve::ops::MulByGenerator;
    use p256::elliptic_curve::{Field, PrimeField};

    /// A deterministic stream of test bytes (SHA-256 in counter mode): no rng
    /// dependency, and failures reproduce.
    struct Stream(u64);
    impl Stream {
        fn bytes32(&mut self) -> [u8; 32] {
            self.0 += 1;
            Sha256::digest(self.0.to_le_bytes()).into()
        }
        fn scalar(&mut self) -> Scalar {
            loop {
                let b = self.bytes32();
                if let Some(s) = Option::<Scalar>::from(Scalar::from_repr(b.into())) {
                    if !bool::from(s.is_zero()) {
                        return s;
                    }
                }
            }
        }
    }

    fn reference(key: &VerifyingKey, msg: &[u8], sig: &Signature) -> bool {
        key.verify(msg, sig).is_ok()
    }

    #[test]
    fn table_multiplication_matches_p256() {
        let mut rng = Stream(1);
        for w in [2, 3, 4, 5, 7, 8] {
            let base = ProjectivePoint::generator() * rng.scalar();
            let t = FixedBaseTable::<ProjectivePoint>::new(&base, w).unwrap();
            let ta = FixedBaseTable::<AffinePoint>::new(&base, w).unwrap();
            let n_minus_1 = -Scalar::ONE;
            let mut edge = vec![Scalar::ZERO, Scalar::ONE, n_minus_1, -Scalar::from(2u64), Scalar::from(u64::MAX)];
            // Scalars that are all-ones or alternating in every window (carry chains).
            edge.push(<Scalar as Reduce<U256>>::reduce_bytes(&[0xff; 32].into()));
            edge.push(<Scalar as Reduce<U256>>::reduce_bytes(&[0x80; 32].into()));
            edge.push(<Scalar as Reduce<U256>>::reduce_bytes(&[0x7f; 32].into()));
            for _ in 0..20 {
                edge.push(rng.scalar());
            }
            for k in edge {
                let got = t.mul_add(ProjectivePoint::IDENTITY, &k).unwrap();
                assert_eq!(got, base * k, "w={w} k={k:?}");
                assert_eq!(ta.mul_add(ProjectivePoint::IDENTITY, &k).unwrap(), got, "w={w} k={k:?}");
            }
        }
        assert!(FixedBaseTable::<ProjectivePoint>::new(&ProjectivePoint::generator(), 1).is_none());
        assert!(FixedBaseTable::<AffinePoint>::new(&ProjectivePoint::generator(), 13).is_none());
    }

    #[test]
    fn generator_table_matches_mul_by_generator() {
        let g = generator_table().unwrap();
        let mut rng = Stream(2);
        for _ in 0..20 {
            let k = rng.scalar();
            assert_eq!(g.mul_add(ProjectivePoint::IDENTITY, &k).unwrap(), ProjectivePoint::mul_by_generator(&k));
        }
    }

    #[test]
    fn agrees_with_p256_on_random_keys_messages_and_signatures() {
        // (The Wycheproof vectors run through this path in tests/conformance.rs,
        // via `privy_jwt::es256_verify`.)
        let mut rng = Stream(3);
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..4 {
            let sk = SigningKey::from_bytes(&rng.scalar().to_repr()).unwrap();
            let vk = *sk.verifying_key();
            let prepared = PreparedKey::new(&vk).unwrap();
            let other = PreparedKey::new(SigningKey::from_bytes(&rng.scalar().to_repr()).unwrap().verifying_key()).unwrap();
            for m in 0..6 {
                let msg: Vec<u8> = rng.bytes32().iter().cycle().take(m * 97).copied().collect();
                let sig: Signature = sk.sign(&msg);
                let (r, s) = sig.split_scalars();
                let mut cases = vec![sig];
                // High-S twin: valid ES256, must be accepted by both.
                cases.push(Signature::from_scalars(*r, -*s).unwrap());
                // Tampered r, s, and message bits.
                let mut bytes = sig.to_bytes();
                bytes[rng.bytes32()[0] as usize % 64] ^= 1 << (m % 8);
                if let Ok(t) = Signature::from_slice(&bytes) {
                    cases.push(t);
                }
                cases.push(Signature::from_scalars(*r + Scalar::ONE, *s).unwrap());
                cases.push(Signature::from_scalars(*r, *s + Scalar::ONE).unwrap());
                cases.push(Signature::from_scalars(*s, *r).unwrap());
                // r, s at the edges of their range.
                for (a, b) in [(Scalar::ONE, Scalar::ONE), (-Scalar::ONE, -Scalar::ONE), (Scalar::ONE, -Scalar::ONE), (*r, -Scalar::ONE)] {
                    cases.push(Signature::from_scalars(a, b).unwrap());
                }
                // Random garbage.
                cases.push(Signature::from_scalars(rng.scalar(), rng.scalar()).unwrap());
                let mut flipped = msg.clone();
                flipped.push(0);
                for c in &cases {
                    for (input, pk) in [(&msg, &prepared), (&flipped, &prepared), (&msg, &other)] {
                        let want = reference(pk.key(), input, c);
                        assert_eq!(pk.verify(input, c), want, "msg {input:x?} sig {c:?}");
                        if want { accepted += 1 } else { refused += 1 }
                    }
                }
            }
        }
        // Each message: the signature and its high-S twin verify, everything else not.
        assert_eq!(accepted, 4 * 6 * 2);
        assert!(refused > 4 * 6 * 10);
    }

    #[test]
    fn crafted_sums_hit_doubling_and_cancellation() {
        // Choose (digest, r, s) so that u1·G + u2·Q is the identity or 2·u1·G,
        // the cases where an incomplete addition law would go wrong. With
        // Q = d·G: u1 + u2·d ≡ 0 gives the identity (never valid: r ≠ 0).
        let mut rng = Stream(4);
        for _ in 0..8 {
            let d = rng.scalar();
            let vk = VerifyingKey::from_affine(ProjectivePoint::mul_by_generator(&d).to_affine()).unwrap();
            let pk = PreparedKey::new(&vk).unwrap();
            let r = rng.scalar();
            let s = rng.scalar();
            let sig = Signature::from_scalars(r, s).unwrap();
            let s_inv = s.invert().unwrap();
            let u2 = r * s_inv;
            // u1 = -u2·d  ⇒  z = u1·s.
            for u1 in [-(u2 * d), u2 * d] {
                let z = u1 * s;
                let digest: FieldBytes = z.to_repr();
                let want = vk.verify_prehash(&digest, &sig).is_ok();
                assert_eq!(pk.verify_prehashed(&digest, &sig), want);
                // Make the doubling case actually valid: r := x(2·u1·G) mod n.
                let x = (ProjectivePoint::mul_by_generator(&u1) * Scalar::from(2u64)).to_affine().x();
                let r2 = <Scalar as Reduce<U256>>::reduce_bytes(&x);
                if bool::from(r2.is_zero()) {
                    continue;
                }
                // Recompute s so that u2 = r2/s keeps u2·d = u1: s = r2·d/u1.
                let s2 = r2 * d * u1.invert().unwrap();
                let sig2 = Signature::from_scalars(r2, s2).unwrap();
                let digest2: FieldBytes = (u1 * s2).to_repr();
                let want2 = vk.verify_prehash(&digest2, &sig2).is_ok();
                assert_eq!(pk.verify_prehashed(&digest2, &sig2), want2);
                if u1 == u2 * d {
                    assert!(want2, "the crafted doubling signature is valid");
                }
            }
        }
    }

    #[test]
    fn table_memory() {
        let pk = PreparedKey::new(SigningKey::from_bytes(&Stream(5).scalar().to_repr()).unwrap().verifying_key()).unwrap();
        assert_eq!(pk.memory_bytes(), 37 * 64 * std::mem::size_of::<ProjectivePoint>());
        assert_eq!(generator_table().unwrap().memory_bytes(), 33 * 128 * std::mem::size_of::<ProjectivePoint>());
    }
}
