//! The service's own metrics, in Prometheus text at `GET /metrics` on the
//! credits listener (`metrics` facade + `metrics-exporter-prometheus`).
//!
//! | metric | what |
//! |---|---|
//! | `dialtone_credits_requests_total{endpoint,status}` | requests by route template and status |
//! | `dialtone_credits_request_duration_seconds{endpoint}` | latency histogram |
//! | `dialtone_credits_requests_in_flight` | requests being handled now (this scrape included) |
//! | `dialtone_credits_open_holds` | open holds (counted at scrape) |
//! | `dialtone_credits_db_pool_connections{pool,state}` | pool connections `open` / `idle` / `in_use` / `max` |
//! | `dialtone_credits_db_up` | 1 if the scrape's database query answered |
//! | `dialtone_credits_sweeper_runs_total{result}` | sweeper runs (`ok` / `error`) |
//! | `dialtone_credits_holds_expired_total` | holds the sweeper released (and leases it closed) |
//! | `dialtone_credits_leases_total{result}` | lease requests (`granted` / `declined`) |
//! | `dialtone_credits_lease_spends_total{result}` | reported lease spends (`recorded` / `replayed` / `refused`) |
//! | `dialtone_credits_leases_expired_total` | leases the sweeper closed past their expiry |
//! | `dialtone_credits_group_commits_total{result}` | SQLite writer commits (`ok` / `error`) |
//! | `dialtone_credits_group_commit_batch_size` | write jobs per SQLite commit |
//! | `dialtone_credits_group_commit_duration_seconds` | one batch, `BEGIN` to `COMMIT` |
//! | `dialtone_credits_pg_retries_total` | PostgreSQL transactions re-run (serialization, deadlock) |
//! | `dialtone_credits_service_key_rejections_total` | `/v1/*` calls refused for a missing or wrong service key |
//! | `dialtone_credits_gate_key_rejections_total` | self-service requests refused for not coming through the gate (no or a wrong `x-dialtone-gate-key`) |
//!
//! One recorder per process (the first server started installs it); every
//! server in the process renders the same registry.

use crate::backend::PoolStats;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Duration;

pub const REQUESTS: &str = "dialtone_credits_requests_total";
pub const REQUEST_DURATION: &str = "dialtone_credits_request_duration_seconds";
pub const REQUESTS_IN_FLIGHT: &str = "dialtone_credits_requests_in_flight";
pub const OPEN_HOLDS: &str = "dialtone_credits_open_holds";
pub const POOL_CONNECTIONS: &str = "dialtone_credits_db_pool_connections";
pub const DB_UP: &str = "dialtone_credits_db_up";
pub const SWEEPER_RUNS: &str = "dialtone_credits_sweeper_runs_total";
pub const HOLDS_EXPIRED: &str = "dialtone_credits_holds_expired_total";
pub const LEASES: &str = "dialtone_credits_leases_total";
pub const LEASE_SPENDS: &str = "dialtone_credits_lease_spends_total";
pub const LEASES_EXPIRED: &str = "dialtone_credits_leases_expired_total";
pub const GROUP_COMMITS: &str = "dialtone_credits_group_commits_total";
pub const GROUP_COMMIT_BATCH: &str = "dialtone_credits_group_commit_batch_size";
pub const GROUP_COMMIT_DURATION: &str = "dialtone_credits_group_commit_duration_seconds";
pub const PG_RETRIES: &str = "dialtone_credits_pg_retries_total";
pub const SERVICE_KEY_REJECTIONS: &str = "dialtone_credits_service_key_rejections_total";
pub const GATE_KEY_REJECTIONS: &str = "dialtone_credits_gate_key_rejections_total";

const LATENCY_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

fn build() -> Option<PrometheusHandle> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), LATENCY_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(GROUP_COMMIT_DURATION.into()), LATENCY_BUCKETS)
        })
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(GROUP_COMMIT_BATCH.into()), BATCH_BUCKETS)
        });
    let recorder = match builder {
        Ok(b) => b.build_recorder(),
        Err(e) => {
            tracing::error!(error = %e, "metrics disabled: bad histogram buckets");
            return None;
        }
    };
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::warn!("another metrics recorder is installed; /metrics shows nothing");
        return None;
    }
    metrics::describe_counter!(REQUESTS, "Requests by route template and status.");
    metrics::describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Request latency by route template."
    );
    metrics::describe_gauge!(REQUESTS_IN_FLIGHT, "Requests being handled now.");
    metrics::describe_gauge!(OPEN_HOLDS, "Open holds (counted when scraped).");
    metrics::describe_gauge!(POOL_CONNECTIONS, "Database pool connections by state.");
    metrics::describe_gauge!(DB_UP, "1 if the database answered the scrape's query.");
    metrics::describe_counter!(SWEEPER_RUNS, "Runs of the expired-hold sweeper.");
    metrics::describe_counter!(HOLDS_EXPIRED, "Holds released by the sweeper.");
    metrics::describe_counter!(
        GROUP_COMMITS,
        "Group commits (the SQLite writer, or a PostgreSQL account writer)."
    );
    metrics::describe_histogram!(GROUP_COMMIT_BATCH, "Write jobs per group commit.");
    metrics::describe_histogram!(
        GROUP_COMMIT_DURATION,
        metrics::Unit::Seconds,
        "One group commit, BEGIN to COMMIT."
    );
    metrics::describe_counter!(
        PG_RETRIES,
        "PostgreSQL transactions re-run after a serialization failure or deadlock."
    );
    metrics::describe_counter!(
        SERVICE_KEY_REJECTIONS,
        "Calls refused for a missing or wrong service key."
    );
    metrics::describe_counter!(
        GATE_KEY_REJECTIONS,
        "Self-service requests refused for not coming through the gate."
    );
    Some(handle)
}

/// Install the process's recorder (once); later calls are no-ops.
pub fn install() {
    let _ = HANDLE.get_or_init(build);
}

/// A request is being handled until the returned guard is dropped.
pub fn in_flight() -> InFlight {
    metrics::gauge!(REQUESTS_IN_FLIGHT).increment(1.0);
    InFlight(())
}

/// Counts one request in flight while alive.
pub struct InFlight(());

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(REQUESTS_IN_FLIGHT).decrement(1.0);
    }
}

/// One answered request.
pub fn request(endpoint: &str, status: u16, elapsed: Duration) {
    metrics::counter!(REQUESTS, "endpoint" => endpoint.to_string(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!(REQUEST_DURATION, "endpoint" => endpoint.to_string())
        .record(elapsed.as_secs_f64());
}

/// One group commit of `size` jobs (SQLite or PostgreSQL).
pub fn group_commit(size: usize, elapsed: Duration, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    metrics::counter!(GROUP_COMMITS, "result" => result).increment(1);
    metrics::histogram!(GROUP_COMMIT_BATCH).record(size as f64);
    metrics::histogram!(GROUP_COMMIT_DURATION).record(elapsed.as_secs_f64());
}

/// One PostgreSQL transaction re-run.
pub fn pg_retry() {
    metrics::counter!(PG_RETRIES).increment(1);
}

/// One sweeper run.
pub fn sweeper_run(released: Option<usize>) {
    let result = if released.is_some() { "ok" } else { "error" };
    metrics::counter!(SWEEPER_RUNS, "result" => result).increment(1);
    if let Some(n) = released {
        metrics::counter!(HOLDS_EXPIRED).increment(u64::try_from(n).unwrap_or(u64::MAX));
    }
}

/// One lease request answered.
pub fn lease_requested(granted: bool) {
    let result = if granted { "granted" } else { "declined" };
    metrics::counter!(LEASES, "result" => result).increment(1);
}

/// One lease report's spends.
pub fn lease_spends(recorded: usize, replayed: usize, refused: usize) {
    for (result, n) in [("recorded", recorded), ("replayed", replayed), ("refused", refused)] {
        if n > 0 {
            metrics::counter!(LEASE_SPENDS, "result" => result).increment(u64::try_from(n).unwrap_or(u64::MAX));
        }
    }
}

/// Leases the sweeper closed.
pub fn leases_expired(n: usize) {
    if n > 0 {
        metrics::counter!(LEASES_EXPIRED).increment(u64::try_from(n).unwrap_or(u64::MAX));
    }
}

/// One call refused for its service key.
pub fn service_key_rejected() {
    metrics::counter!(SERVICE_KEY_REJECTIONS).increment(1);
}

pub fn gate_key_rejected() {
    metrics::counter!(GATE_KEY_REJECTIONS).increment(1);
}

/// Set the scrape-time gauges and render everything.
pub fn render(pool: PoolStats, open_holds: Option<i64>) -> String {
    let gauge = |state: &'static str, v: f64| {
        metrics::gauge!(POOL_CONNECTIONS, "pool" => pool.name, "state" => state).set(v);
    };
    let idle = pool.idle as f64;
    gauge("open", f64::from(pool.open));
    gauge("idle", idle);
    gauge("in_use", (f64::from(pool.open) - idle).max(0.0));
    gauge("max", f64::from(pool.max));
    metrics::gauge!(DB_UP).set(if open_holds.is_some() { 1.0 } else { 0.0 });
    if let Some(n) = open_holds {
        metrics::gauge!(OPEN_HOLDS).set(n as f64);
    }
    match HANDLE.get().and_then(Option::as_ref) {
        Some(h) => {
            h.run_upkeep();
            h.render()
        }
        None => String::new(),
    }
}

/// Drain histogram buckets now and then (called by the sweeper).
pub fn upkeep() {
    if let Some(h) = HANDLE.get().and_then(Option::as_ref) {
        h.run_upkeep();
    }
}
