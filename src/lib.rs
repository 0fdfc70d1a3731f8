//! dialtone: a credits-and-scopes gate for HTTP APIs, as a proxy-wasm filter.
//!
//! Everything except [`filter`] is plain Rust that never touches proxy-wasm,
//! so it unit-tests natively with `cargo test`. `filter` is the thin glue
//! that turns Envoy's host events into calls to [`decision`] and carries out
//! what it returns.

// The filter must never panic (a panic kills the VM for every later request):
// besides the workspace's unwrap/expect/panic denials, no unchecked indexing.
#![cfg_attr(not(test), deny(clippy::indexing_slicing))]

pub mod bearer;
pub mod cache;
pub mod credits_api;
pub mod decision;
pub mod denial;
pub mod es256;
pub mod identity;
pub mod jwks;
pub mod lease;
pub mod metrics;
pub mod policy;
pub mod privy_jwt;
pub mod x402;

#[cfg(target_arch = "wasm32")]
mod filter;

/// This build: the crate version and a digest of its sources (`build.rs`).
/// Shared verified-token slots are bound to it.
pub const BUILD_ID: &str = env!("DIALTONE_BUILD_ID");
