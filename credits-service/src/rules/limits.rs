//! Limits: each account's token bucket (rate limiting), taken on its own or
//! before a debit or hold.

use crate::db::{Dialect, Sql};
use crate::store::{validate_account_id, RateDecision, RateLimit, Result, StoreError};
use crate::vals;

/// Take one token from the account's bucket.
///
/// Exact integer arithmetic: one token is `scale = window_seconds * 1000`
/// units, the bucket holds up to `burst * scale` units and refills `requests`
/// units per millisecond (= requests / window_seconds tokens per second).
pub(super) async fn rate_take<S: Sql>(
    tx: &mut S,
    account: &str,
    rl: &RateLimit,
    now_ms: i64,
) -> Result<RateDecision> {
    rl.validate()?;
    let scale = rl.window_seconds.saturating_mul(1000);
    let capacity = i128::from(rl.burst) * i128::from(scale);
    let cap_i64 = i64::try_from(capacity).unwrap_or(i64::MAX);
    tx.exec(
        "INSERT INTO rate_buckets (account, units, scale, updated_ms) VALUES ($1, $2, $3, $4) \
         ON CONFLICT DO NOTHING",
        &vals![account, cap_i64, scale, now_ms],
    )
    .await?;
    let sql = match tx.dialect() {
        Dialect::Postgres => {
            "SELECT units, scale, updated_ms FROM rate_buckets WHERE account = $1 FOR UPDATE"
        }
        Dialect::Sqlite => "SELECT units, scale, updated_ms FROM rate_buckets WHERE account = $1",
    };
    let row = tx
        .row(sql, &vals![account])
        .await?
        .ok_or_else(|| StoreError::Corrupt("rate bucket vanished".into()))?;
    let (mut units, old_scale, updated_ms) = (
        i128::from(row.i64(0)?),
        i128::from(row.i64(1)?.max(1)),
        row.i64(2)?,
    );
    if old_scale != i128::from(scale) {
        // The limit changed: keep the same fraction of a token.
        units = units * i128::from(scale) / old_scale;
    }
    let elapsed = i128::from(now_ms.saturating_sub(updated_ms).max(0));
    units = (units + elapsed * i128::from(rl.requests)).min(capacity);
    let cost = i128::from(scale);
    let decision = if units >= cost {
        units -= cost;
        RateDecision::Allowed {
            remaining: i64::try_from(units / cost).unwrap_or(i64::MAX),
        }
    } else {
        let missing = cost - units;
        let rate = i128::from(rl.requests);
        let wait_ms = (missing + rate - 1) / rate;
        let secs = ((wait_ms + 999) / 1000).max(1);
        RateDecision::Limited {
            retry_after_seconds: i64::try_from(secs).unwrap_or(i64::MAX),
        }
    };
    tx.exec(
        "UPDATE rate_buckets SET units = $2, scale = $3, updated_ms = $4 WHERE account = $1",
        &vals![
            account,
            i64::try_from(units).unwrap_or(i64::MAX),
            scale,
            updated_ms.max(now_ms)
        ],
    )
    .await?;
    Ok(decision)
}

/// Take one request from the account's token bucket.
pub async fn rate_limit<S: Sql>(
    tx: &mut S,
    account: &str,
    rl: &RateLimit,
    now_ms: i64,
) -> Result<RateDecision> {
    validate_account_id(account)?;
    rl.validate()?;
    rate_take(tx, account, rl, now_ms).await
}

job!(
    /// [`rate_limit`].
    RateTake { account: String, limit: RateLimit, now_ms: i64 } -> RateDecision,
    |j, tx| rate_limit(tx, &j.account, &j.limit, j.now_ms).await
);
