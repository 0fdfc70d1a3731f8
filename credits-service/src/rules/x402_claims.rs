//! x402 payment claims: one request per payment, whatever Envoy or worker
//! it came through.

use crate::db::{Dialect, Sql};
use crate::store::{validate_idempotency_key, validate_optional_text, Result, StoreError};
use crate::vals;

/// What became of an x402 payment claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// This owner holds the payment (`replayed`: it already did — a retry).
    Claimed { replayed: bool },
    /// Another request holds it until its claim lapses or is released.
    InUse,
}

fn validate_claim(claim: &str) -> Result<()> {
    if claim.len() != 64
        || !claim
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(StoreError::Invalid(
            "a claim is 64 lowercase hex characters".into(),
        ));
    }
    Ok(())
}

/// Claims x402 payment `claim` for `owner` (a request's idempotency key) for
/// `ttl_seconds`: one request per payment, whatever Envoy or worker it came
/// through. A lapsed claim is taken over.
pub async fn claim_payment<S: Sql>(
    tx: &mut S,
    claim: &str,
    owner: &str,
    route: &str,
    ttl_seconds: i64,
    now: i64,
) -> Result<ClaimOutcome> {
    validate_claim(claim)?;
    validate_idempotency_key("owner", owner)?;
    validate_optional_text("route", Some(route))?;
    if !(1..=3600).contains(&ttl_seconds) {
        return Err(StoreError::Invalid(
            "ttl_seconds must be between 1 and 3600".into(),
        ));
    }
    let lock = match tx.dialect() {
        Dialect::Postgres => " FOR UPDATE",
        Dialect::Sqlite => "",
    };
    let held = tx
        .row(
            &format!("SELECT owner, expires_at FROM x402_claims WHERE claim = $1{lock}"),
            &vals![claim],
        )
        .await?;
    if let Some(row) = held {
        if row.i64(1)? > now {
            return Ok(if row.text(0)? == owner {
                ClaimOutcome::Claimed { replayed: true }
            } else {
                ClaimOutcome::InUse
            });
        }
        tx.exec("DELETE FROM x402_claims WHERE claim = $1", &vals![claim])
            .await?;
    }
    // Two first claims racing on PostgreSQL: the loser's INSERT hits the
    // primary key (23505) and its transaction is run again, seeing the winner.
    tx.exec(
        "INSERT INTO x402_claims (claim, owner, route, expires_at, created_at) VALUES ($1, $2, $3, $4, $5)",
        &vals![claim, owner, route, now.saturating_add(ttl_seconds), now],
    )
    .await?;
    Ok(ClaimOutcome::Claimed { replayed: false })
}

job!(
    /// [`claim_payment`].
    ClaimPayment { claim: String, owner: String, route: String, ttl_seconds: i64, now: i64 } -> ClaimOutcome,
    |j, tx| claim_payment(tx, &j.claim, &j.owner, &j.route, j.ttl_seconds, j.now).await
);

/// Gives a claim back (the upstream failed, nothing was settled). Returns
/// whether there was one. Lapsed claims go with it.
pub async fn release_claim<S: Sql>(tx: &mut S, claim: &str, now: i64) -> Result<bool> {
    validate_claim(claim)?;
    let n = tx
        .exec("DELETE FROM x402_claims WHERE claim = $1", &vals![claim])
        .await?;
    tx.exec(
        "DELETE FROM x402_claims WHERE expires_at <= $1",
        &vals![now],
    )
    .await?;
    Ok(n > 0)
}

job!(
    /// [`release_claim`].
    ReleaseClaim { claim: String, now: i64 } -> bool,
    |j, tx| release_claim(tx, &j.claim, j.now).await
);
