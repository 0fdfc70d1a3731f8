//! dialtone-credits: the reference key/credits service the dialtone filter
//! calls, a demo upstream API to protect, and an operator CLI.
//!
//! - [`keys`]: credential formats, hashing and generation
//! - [`store`]: storage, migrations and the money rules (ledger, holds,
//!   rate limits, refunds, `check`)
//! - [`db`], [`pg`]: the SQL layer shared by SQLite and PostgreSQL
//! - [`api`]: the credits HTTP API used by the filter
//! - [`demo_upstream`]: the demo paid API behind the filter
//! - [`http`]: shared tiny_http plumbing (worker pool, JSON replies)
//! - [`cli`]: the `dialtone-credits` command line
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod api;
pub mod cli;
pub mod db;
pub mod demo_upstream;
pub mod http;
pub mod keys;
pub mod pg;
pub mod store;
