//! Micro-benchmark of ES256 verification: p256's `VerifyingKey::verify` (what
//! `es256_verify` did before the tables) against the precomputed-table path.
//!
//! Native: `cargo run --release --example es256_bench [iterations]`
//! V8 (what Envoy runs the filter on), with the shipped profile's codegen:
//!   cargo build --profile wasm-release --target wasm32-wasip1 --example es256_bench
//!   node --experimental-wasi-unstable-preview1 examples/es256_bench.mjs \
//!        target/wasm32-wasip1/wasm-release/examples/es256_bench.wasm 100
//! Each figure is the best of 5 rounds; on a busy machine, run it twice.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::hint::black_box;
use std::time::Instant;

use dialtone::es256::{generator_table, invert_mod_n_vartime, Affine, FixedBaseTable, Jacobian, PreparedKey};
use dialtone::privy_jwt::EsKey;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey};
use p256::elliptic_curve::ops::{Invert, Reduce};
use p256::elliptic_curve::group::Group;
use p256::{ProjectivePoint, Scalar, U256};
use sha2::{Digest, Sha256};

/// Microseconds per call of `f`, best of 5 rounds of `n` calls.
fn time(n: u32, mut f: impl FnMut() -> bool) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let mut ok = true;
        for _ in 0..n {
            ok &= black_box(f());
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
        assert!(ok, "a verification failed");
        best = best.min(us);
    }
    best
}

fn main() {
    let n: u32 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200);
    let sk = SigningKey::from_slice(&Sha256::digest(b"es256 bench key")).unwrap();
    let vk = *sk.verifying_key();
    // About the size of a Privy access token's signing input.
    let input: Vec<u8> = b"eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImFiYyJ9."
        .iter()
        .chain(std::iter::repeat(b"eyJzaWQiOiJjbTAxMjM0NTY3ODkiLCJpc3MiOiJwcml2eS5pbyJ9").flatten().take(360))
        .copied()
        .collect();
    let sig: Signature = sk.sign(&input);
    let high_s = {
        let (r, s) = sig.split_scalars();
        Signature::from_scalars(*r, -*s).unwrap()
    };

    let t = Instant::now();
    let g = generator_table().unwrap();
    let g_build = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let key = EsKey::new(None, vk);
    let k_build = t.elapsed().as_secs_f64() * 1e3;
    let prepared = PreparedKey::new(&vk).unwrap();

    let before = time(n, || vk.verify(&input, &sig).is_ok());
    let after = time(n * 4, || key.verify(&input, &sig));
    let after_high_s = time(n * 4, || key.verify(&input, &high_s));
    let hash = time(n * 4, || Sha256::digest(&input)[0] != 1);
    let digest = Sha256::digest(&input);
    let after_core = time(n * 4, || prepared.verify_prehashed(&digest, &sig));
    println!("signing input {} bytes, {n} iterations", input.len());
    println!("p256 VerifyingKey::verify      {before:9.2} us");
    println!("EsKey::verify (tables)         {after:9.2} us   speed-up {:.2}x", before / after);
    println!("EsKey::verify, high-S twin     {after_high_s:9.2} us");
    println!("  of which SHA-256             {hash:9.2} us");
    println!("  prehashed core               {after_core:9.2} us");
    println!("generator table: built in {g_build:.2} ms, {} bytes", g.memory_bytes());
    println!("key table:       built in {k_build:.2} ms, {} bytes", prepared.memory_bytes());

    // Parts: scalar inversion, one table multiplication per window, the x test.
    let (_, s) = sig.split_scalars();
    let s: Scalar = *s;
    let inv = time(n * 4, || invert_mod_n_vartime(&black_box(s)).is_some());
    let inv_p256 = time(n * 4, || bool::from(Invert::invert_vartime(&black_box(s)).is_some()));
    let inv_ct = time(n * 4, || bool::from(black_box(s).invert().is_some()));
    println!("s^-1: binary Euclid (u64 limbs) {inv:8.2} us (p256 invert_vartime {inv_p256:.2} us, constant-time {inv_ct:.2} us)");
    let p = ProjectivePoint::GENERATOR * Scalar::from(7u64);
    let aff = time(n * 4, || black_box(p).to_affine() != p256::AffinePoint::IDENTITY);
    println!("field inversion (to_affine)    {aff:9.2} us (what the Jacobian x test avoids)");
    let pa = Affine::from_p256(&p.to_affine()).unwrap();
    let mut acc = Jacobian::IDENTITY.add_affine(&pa).add_affine(&pa);
    let mixed = time(n * 40, || {
        acc = acc.add_affine(&pa);
        true
    });
    let pp = p.to_affine();
    let mut pacc = ProjectivePoint::GENERATOR;
    let p256_mixed = time(n * 40, || {
        pacc += &pp;
        true
    });
    println!("Jacobian+affine add {mixed:.3} us, p256 projective+affine add {p256_mixed:.3} us ({} {})", acc.is_identity(), bool::from(pacc.is_identity()));
    let k = <Scalar as Reduce<U256>>::reduce_bytes(&Sha256::digest(b"some scalar"));
    for w in 4..=9 {
        let t = Instant::now();
        let table = FixedBaseTable::new(&pa, w).unwrap();
        let build = t.elapsed().as_secs_f64() * 1e3;
        let us = time(n * 4, || table.mul_add(Jacobian::IDENTITY, &k).is_some());
        println!("w={w}: one fixed-base mul {us:7.2} us, table {:7} bytes, built in {build:7.2} ms", table.memory_bytes());
    }
}
