//! ES256 verification with fixed-base tables, for keys known ahead of time.
//!
//! p256's `VerifyingKey::verify` computes `u1·G + u2·Q` as two independent
//! constant-time scalar multiplications (256 doublings and 64 additions with a
//! constant-time table scan, each). Verification handles only public data, so
//! none of that constant-time work buys anything here, and both bases are
//! known long before a token arrives: `G` always, `Q` when the key is loaded
//! from config or from the issuer's JWKS. So both get a table of precomputed
//! affine multiples, built once, and a verification is:
//!
//! - `s⁻¹ mod n` by a variable-time binary extended Euclid on 64-bit limbs
//!   ([`invert_mod_n_vartime`]), checked by multiplying back (`s·s⁻¹ == 1`);
//! - ~2·⌈257/w⌉ mixed additions (Jacobian accumulator + affine table entry,
//!   8M + 3S each), no doublings;
//! - the `x(R) mod n == r` test done in Jacobian coordinates, `X == r·Z²`
//!   (or `X == (r+n)·Z²` when `r + n < p`), so no field inversion at all.
//!
//! The point arithmetic is done here, on p256's own field elements (its
//! `expose-field` feature), because p256 0.13 keeps the coordinates of its
//! points private: with them hidden, neither batch normalisation nor the
//! projective `x` test is possible. The addition law is the textbook Jacobian
//! one with its exceptional cases handled explicitly (accumulator at
//! infinity, `P == Q` → doubling, `P == −Q` → infinity), which is sound in
//! variable time; the unit tests compare every table entry and every
//! multiplication against p256's group law, and every verdict against
//! `VerifyingKey::verify` (random, tampered, crafted doubling/cancellation
//! and edge-case signatures; the Wycheproof vectors in
//! `tests/conformance.rs`). What is accepted is exactly what
//! `VerifyingKey::verify` accepts: the same digest reduction, the same
//! `0 < r, s < n` signature type, the same `r == x(R) mod n` test.
//!
//! Table layout, window `w`, `half = 2^(w-1)`, `windows = ⌈257/w⌉`: entry
//! `i·half + (j-1)` is `j·2^(w·i)·P` for `j` in `1..=half`, affine. A scalar
//! is recoded into signed digits `d_i` in `[-half, half]` with
//! `k = Σ d_i·2^(w·i)`; one more bit than the scalar (257) absorbs the final
//! carry. Each window is built in Jacobian coordinates and normalised with
//! one field inversion (Montgomery's batch trick), together with the next
//! window's base.

use std::sync::OnceLock;

use p256::ecdsa::{Signature, VerifyingKey};
use p256::elliptic_curve::ops::Reduce;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::elliptic_curve::PrimeField;
use p256::{AffinePoint, FieldBytes, FieldElement, Scalar, U256};
use sha2::{Digest, Sha256};

/// Window of the issuer key's table: 37 windows × 64 affine points × 64
/// bytes = 151,552 bytes per key, built in ~6 ms in V8. Measured in V8
/// (`examples/es256_bench.rs`), one table multiplication takes ~44 µs at
/// w = 7 and ~39 µs at w = 8, which would cost 270 KB and ~9 ms per key: not
/// worth it for ~5 % of a verification, with a table per key and per worker.
pub const KEY_WINDOW: u32 = 7;
/// Window of the generator's table (33 × 128 × 64 = 270,336 bytes): one per
/// VM, shared by every key, so it gets the larger window.
pub const GENERATOR_WINDOW: u32 = 8;

/// A point in affine coordinates, never the point at infinity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Affine {
    x: FieldElement,
    y: FieldElement,
}

impl Affine {
    /// The coordinates of a p256 point (None for the identity).
    pub fn from_p256(p: &AffinePoint) -> Option<Self> {
        let encoded = p.to_encoded_point(false);
        let x = Option::<FieldElement>::from(FieldElement::from_bytes(encoded.x()?))?;
        let y = Option::<FieldElement>::from(FieldElement::from_bytes(encoded.y()?))?;
        Some(Affine { x, y })
    }

    fn neg(&self) -> Self {
        Affine { x: self.x, y: -self.y }
    }
}

/// A point in Jacobian coordinates `(X/Z², Y/Z³)`; `Z == 0` is infinity.
#[derive(Clone, Copy, Debug)]
pub struct Jacobian {
    x: FieldElement,
    y: FieldElement,
    z: FieldElement,
}

impl Jacobian {
    pub const IDENTITY: Jacobian = Jacobian { x: FieldElement::ONE, y: FieldElement::ONE, z: FieldElement::ZERO };

    fn from_affine(p: &Affine) -> Self {
        Jacobian { x: p.x, y: p.y, z: FieldElement::ONE }
    }

    pub fn is_identity(&self) -> bool {
        bool::from(self.z.is_zero())
    }

    /// `2·self` (dbl-2001-b, a = −3: 3M + 5S).
    pub fn double(&self) -> Self {
        if self.is_identity() || bool::from(self.y.is_zero()) {
            return Jacobian::IDENTITY;
        }
        let delta = self.z.square();
        let gamma = self.y.square();
        let beta = self.x * gamma;
        let t = (self.x - delta) * (self.x + delta);
        let alpha = t.double() + t;
        let beta4 = beta.double().double();
        let x3 = alpha.square() - beta4.double();
        let z3 = (self.y + self.z).square() - gamma - delta;
        let gamma2_8 = gamma.square().double().double().double();
        let y3 = alpha * (beta4 - x3) - gamma2_8;
        Jacobian { x: x3, y: y3, z: z3 }
    }

    /// `self + q` (madd-2004-hmv: 8M + 3S), exceptional cases included.
    pub fn add_affine(&self, q: &Affine) -> Self {
        if self.is_identity() {
            return Jacobian::from_affine(q);
        }
        let z1z1 = self.z.square();
        let u2 = q.x * z1z1;
        let s2 = q.y * (z1z1 * self.z);
        let h = u2 - self.x;
        let r = s2 - self.y;
        if bool::from(h.is_zero()) {
            // Same x: self == q (double it) or self == −q.
            #[cfg(test)]
            tests::count_exceptional(bool::from(r.is_zero()));
            return if bool::from(r.is_zero()) { self.double() } else { Jacobian::IDENTITY };
        }
        let hh = h.square();
        let hhh = hh * h;
        let v = self.x * hh;
        let x3 = r.square() - hhh - v.double();
        let y3 = r * (v - x3) - self.y * hhh;
        Jacobian { x: x3, y: y3, z: self.z * h }
    }

    /// The affine point, None for infinity (one field inversion).
    pub fn to_affine(&self) -> Option<Affine> {
        let zinv = Option::<FieldElement>::from(self.z.invert())?;
        let zinv2 = zinv.square();
        Some(Affine { x: self.x * zinv2, y: self.y * (zinv2 * zinv) })
    }

    /// The p256 point (for tests and the bench).
    pub fn to_p256(&self) -> p256::ProjectivePoint {
        let Some(a) = self.to_affine() else {
            return p256::ProjectivePoint::IDENTITY;
        };
        let encoded = p256::EncodedPoint::from_affine_coordinates(&a.x.to_bytes(), &a.y.to_bytes(), false);
        Option::<AffinePoint>::from(<AffinePoint as p256::elliptic_curve::sec1::FromEncodedPoint<p256::NistP256>>::from_encoded_point(&encoded))
            .map_or(p256::ProjectivePoint::IDENTITY, p256::ProjectivePoint::from)
    }
}

/// Affine forms of `points` with one field inversion (Montgomery's trick:
/// 3M per point, then 3M + 1S to apply). None if any point is infinity.
fn batch_to_affine(points: &[Jacobian]) -> Option<Vec<Affine>> {
    let mut prefix = Vec::with_capacity(points.len());
    let mut acc = FieldElement::ONE;
    for p in points {
        if p.is_identity() {
            return None;
        }
        prefix.push(acc);
        acc *= p.z;
    }
    // acc = Π z; inv = 1/acc, then peel one z off per point from the end.
    let mut inv = Option::<FieldElement>::from(acc.invert())?;
    let mut out = vec![Affine { x: FieldElement::ZERO, y: FieldElement::ZERO }; points.len()];
    for ((p, before), slot) in points.iter().zip(&prefix).zip(out.iter_mut()).rev() {
        let zinv = inv * before;
        inv *= p.z;
        let zinv2 = zinv.square();
        *slot = Affine { x: p.x * zinv2, y: p.y * (zinv2 * zinv) };
    }
    Some(out)
}

/// The affine multiples of one base point, for variable-time fixed-base
/// multiplication.
pub struct FixedBaseTable {
    window: u32,
    half: usize,
    windows: usize,
    points: Vec<Affine>,
}

impl std::fmt::Debug for FixedBaseTable {
    // The points themselves are 100s of KB of noise in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FixedBaseTable")
            .field("window", &self.window)
            .field("points", &self.points.len())
            .finish()
    }
}

impl FixedBaseTable {
    /// Builds the table of `base` for windows of `window` bits (2..=12; None
    /// otherwise, so a typo can neither panic nor allocate gigabytes).
    pub fn new(base: &Affine, window: u32) -> Option<Self> {
        if !(2..=12).contains(&window) {
            return None;
        }
        let half = 1usize << (window - 1);
        let windows = usize::try_from(257u32.div_ceil(window)).ok()?;
        let mut points = Vec::with_capacity(windows.checked_mul(half)?);
        let mut b = *base;
        let mut jac = Vec::with_capacity(half + 1);
        for _ in 0..windows {
            jac.clear();
            let mut acc = Jacobian::from_affine(&b);
            jac.push(acc);
            for _ in 1..half {
                acc = acc.add_affine(&b);
                jac.push(acc);
            }
            // acc = half·b, so the next window's base 2^w·b is acc doubled:
            // normalised with this window's points, as the last one.
            jac.push(acc.double());
            let mut affine = batch_to_affine(&jac)?;
            b = affine.pop()?;
            points.extend(affine);
        }
        Some(FixedBaseTable { window, half, windows, points })
    }

    /// Heap bytes held by the table.
    pub fn memory_bytes(&self) -> usize {
        self.points.len() * std::mem::size_of::<Affine>()
    }

    /// `acc + k·base`, in variable time (k is public: it comes from the
    /// signature and the digest). None only if the table is inconsistent,
    /// which `new` never builds.
    pub fn mul_add(&self, mut acc: Jacobian, k: &Scalar) -> Option<Jacobian> {
        let limbs = limbs_from_be(&k.to_bytes());
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
            acc = if negative { acc.add_affine(&point.neg()) } else { acc.add_affine(point) };
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

/// 256-bit integers as little-endian 64-bit limbs (64-bit arithmetic is
/// native in wasm; crypto-bigint would use 32-bit limbs on wasm32).
type Limbs = [u64; 4];

/// The group order n.
const N: Limbs = [0xF3B9_CAC2_FC63_2551, 0xBCE6_FAAD_A717_9E84, 0xFFFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF_0000_0000];

fn limbs_from_be(bytes: &FieldBytes) -> Limbs {
    let mut limbs = [0u64; 4];
    for (limb, chunk) in limbs.iter_mut().rev().zip(bytes.chunks_exact(8)) {
        let mut be = [0u8; 8];
        be.copy_from_slice(chunk);
        *limb = u64::from_be_bytes(be);
    }
    limbs
}

fn limbs_to_be(limbs: &Limbs) -> FieldBytes {
    let mut bytes = FieldBytes::default();
    for (limb, chunk) in limbs.iter().rev().zip(bytes.chunks_exact_mut(8)) {
        chunk.copy_from_slice(&limb.to_be_bytes());
    }
    bytes
}

/// `a - b` and the borrow out.
fn sub(a: &Limbs, b: &Limbs) -> (Limbs, bool) {
    let mut out = [0u64; 4];
    let mut borrow = false;
    for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
        let (d, b1) = x.overflowing_sub(*y);
        let (d, b2) = d.overflowing_sub(u64::from(borrow));
        *o = d;
        borrow = b1 | b2;
    }
    (out, borrow)
}

/// `a + b` and the carry out.
fn add(a: &Limbs, b: &Limbs) -> (Limbs, bool) {
    let mut out = [0u64; 4];
    let mut carry = false;
    for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
        let (s, c1) = x.overflowing_add(*y);
        let (s, c2) = s.overflowing_add(u64::from(carry));
        *o = s;
        carry = c1 | c2;
    }
    (out, carry)
}

/// `a >> 1`, with `top` shifted in as bit 255.
fn shr1(a: &Limbs, top: bool) -> Limbs {
    let [a0, a1, a2, a3] = *a;
    [(a0 >> 1) | (a1 << 63), (a1 >> 1) | (a2 << 63), (a2 >> 1) | (a3 << 63), (a3 >> 1) | (u64::from(top) << 63)]
}

/// `a / 2 mod n` for `a < n`.
fn half_mod_n(a: &Limbs) -> Limbs {
    if a[0] & 1 == 0 {
        shr1(a, false)
    } else {
        let (s, carry) = add(a, &N);
        shr1(&s, carry)
    }
}

/// `a - b mod n` for `a, b < n`.
fn sub_mod_n(a: &Limbs, b: &Limbs) -> Limbs {
    let (d, borrow) = sub(a, b);
    if borrow {
        add(&d, &N).0
    } else {
        d
    }
}

/// `a > b`.
fn gt(a: &Limbs, b: &Limbs) -> bool {
    let [a0, a1, a2, a3] = *a;
    let [b0, b1, b2, b3] = *b;
    [a3, a2, a1, a0] > [b3, b2, b1, b0]
}

/// `a⁻¹ mod n` in variable time (binary extended Euclid; for public
/// scalars only), checked by multiplying back. None for zero.
pub fn invert_mod_n_vartime(a: &Scalar) -> Option<Scalar> {
    let mut u = limbs_from_be(&a.to_bytes());
    if u == [0; 4] {
        return None;
    }
    // Invariants: x1·a ≡ u and x2·a ≡ v (mod n), all of u, v, x1, x2 < n,
    // u, v > 0. Each pass strictly shrinks u + v, so this ends, with
    // u == v == gcd(a, n) == 1.
    let (mut v, mut x1, mut x2) = (N, [1u64, 0, 0, 0], [0u64; 4]);
    loop {
        while u[0] & 1 == 0 {
            u = shr1(&u, false);
            x1 = half_mod_n(&x1);
        }
        while v[0] & 1 == 0 {
            v = shr1(&v, false);
            x2 = half_mod_n(&x2);
        }
        if u == v {
            break;
        }
        if gt(&u, &v) {
            u = sub(&u, &v).0;
            x1 = sub_mod_n(&x1, &x2);
        } else {
            v = sub(&v, &u).0;
            x2 = sub_mod_n(&x2, &x1);
        }
    }
    let inv = Option::<Scalar>::from(Scalar::from_repr(limbs_to_be(&x1)))?;
    // Fail closed on any slip above: the answer is checked.
    (u == [1, 0, 0, 0] && *a * inv == Scalar::ONE).then_some(inv)
}

/// The generator's table, built on first use (a VM builds it once; key
/// loading calls this so that no request pays for it).
pub fn generator_table() -> Option<&'static FixedBaseTable> {
    static TABLE: OnceLock<Option<FixedBaseTable>> = OnceLock::new();
    TABLE
        .get_or_init(|| FixedBaseTable::new(&Affine::from_p256(&AffinePoint::GENERATOR)?, GENERATOR_WINDOW))
        .as_ref()
}

/// p − n, big-endian: `x(R) mod n == r` also holds for `x(R) == r + n`
/// when `r < p − n` (never for a real signature, but valid).
const P_MINUS_N: [u8; 32] = [
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x43, 0x19, 0x05, 0x53, 0x58, 0xe8, 0x61, 0x7b, 0x0c, 0x46, 0x35,
    0x3d, 0x03, 0x9c, 0xda, 0xae,
];

/// Whether `x(point) mod n == r`, without leaving Jacobian coordinates:
/// `x = X/Z²` and `x < p`, so that is `X == r·Z²` or, when `r + n < p`,
/// `X == (r + n)·Z²`. Infinity has no x and never matches.
fn x_mod_n_is(point: &Jacobian, r: &Scalar) -> bool {
    if point.is_identity() {
        return false;
    }
    let r_bytes = r.to_bytes();
    let Some(r_fe) = Option::<FieldElement>::from(FieldElement::from_bytes(&r_bytes)) else {
        return false; // r < n < p: never
    };
    let zz = point.z.square();
    if r_fe * zz == point.x {
        return true;
    }
    if <[u8; 32]>::from(r_bytes) >= P_MINUS_N {
        return false;
    }
    let n_fe = Option::<FieldElement>::from(FieldElement::from_bytes(&limbs_to_be(&N)));
    n_fe.is_some_and(|n| (r_fe + n) * zz == point.x)
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
        let table = FixedBaseTable::new(&Affine::from_p256(key.as_affine())?, KEY_WINDOW)?;
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
        let Some(s_inv) = invert_mod_n_vartime(&s) else {
            return false;
        };
        let u1 = z * s_inv;
        let u2 = *r * s_inv;
        let sum = g.mul_add(Jacobian::IDENTITY, &u1).and_then(|acc| self.table.mul_add(acc, &u2));
        sum.is_some_and(|sum| x_mod_n_is(&sum, &r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::hazmat::PrehashVerifier;
    use p256::ecdsa::signature::{Signer, Verifier};
    use p256::ecdsa::SigningKey;
    use p256::elliptic_curve::ops::{Invert, MulByGenerator};
    use p256::elliptic_curve::point::AffineCoordinates;
    use p256::elliptic_curve::{Field, Group};
    use p256::ProjectivePoint;

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

    fn affine(p: &ProjectivePoint) -> Affine {
        Affine::from_p256(&p.to_affine()).unwrap()
    }

    fn edge_scalars(rng: &mut Stream) -> Vec<Scalar> {
        let mut edge = vec![Scalar::ZERO, Scalar::ONE, -Scalar::ONE, -Scalar::from(2u64), Scalar::from(2u64), Scalar::from(u64::MAX)];
        // Scalars that are all-ones or alternating in every window (carry chains).
        edge.push(<Scalar as Reduce<U256>>::reduce_bytes(&[0xff; 32].into()));
        edge.push(<Scalar as Reduce<U256>>::reduce_bytes(&[0x80; 32].into()));
        edge.push(<Scalar as Reduce<U256>>::reduce_bytes(&[0x7f; 32].into()));
        edge.push(<Scalar as Reduce<U256>>::reduce_bytes(&[0x01; 32].into()));
        // (n+1)/2 = 1/2, and powers of two.
        edge.push(Scalar::from(2u64).invert().unwrap());
        for k in [1u32, 63, 64, 65, 127, 128, 200, 255] {
            edge.push((0..k).fold(Scalar::ONE, |a, _| a.double()));
        }
        for _ in 0..20 {
            edge.push(rng.scalar());
        }
        edge
    }

    #[test]
    fn group_law_matches_p256_including_exceptional_cases() {
        let mut rng = Stream(6);
        for _ in 0..20 {
            let (a, b) = (rng.scalar(), rng.scalar());
            let (pa, pb) = (ProjectivePoint::mul_by_generator(&a), ProjectivePoint::mul_by_generator(&b));
            let ja = Jacobian::IDENTITY.add_affine(&affine(&pa)).add_affine(&affine(&(pa * Scalar::from(3u64))));
            // ja = 4·pa, with Z ≠ 1.
            let pa4 = pa * Scalar::from(4u64);
            assert_eq!(ja.to_p256(), pa4);
            assert_eq!(ja.add_affine(&affine(&pb)).to_p256(), pa4 + pb);
            assert_eq!(ja.double().to_p256(), pa4.double());
            // P + P doubles, P + (−P) is infinity, ∞ + Q is Q.
            assert_eq!(ja.add_affine(&affine(&pa4)).to_p256(), pa4.double());
            assert!(ja.add_affine(&affine(&-pa4)).is_identity());
            assert!(ja.add_affine(&affine(&pa4).neg()).is_identity());
            assert_eq!(Jacobian::IDENTITY.add_affine(&affine(&pb)).to_p256(), pb);
            assert!(Jacobian::IDENTITY.double().is_identity());
            assert_eq!(Jacobian::IDENTITY.to_p256(), ProjectivePoint::IDENTITY);
            let batch = batch_to_affine(&[ja, ja.double(), Jacobian::from_affine(&affine(&pb))]).unwrap();
            assert_eq!(batch, vec![affine(&pa4), affine(&pa4.double()), affine(&pb)]);
            assert!(batch_to_affine(&[ja, Jacobian::IDENTITY]).is_none());
        }
        assert!(Affine::from_p256(&AffinePoint::IDENTITY).is_none());
    }

    #[test]
    fn table_entries_and_multiplication_match_p256() {
        let mut rng = Stream(1);
        for w in [2, 3, 4, 5, 7, 8] {
            let base = ProjectivePoint::generator() * rng.scalar();
            let t = FixedBaseTable::new(&affine(&base), w).unwrap();
            // Every entry: j·2^(w·i)·base.
            let mut b = base;
            for (i, window) in t.points.chunks(t.half).enumerate() {
                assert_eq!(window.len(), t.half);
                let mut m = ProjectivePoint::IDENTITY;
                for (j, entry) in window.iter().enumerate() {
                    m += b;
                    assert_eq!(*entry, affine(&m), "w={w} i={i} j={}", j + 1);
                }
                b = m.double();
            }
            assert_eq!(t.points.len(), t.windows * t.half);
            for k in edge_scalars(&mut rng) {
                let got = t.mul_add(Jacobian::IDENTITY, &k).unwrap();
                assert_eq!(got.to_p256(), base * k, "w={w} k={k:?}");
                // Onto a non-trivial accumulator.
                let start = Jacobian::IDENTITY.add_affine(&affine(&base));
                assert_eq!(t.mul_add(start, &k).unwrap().to_p256(), base * (k + Scalar::ONE), "w={w} k={k:?}");
            }
        }
        assert!(FixedBaseTable::new(&affine(&ProjectivePoint::generator()), 1).is_none());
        assert!(FixedBaseTable::new(&affine(&ProjectivePoint::generator()), 13).is_none());
    }

    #[test]
    fn generator_table_matches_mul_by_generator() {
        let g = generator_table().unwrap();
        let mut rng = Stream(2);
        for k in edge_scalars(&mut rng) {
            assert_eq!(g.mul_add(Jacobian::IDENTITY, &k).unwrap().to_p256(), ProjectivePoint::mul_by_generator(&k));
        }
    }

    #[test]
    fn inversion_matches_p256() {
        let mut rng = Stream(7);
        let mut cases = edge_scalars(&mut rng);
        cases.extend((0..500).map(|_| rng.scalar()));
        for a in cases {
            let want = Option::<Scalar>::from(a.invert());
            assert_eq!(invert_mod_n_vartime(&a), want, "a={a:?}");
            assert_eq!(want, Option::<Scalar>::from(Invert::invert_vartime(&a)));
        }
        assert_eq!(invert_mod_n_vartime(&Scalar::ZERO), None);
        assert_eq!(invert_mod_n_vartime(&Scalar::ONE), Some(Scalar::ONE));
        assert_eq!(invert_mod_n_vartime(&-Scalar::ONE), Some(-Scalar::ONE));
        // Limb helpers at their carries.
        assert_eq!(limbs_from_be(&limbs_to_be(&N)), N);
        assert_eq!(half_mod_n(&[1, 0, 0, 0]), limbs_from_be(&Scalar::from(2u64).invert().unwrap().to_bytes()));
        let n_minus_1 = limbs_from_be(&(-Scalar::ONE).to_bytes());
        assert_eq!(sub_mod_n(&[0; 4], &[1, 0, 0, 0]), n_minus_1);
        let half = Scalar::from(2u64).invert().unwrap();
        assert_eq!(half_mod_n(&n_minus_1), limbs_from_be(&(-half).to_bytes()));
        // n − 2 is odd: (n − 2 + n)/2 carries out of 256 bits and is n − 1.
        assert_eq!(half_mod_n(&limbs_from_be(&(-Scalar::from(2u64)).to_bytes())), n_minus_1);
    }

    #[test]
    fn x_test_covers_r_plus_n() {
        // x_mod_n_is only does field arithmetic on X and Z: any (X, Z) pair
        // exercises it, on the curve or not.
        let fe = |b: &[u8]| FieldElement::from_slice(b).unwrap();
        let z = fe(&Sha256::digest(b"z"));
        let zz = z.square();
        let n = fe(&limbs_to_be(&N));
        let point = |x: FieldElement| Jacobian { x: x * zz, y: FieldElement::ONE, z };
        let small = Scalar::from(12345u64);
        let small_fe = FieldElement::from_u64(12345);
        assert!(x_mod_n_is(&point(small_fe), &small));
        assert!(x_mod_n_is(&point(small_fe + n), &small), "x = r + n < p");
        assert!(!x_mod_n_is(&point(small_fe + n + FieldElement::ONE), &small));
        assert!(!x_mod_n_is(&Jacobian { z: FieldElement::ZERO, ..point(small_fe) }, &small));
        // r = p − n − 1 still has r + n = p − 1 < p; r = p − n does not (r + n = p ≡ 0).
        let r_max = Option::<Scalar>::from(Scalar::from_repr(P_MINUS_N.into())).unwrap() - Scalar::ONE;
        let r_max_fe = fe(&r_max.to_bytes());
        assert!(x_mod_n_is(&point(r_max_fe + n), &r_max));
        let r_over = r_max + Scalar::ONE;
        assert!(!x_mod_n_is(&point(fe(&r_over.to_bytes()) + n), &r_over), "x = 0 is not r");
        // And a real point: x(k·G) mod n for random k.
        let mut rng = Stream(8);
        for _ in 0..20 {
            let p = ProjectivePoint::mul_by_generator(&rng.scalar());
            let r = <Scalar as Reduce<U256>>::reduce_bytes(&p.to_affine().x());
            let j = Jacobian::IDENTITY.add_affine(&affine(&p)).double();
            let r2 = <Scalar as Reduce<U256>>::reduce_bytes(&p.double().to_affine().x());
            assert!(x_mod_n_is(&j, &r2));
            assert!(!x_mod_n_is(&j, &r));
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
        // Only the final sums are special here: the accumulator never meets
        // the point being added on the way (no doubling inside verification;
        // crafted_keys_hit_doubling_and_cancellation_mid_accumulation does).
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

    thread_local! {
        /// Exceptional mixed additions on this thread: (doublings, cancellations).
        static EXCEPTIONAL: std::cell::Cell<(u32, u32)> = const { std::cell::Cell::new((0, 0)) };
    }

    /// Called by `Jacobian::add_affine` (test builds only) when the point
    /// added has the accumulator's x: equal (doubling) or opposite.
    pub(super) fn count_exceptional(doubling: bool) {
        EXCEPTIONAL.with(|c| {
            let (d, x) = c.get();
            c.set(if doubling { (d + 1, x) } else { (d, x + 1) });
        });
    }

    /// The exceptional additions `f` makes (tables built before it are not counted).
    fn exceptional_in<T>(f: impl FnOnce() -> T) -> (T, (u32, u32)) {
        EXCEPTIONAL.with(|c| c.set((0, 0)));
        let out = f();
        (out, EXCEPTIONAL.with(|c| c.get()))
    }

    /// `k` in the signed digits `FixedBaseTable::mul_add` adds for window
    /// `w`, as the scalars `d_i·2^(w·i)` (recoded here from the bytes, not
    /// with the module's helpers).
    fn digit_terms(k: &Scalar, w: u32) -> Vec<Scalar> {
        let bytes = k.to_bytes();
        let bit = |i: u32| i < 256 && (bytes[31 - (i / 8) as usize] >> (i % 8)) & 1 == 1;
        let (full, half) = (1i64 << w, 1i64 << (w - 1));
        let two_w = (0..w).fold(Scalar::ONE, |a, _| a.double());
        let (mut carry, mut weight, mut out) = (0i64, Scalar::ONE, Vec::new());
        for i in 0..257u32.div_ceil(w) {
            let v = (0..w).filter(|b| bit(i * w + b)).map(|b| 1i64 << b).sum::<i64>() + carry;
            let d = if v > half { v - full } else { v };
            carry = i64::from(v > half);
            let term = Scalar::from(d.unsigned_abs()) * weight;
            out.push(if d < 0 { -term } else { term });
            weight *= two_w;
        }
        assert_eq!(out.iter().fold(Scalar::ZERO, |a, t| a + t), *k, "recoding");
        out
    }

    #[test]
    fn crafted_keys_hit_doubling_and_cancellation_mid_accumulation() {
        // Verification adds u1's digit points (G's table), then u2's (Q's
        // table), onto one accumulator. With Q = k·G chosen, the
        // accumulator before key window j is (u1 + below·k)·G, below = the
        // sum of u2's terms under j; the point added there is t_j·k·G. So
        // u1 = (±t_j − below)·k makes them equal (doubling) or opposite
        // (cancellation to infinity, then the next addition restarts from
        // the table point). j = the first non-zero window meets u1·G
        // itself; later ones meet a partial sum of both tables.
        let mut rng = Stream(10);
        let mut counted = Vec::new();
        for case in 0..24 {
            let cancel = case % 2 == 1;
            let u2 = rng.scalar();
            let k = rng.scalar();
            let terms = digit_terms(&u2, KEY_WINDOW);
            let wanted = [0, 1, 9, 18, 27, terms.len() - 2][(case / 2) % 6];
            let Some(j) = (wanted..terms.len()).find(|&i| !bool::from(terms[i].is_zero())) else { continue };
            let below = terms[..j].iter().fold(Scalar::ZERO, |a, t| a + t);
            let target = if cancel { -terms[j] } else { terms[j] };
            let u1 = (target - below) * k;
            assert!(!bool::from(u1.is_zero()));
            let vk = VerifyingKey::from_affine(ProjectivePoint::mul_by_generator(&k).to_affine()).unwrap();
            let pk = PreparedKey::new(&vk).unwrap();

            // A valid signature with these u1, u2: R = (u1 + u2·k)·G,
            // r = x(R) mod n, s = r/u2, z = u1·s. (A cancellation at u2's
            // last non-zero window leaves R = ∞: then no r is valid.)
            let sum = u1 + u2 * k;
            let valid = !bool::from(sum.is_zero());
            let r = if valid {
                <Scalar as Reduce<U256>>::reduce_bytes(&ProjectivePoint::mul_by_generator(&sum).to_affine().x())
            } else {
                rng.scalar()
            };
            let s = r * u2.invert().unwrap();
            let sig = Signature::from_scalars(r, s).unwrap();
            let digest: FieldBytes = (u1 * s).to_repr();
            assert_eq!(vk.verify_prehash(&digest, &sig).is_ok(), valid, "case {case}: built valid");
            let (ok, (doublings, cancellations)) = exceptional_in(|| pk.verify_prehashed(&digest, &sig));
            assert_eq!(ok, valid, "case {case} (window {j}, cancel {cancel}): es256 differs from p256");
            counted.push((j, cancel, valid));
            if cancel {
                assert!(cancellations >= 1, "case {case}: no cancellation at window {j}");
            } else {
                assert!(doublings >= 1, "case {case}: no doubling at window {j}");
            }

            // The same collision over a message: u1 = z/s is then fixed, so
            // the key is u1/(±t_j − below) and r = u2·s. The accumulator
            // meets the point all the same; the signature is not valid.
            let msg = rng.bytes32();
            let z = <Scalar as Reduce<U256>>::reduce_bytes(&Sha256::digest(msg));
            let s = rng.scalar();
            let u1 = z * s.invert().unwrap();
            let key_scalar = u1 * (target - below).invert().unwrap();
            let vk = VerifyingKey::from_affine(ProjectivePoint::mul_by_generator(&key_scalar).to_affine()).unwrap();
            let pk = PreparedKey::new(&vk).unwrap();
            let sig = Signature::from_scalars(u2 * s, s).unwrap();
            let (ok, (doublings, cancellations)) = exceptional_in(|| pk.verify(&msg, &sig));
            assert_eq!(ok, reference(&vk, &msg, &sig), "case {case}");
            assert!(!ok);
            assert!(if cancel { cancellations >= 1 } else { doublings >= 1 }, "case {case}: message form missed window {j}");
        }

        // Windows 0 (u1·G itself), 1, 9, 18, 27 and 35 or 36, both ways.
        assert_eq!(counted.len(), 24);
        assert!(counted.iter().any(|&(j, c, _)| j > 9 && !c) && counted.iter().any(|&(j, c, _)| j > 9 && c));
        assert!(counted.iter().filter(|(_, _, valid)| *valid).count() >= 20, "{counted:?}");

        // Ordinary verifications never meet an exceptional case.
        let sk = SigningKey::from_bytes(&rng.scalar().to_repr()).unwrap();
        let pk = PreparedKey::new(sk.verifying_key()).unwrap();
        for i in 0..8u8 {
            let sig: Signature = sk.sign(&[i]);
            assert_eq!(exceptional_in(|| pk.verify(&[i], &sig)), (true, (0, 0)));
        }
    }

    #[test]
    fn table_memory() {
        let pk = PreparedKey::new(SigningKey::from_bytes(&Stream(5).scalar().to_repr()).unwrap().verifying_key()).unwrap();
        assert_eq!(std::mem::size_of::<Affine>(), 64);
        assert_eq!(pk.memory_bytes(), 37 * 64 * 64);
        assert_eq!(generator_table().unwrap().memory_bytes(), 33 * 128 * 64);
    }
}
