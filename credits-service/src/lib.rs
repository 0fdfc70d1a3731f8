//! dialtone-credits: the reference key/credits service the dialtone filter
//! calls, a demo upstream API to protect, and an operator CLI.
//!
//! - [`keys`]: credential formats, hashing and generation
//! - [`store`]: the money rules' vocabulary and the synchronous operator API
//! - [`rules`]: the money rules, written once over [`db::Sql`]
//! - [`db`]: the SQL layer shared by SQLite and PostgreSQL
//! - [`sqlite`], [`pg`], [`backend`]: the service's async backends (SQLite
//!   readers and group-commit writer; PostgreSQL pool) behind one [`backend::Db`]
//! - [`api`]: the credits HTTP API used by the filter
//! - [`auth`]: service keys (the filter's callouts) and the admin key
//! - [`demo_upstream`]: the demo paid API behind the filter
//! - [`self_service`]: the end user's balance, ledger, keys and tokens, and the `/dashboard` page, behind the gate
//! - [`dev_sign_in`]: the local stack's dev sign-in (a dev-minted `privy-token` cookie)
//! - [`http`]: serving axum routers on hyper: timeouts, limits, graceful shutdown
//! - [`metrics`]: the service's Prometheus metrics
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
pub mod auth;
pub mod backend;
pub mod cli;
pub mod db;
pub mod demo_upstream;
pub mod dev_sign_in;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod pg;
pub mod rules;
pub mod self_service;
pub mod sqlite;
pub mod store;
