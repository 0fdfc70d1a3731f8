//! `dialtone::es256` against p256: `PreparedKey::verify` (and
//! `verify_prehashed`) and `privy_jwt::es256_verify` must give
//! `p256::ecdsa::VerifyingKey`'s verdict (`signature::Verifier`,
//! `PrehashVerifier`) on every signature, and `privy_jwt::es256_signature`
//! must take exactly the `r‖s` with `0 < r, s < n` (checked here on the bytes).
//!
//! Input, read as a stream of choices (`dialtone_fuzz::Choices`, zeros past
//! the end): a mode byte, the mode's bytes, a message (a length byte, then
//! that many bytes), a mutation count, the mutations. Mode byte bits 0-1:
//! the mode; bit 2: ask `es256_verify` about the input's own key too (it
//! always is about the fixed keys; a new key costs it a table build).
//!
//! - mode 0: one of four fixed keys; a valid RFC 6979 signature of the message.
//! - mode 1: a key whose scalar is 32 bytes of the input; the same.
//! - mode 2: a point `R` with `x(R) ≥ n` (`x` just above `n`, or just below
//!   `p`: `r = x − n`, up to `p − n − 1`), and the key made to fit:
//!   `Q = u2⁻¹·(R − u1·G)`, so `(r, s)` is valid and verifies only through
//!   the `x(R) == r + n` test.
//! - mode 3: a key `Q = k·G` made so that the table accumulator meets the
//!   point being added at key window `j`: equal (the doubling branch of the
//!   mixed addition) or opposite (the accumulator cancels to infinity mid-sum).
//!   Either a valid signature over a chosen digest (checked with the
//!   prehash verifiers), or over the message with `r = u2·s` (the same
//!   collision, a signature both must refuse).
//!
//! Every valid signature is checked with its high-S twin `(r, n − s)`
//! (valid ES256, accepted by both), then each mutation: `r` or `s` set to a
//! boundary (0, 1, n−1, n, n+1, p−n−1, p−n, p−n+1, p−1, p, 2²⁵⁶−1, and
//! itself + n), a flipped bit, a small ± delta, 32 input bytes, `r`/`s`
//! swapped, the message changed, another key.
#![no_main]

use std::sync::OnceLock;

use dialtone::es256::{PreparedKey, KEY_WINDOW};
use dialtone::privy_jwt::{es256_signature, es256_verify};
use dialtone_fuzz::Choices;
use libfuzzer_sys::fuzz_target;
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::elliptic_curve::ops::{MulByGenerator, Reduce};
use p256::elliptic_curve::point::{AffineCoordinates, DecompressPoint};
use p256::elliptic_curve::subtle::Choice;
use p256::elliptic_curve::{Field, PrimeField};
use p256::{AffinePoint, FieldBytes, ProjectivePoint, Scalar, U256};
use sha2::{Digest, Sha256};

type Be = [u8; 32];

/// The group order n and the field prime p, big-endian.
const N: Be = hex32("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551");
const P: Be = hex32("ffffffff00000001000000000000000000000000ffffffffffffffffffffffff");

const fn hex32(s: &str) -> Be {
    let b = s.as_bytes();
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = (nibble(b[2 * i]) << 4) | nibble(b[2 * i + 1]);
        i += 1;
    }
    out
}

const fn nibble(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        _ => c - b'a' + 10,
    }
}

/// `a + b`, None past 2²⁵⁶.
fn add(a: &Be, b: &Be) -> Option<Be> {
    let mut out = [0u8; 32];
    let mut carry = 0u16;
    for i in (0..32).rev() {
        let v = u16::from(a[i]) + u16::from(b[i]) + carry;
        out[i] = v as u8;
        carry = v >> 8;
    }
    (carry == 0).then_some(out)
}

/// `a − b` mod 2²⁵⁶.
fn sub(a: &Be, b: &Be) -> Be {
    let mut out = [0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let v = i16::from(a[i]) - i16::from(b[i]) - borrow;
        out[i] = v.rem_euclid(256) as u8;
        borrow = i16::from(v < 0);
    }
    out
}

fn small(v: u64) -> Be {
    let mut out = [0u8; 32];
    out[24..].copy_from_slice(&v.to_be_bytes());
    out
}

/// `0 < v < n`, on the bytes (big-endian compares as arrays do).
fn in_range(v: &Be) -> bool {
    *v != [0; 32] && *v < N
}

/// The boundaries a mutation sets `r` or `s` to (the last: the value + n).
fn boundary(i: usize, current: &Be) -> Option<Be> {
    let one = small(1);
    let p_minus_n = sub(&P, &N);
    Some(match i {
        0 => [0; 32],
        1 => one,
        2 => sub(&N, &one),
        3 => N,
        4 => add(&N, &one)?,
        5 => sub(&p_minus_n, &one),
        6 => p_minus_n,
        7 => add(&p_minus_n, &one)?,
        8 => sub(&P, &one),
        9 => P,
        10 => [0xff; 32],
        _ => add(current, &N)?,
    })
}
const BOUNDARIES: usize = 12;

fn scalar(bytes: &Be) -> Scalar {
    <Scalar as Reduce<U256>>::reduce_bytes(&FieldBytes::from(*bytes))
}

fn nonzero(s: Scalar) -> Scalar {
    if bool::from(s.is_zero()) {
        Scalar::ONE
    } else {
        s
    }
}

fn to_be(s: &Scalar) -> Be {
    s.to_bytes().into()
}

/// The four fixed keys of mode 0, each with its table (built once).
fn fixed_keys() -> &'static [(SigningKey, PreparedKey)] {
    static K: OnceLock<Vec<(SigningKey, PreparedKey)>> = OnceLock::new();
    K.get_or_init(|| {
        (0u8..4)
            .map(|i| {
                let sk = SigningKey::from_bytes(&Sha256::digest([b'k', i])).expect("a hash is a valid scalar");
                let pk = PreparedKey::new(sk.verifying_key()).expect("table");
                (sk, pk)
            })
            .collect()
    })
}

/// What is signed: a message, or (modes 2 and 3) a digest.
#[derive(Clone, Copy)]
enum Signed<'a> {
    Message(&'a [u8]),
    Digest(FieldBytes),
}

/// A key under test: p256's and dialtone's forms of it; `privy`: also ask
/// `privy_jwt::es256_verify` (which keeps the last key's table: a new key
/// costs it a table build, so it is asked about the fixed keys always and
/// about an input's own key when the input says so).
struct Key<'a> {
    vk: VerifyingKey,
    prepared: &'a PreparedKey,
    privy: bool,
}

/// Both verdicts on `r‖s`; `valid`: what p256 must say (for signatures
/// built to be valid).
fn check(key: &Key, signed: Signed, r: &Be, s: &Be, valid: Option<bool>) {
    let mut raw = [0u8; 64];
    raw[..32].copy_from_slice(r);
    raw[32..].copy_from_slice(s);
    let in_range = in_range(r) && in_range(s);
    let parsed = Signature::from_slice(&raw).ok();
    assert_eq!(parsed.is_some(), in_range, "p256 parses r‖s = {raw:02x?}");
    assert_eq!(es256_signature(&raw).is_some(), in_range, "es256_signature on r‖s = {raw:02x?}");
    let Some(sig) = parsed else {
        assert_ne!(valid, Some(true), "a signature built valid is out of range: {raw:02x?}");
        return;
    };
    let (want, got) = match signed {
        Signed::Message(m) => {
            let want = key.vk.verify(m, &sig).is_ok();
            if key.privy {
                assert_eq!(es256_verify(&key.vk, m, &sig), want, "privy_jwt::es256_verify vs p256: msg {m:02x?} sig {raw:02x?}");
            }
            (want, key.prepared.verify(m, &sig))
        }
        Signed::Digest(d) => (key.vk.verify_prehash(&d, &sig).is_ok(), key.prepared.verify_prehashed(&d, &sig)),
    };
    assert_eq!(got, want, "es256 vs p256: key {:?} sig {raw:02x?}", key.vk.to_encoded_point(true));
    if let Some(v) = valid {
        assert_eq!(want, v, "p256 on a signature built to be {}: {raw:02x?}", if v { "valid" } else { "invalid" });
    }
}

/// The signed digits of `k` as `FixedBaseTable::mul_add` takes them (window
/// `w`, digits in `[−2^(w−1), 2^(w−1)]`, ⌈257/w⌉ of them), as scalars
/// `d_i·2^(w·i)`.
fn signed_digits(k: &Scalar, w: u32) -> Vec<Scalar> {
    let bytes = to_be(k);
    let bit = |i: u32| i < 256 && (bytes[31 - (i / 8) as usize] >> (i % 8)) & 1 == 1;
    let windows = 257u32.div_ceil(w);
    let (full, half) = (1i64 << w, 1i64 << (w - 1));
    let mut carry = 0i64;
    let mut out = Vec::new();
    let mut weight = Scalar::ONE;
    let two_w = (0..w).fold(Scalar::ONE, |a, _| a.double());
    for i in 0..windows {
        let v = (0..w).filter(|b| bit(i * w + b)).map(|b| 1i64 << b).sum::<i64>() + carry;
        let d = if v > half {
            carry = 1;
            v - full
        } else {
            carry = 0;
            v
        };
        let magnitude = Scalar::from(d.unsigned_abs());
        out.push(if d < 0 { -(magnitude * weight) } else { magnitude * weight });
        weight *= two_w;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let mut c = Choices::new(data);
    let mode_byte = c.byte();
    let mode = mode_byte % 4;
    let message = |c: &mut Choices| -> Vec<u8> {
        let len = usize::from(c.byte());
        (0..len).map(|_| c.byte()).collect()
    };
    let msg: Vec<u8>;
    // The table of a key built for this input (modes 1-3).
    let owned: PreparedKey;
    let (vk, prepared, digest, r, s, valid): (VerifyingKey, &PreparedKey, Option<FieldBytes>, Be, Be, Option<bool>) = match mode {
        0 | 1 => {
            let fresh;
            let (sk, pk) = if mode == 0 {
                let (sk, pk) = &fixed_keys()[c.below(4)];
                (sk, pk)
            } else {
                let d = nonzero(scalar(&c.bytes()));
                fresh = SigningKey::from_bytes(&d.to_repr()).expect("a non-zero scalar is a key");
                owned = PreparedKey::new(fresh.verifying_key()).expect("table");
                (&fresh, &owned)
            };
            msg = message(&mut c);
            let sig: Signature = sk.sign(&msg);
            let (r, s) = sig.split_scalars();
            (*sk.verifying_key(), pk, None, to_be(&r), to_be(&s), Some(true))
        }
        2 => {
            // x(R) in (n, p): from just above n, or from just below p.
            let near_p = c.bool();
            let t = c.u64();
            let odd = Choice::from(u8::from(c.bool()));
            let s = nonzero(scalar(&c.bytes()));
            msg = message(&mut c);
            let z = scalar(&Sha256::digest(&msg).into());
            let mut found = None;
            for k in 0..256u64 {
                let offset = small(t.saturating_add(k).saturating_add(1));
                let x = if near_p { sub(&P, &offset) } else { add(&N, &offset).unwrap_or(N) };
                if x <= N || x >= P {
                    continue;
                }
                if let Some(point) = Option::<AffinePoint>::from(AffinePoint::decompress(&FieldBytes::from(x), odd)) {
                    found = Some((x, point));
                    break;
                }
            }
            let Some((x, point)) = found else { return };
            let r = scalar(&sub(&x, &N));
            let s_inv = s.invert().unwrap_or(Scalar::ONE);
            let (u1, u2) = (z * s_inv, r * s_inv);
            let q = (ProjectivePoint::from(point) - ProjectivePoint::mul_by_generator(&u1)) * u2.invert().unwrap_or(Scalar::ONE);
            let Ok(vk) = VerifyingKey::from_affine(q.to_affine()) else { return };
            owned = PreparedKey::new(&vk).expect("table");
            (vk, &owned, None, to_be(&r), to_be(&s), Some(true))
        }
        _ => {
            // The key window j where the accumulator u1·G + (u2's digits
            // below j)·Q meets ±(u2's digit j)·Q.
            let j = c.below(37);
            let cancel = c.bool();
            let u2 = nonzero(scalar(&c.bytes()));
            let k = nonzero(scalar(&c.bytes()));
            let over_digest = c.bool();
            let s_msg = nonzero(scalar(&c.bytes()));
            msg = message(&mut c);
            let digits = signed_digits(&u2, KEY_WINDOW);
            assert_eq!(digits.iter().fold(Scalar::ZERO, |a, d| a + d), u2, "the recoding here is wrong");
            // The first non-zero digit at or above j.
            let Some(j) = (j..digits.len()).find(|&i| !bool::from(digits[i].is_zero())) else { return };
            let below = digits[..j].iter().fold(Scalar::ZERO, |a, d| a + d);
            let target = if cancel { -digits[j] } else { digits[j] };
            // u1 + below·k ≡ target·k, so u1 = cfac·k.
            let cfac = target - below;
            if bool::from(cfac.is_zero()) {
                return;
            }
            if over_digest {
                // Valid: Q = k·G, u1 = cfac·k, R = (u1 + u2·k)·G, s = r/u2, z = u1·s.
                let u1 = cfac * k;
                let big_r = ProjectivePoint::mul_by_generator(&(u1 + u2 * k)).to_affine();
                let r = scalar(&big_r.x().into());
                if bool::from(r.is_zero()) {
                    return;
                }
                let s = r * u2.invert().unwrap_or(Scalar::ONE);
                let digest = (u1 * s).to_repr();
                let Ok(vk) = VerifyingKey::from_affine(ProjectivePoint::mul_by_generator(&k).to_affine()) else { return };
                owned = PreparedKey::new(&vk).expect("table");
                (vk, &owned, Some(digest), to_be(&r), to_be(&s), Some(true))
            } else {
                // Over the message: u1 = z/s is fixed, so the key is
                // u1/cfac, and r = u2·s; R is whatever it is (invalid).
                let z = scalar(&Sha256::digest(&msg).into());
                let u1 = z * s_msg.invert().unwrap_or(Scalar::ONE);
                let key_scalar = u1 * cfac.invert().unwrap_or(Scalar::ONE);
                if bool::from(key_scalar.is_zero()) {
                    return;
                }
                let r = u2 * s_msg;
                let Ok(vk) = VerifyingKey::from_affine(ProjectivePoint::mul_by_generator(&key_scalar).to_affine()) else { return };
                owned = PreparedKey::new(&vk).expect("table");
                (vk, &owned, None, to_be(&r), to_be(&s_msg), None)
            }
        }
    };
    let key = Key { vk, prepared, privy: mode == 0 || mode_byte & 4 != 0 };
    let signed = match digest {
        Some(d) => Signed::Digest(d),
        None => Signed::Message(&msg),
    };

    check(&key, signed, &r, &s, valid);
    // The high-S twin: as valid as the original.
    let s_twin = if in_range(&s) { sub(&N, &s) } else { s };
    check(&key, signed, &r, &s_twin, valid);

    for _ in 0..c.below(8) {
        let (mut r2, mut s2) = (r, s);
        let mut signed2 = signed;
        let mut other = None;
        let changed: Vec<u8>;
        match c.byte() % 8 {
            0 => {
                let slot = c.bool();
                let which = c.below(BOUNDARIES);
                let v = if slot { &mut s2 } else { &mut r2 };
                if let Some(b) = boundary(which, v) {
                    *v = b;
                }
            }
            1 => {
                let bit = c.below(512);
                let v = if bit < 256 { &mut r2 } else { &mut s2 };
                v[(bit % 256) / 8] ^= 1 << (bit % 8);
            }
            2 | 3 => {
                let delta = small(u64::from(c.byte()) + 1);
                let up = c.bool();
                let v = if c.bool() { &mut s2 } else { &mut r2 };
                *v = if up { add(v, &delta).unwrap_or(*v) } else { sub(v, &delta) };
            }
            4 => {
                let bytes = c.bytes();
                if c.bool() {
                    s2 = bytes;
                } else {
                    r2 = bytes;
                }
            }
            5 => std::mem::swap(&mut r2, &mut s2),
            6 => match signed {
                Signed::Message(m) => {
                    let mut m = m.to_vec();
                    match c.byte() % 3 {
                        0 => m.push(c.byte()),
                        1 if !m.is_empty() => {
                            m.pop();
                        }
                        _ => {
                            let i = c.below(m.len().max(1));
                            let bit = c.byte() % 8;
                            if let Some(b) = m.get_mut(i) {
                                *b ^= 1 << bit;
                            }
                        }
                    }
                    changed = m;
                    signed2 = Signed::Message(&changed);
                }
                Signed::Digest(mut d) => {
                    let i = c.below(32);
                    d[i] ^= 1 << (c.byte() % 8);
                    signed2 = Signed::Digest(d);
                }
            },
            _ => other = Some(c.below(4)),
        }
        match other {
            Some(i) => {
                let (sk, pk) = &fixed_keys()[i];
                check(&Key { vk: *sk.verifying_key(), prepared: pk, privy: true }, signed2, &r2, &s2, None);
            }
            None => check(&key, signed2, &r2, &s2, None),
        }
    }
});
