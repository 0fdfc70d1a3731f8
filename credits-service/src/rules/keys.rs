//! Keys: minting, looking up, touching, listing and revoking API keys and
//! tokens (only their SHA-256 and prefix are stored).

use super::accounts::account_view;
use super::{ensure_account, lock_account};
use crate::db::{Dialect, Sql};
use crate::keys::{self, Expiry, KeyKind, MAX_ACTIVE_API_TOKENS};
use crate::store::{
    decode_kind, encode_scopes, key_from_row, validate_account_id, validate_optional_text,
    CreatedKey, KeyLookup, KeyRecord, NewKey, Result, RevokedKey, StoreError, KEY_COLUMNS,
};
use crate::vals;

/// Prefix collisions are astronomically rare; retrying a few times is plenty.
const PREFIX_ATTEMPTS: usize = 8;

/// SQL condition selecting active keys (alias `k`), `now` bound as `${n}`.
fn active_sql(n: usize) -> String {
    format!("k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > ${n})")
}

/// Mint a credential using `generate` for the secret. Creates the account if
/// missing. Only the SHA-256 and the prefix are stored.
pub async fn create_key<S: Sql, G: FnMut(KeyKind) -> Result<String>>(
    tx: &mut S,
    new: &NewKey,
    now: i64,
    mut generate: G,
) -> Result<CreatedKey> {
    validate_account_id(&new.account)?;
    validate_optional_text("name", new.name.as_deref())?;
    for scope in &new.scopes {
        keys::validate_scope(scope).map_err(StoreError::Invalid)?;
    }
    if new.kind == KeyKind::ApiKey && new.expiry != Expiry::Never {
        return Err(StoreError::Invalid(
            "api keys never expire; an expiry applies to api tokens only".into(),
        ));
    }
    let expires_at = new.expiry.expires_at(now);
    let scopes_json = encode_scopes(&new.scopes)?;

    // The token-count check and the prefix-uniqueness check must hold at
    // the moment of insert, even with concurrent minting: both run under
    // the account's lock.
    ensure_account(tx, &new.account, now).await?;
    lock_account(tx, &new.account).await?;
    if new.kind == KeyKind::ApiToken {
        let active = tx
            .int(
                &format!(
                    "SELECT COUNT(*) FROM keys k WHERE k.account = $1 AND k.kind = 'api_token' AND {}",
                    active_sql(2)
                ),
                &vals![&new.account, now],
            )
            .await?;
        if active >= MAX_ACTIVE_API_TOKENS {
            return Err(StoreError::TooManyTokens {
                account: new.account.clone(),
                limit: MAX_ACTIVE_API_TOKENS,
            });
        }
    }

    let mut minted = None;
    for _ in 0..PREFIX_ATTEMPTS {
        let secret = generate(new.kind)?;
        let (kind, prefix) = keys::parse_secret(&secret)
            .filter(|(kind, _)| *kind == new.kind)
            .ok_or_else(|| StoreError::Invalid("generated secret is malformed".into()))?;
        // Prefixes identify keys to operators (`key revoke PREFIX`), so they
        // must be unique across all stored keys: regenerate on clash.
        let taken = tx
            .int(
                "SELECT COUNT(*) FROM keys WHERE prefix = $1",
                &vals![&prefix],
            )
            .await?;
        if taken == 0 {
            minted = Some((secret, kind, prefix));
            break;
        }
    }
    let (secret, kind, prefix) = minted.ok_or_else(|| {
        StoreError::Invalid("could not find an unused key prefix; try again".into())
    })?;

    tx.exec(
        "INSERT INTO keys (key_sha256, prefix, account, kind, scopes, name, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &vals![
            keys::sha256_hex(&secret),
            &prefix,
            &new.account,
            kind.as_str(),
            &scopes_json,
            &new.name,
            now,
            expires_at
        ],
    )
    .await?;
    Ok(CreatedKey {
        secret,
        prefix,
        account: new.account.clone(),
        kind,
        scopes: new.scopes.clone(),
        name: new.name.clone(),
        created_at: now,
        expires_at,
    })
}

job!(
    /// [`create_key`] with a secret from the OS random source.
    CreateKey { new: NewKey, now: i64 } -> CreatedKey,
    |j, tx| create_key(tx, &j.new, j.now, |kind| Ok(keys::generate_secret(kind)?)).await
);

/// Look a key up by the SHA-256 of its secret, with its account's balance as
/// [`account_view`] sees it. Revoked and expired keys are returned too. A
/// read: recording the use (`last_used_at`) is [`touch_key`], a write.
pub async fn lookup_key<S: Sql>(
    tx: &mut S,
    key_sha256: &str,
    now: i64,
) -> Result<Option<KeyLookup>> {
    if !keys::is_sha256_hex(key_sha256) {
        return Err(StoreError::Invalid(
            "key_sha256 must be 64 lowercase hex characters".into(),
        ));
    }
    let Some(row) = tx
        .row(
            &format!("SELECT {KEY_COLUMNS} FROM keys k WHERE k.key_sha256 = $1"),
            &vals![key_sha256],
        )
        .await?
    else {
        return Ok(None);
    };
    let key = key_from_row(&row, now)?;
    let balance = account_view(tx, &key.account, now)
        .await?
        .map_or(0, |s| s.balance);
    Ok(Some(KeyLookup { key, balance }))
}

job!(
    /// [`lookup_key`] (read).
    LookupKey { key_sha256: String, now: i64 } -> Option<KeyLookup>,
    |j, tx| lookup_key(tx, &j.key_sha256, j.now).await
);

/// Record that an active key was used at `now` (never moves backwards;
/// revoked and expired keys are not touched). Returns whether a row changed.
pub async fn touch_key<S: Sql>(tx: &mut S, key_sha256: &str, now: i64) -> Result<bool> {
    Ok(tx
        .exec(
            "UPDATE keys SET last_used_at = $2 WHERE key_sha256 = $1 AND revoked_at IS NULL \
             AND (expires_at IS NULL OR expires_at > $2) \
             AND (last_used_at IS NULL OR last_used_at < $2)",
            &vals![key_sha256, now],
        )
        .await?
        > 0)
}

job!(
    /// [`touch_key`].
    TouchKey { key_sha256: String, now: i64 } -> bool,
    |j, tx| touch_key(tx, &j.key_sha256, j.now).await
);

/// All keys of an account, oldest first (creation order).
pub async fn list_keys<S: Sql>(tx: &mut S, account: &str, now: i64) -> Result<Vec<KeyRecord>> {
    let order = match tx.dialect() {
        Dialect::Sqlite => "k.rowid",
        Dialect::Postgres => "k.seq",
    };
    tx.rows(
        &format!(
            "SELECT {KEY_COLUMNS} FROM keys k WHERE k.account = $1 ORDER BY k.created_at, {order}"
        ),
        &vals![account],
    )
    .await?
    .iter()
    .map(|r| key_from_row(r, now))
    .collect()
}

job!(
    /// [`list_keys`] (read).
    ListKeys { account: String, now: i64 } -> Vec<KeyRecord>,
    |j, tx| list_keys(tx, &j.account, j.now).await
);

/// Revoke the single active key with this prefix.
pub async fn revoke_by_prefix<S: Sql>(tx: &mut S, prefix: &str, now: i64) -> Result<RevokedKey> {
    revoke_prefix_of(tx, prefix, None, now).await
}

/// Revoke the single active key with this prefix, if `owner` (when given)
/// holds it. Another account's key is [`StoreError::KeyNotFound`], exactly
/// as an unknown prefix: the answer says nothing about other accounts.
pub async fn revoke_prefix_of<S: Sql>(
    tx: &mut S,
    prefix: &str,
    owner: Option<&str>,
    now: i64,
) -> Result<RevokedKey> {
    if !keys::is_valid_prefix(prefix) {
        return Err(StoreError::Invalid(
            "a key prefix is 8 lowercase hex characters".into(),
        ));
    }
    let lock = match tx.dialect() {
        Dialect::Postgres => " FOR UPDATE",
        Dialect::Sqlite => "",
    };
    let matches = match owner {
        None => {
            tx.rows(
                &format!(
                    "SELECT k.key_sha256, k.account, k.kind FROM keys k WHERE k.prefix = $1 AND {}{lock}",
                    active_sql(2)
                ),
                &vals![prefix, now],
            )
            .await?
        }
        Some(account) => {
            tx.rows(
                &format!(
                    "SELECT k.key_sha256, k.account, k.kind FROM keys k WHERE k.prefix = $1 AND {} \
                     AND k.account = $3{lock}",
                    active_sql(2)
                ),
                &vals![prefix, now, account],
            )
            .await?
        }
    };
    let one = match matches.as_slice() {
        [] => return Err(StoreError::KeyNotFound(prefix.to_string())),
        [one] => one,
        many => {
            return Err(StoreError::AmbiguousPrefix {
                prefix: prefix.to_string(),
                matches: many.len(),
            })
        }
    };
    let (hash, account, kind) = (one.text(0)?, one.text(1)?, one.text(2)?);
    tx.exec(
        "UPDATE keys SET revoked_at = $2 WHERE key_sha256 = $1",
        &vals![&hash, now],
    )
    .await?;
    Ok(RevokedKey {
        prefix: prefix.to_string(),
        account,
        kind: decode_kind(&kind)?,
        revoked_at: now,
    })
}

job!(
    /// [`revoke_by_prefix`].
    Revoke { prefix: String, now: i64 } -> RevokedKey,
    |j, tx| revoke_by_prefix(tx, &j.prefix, j.now).await
);

job!(
    /// [`revoke_prefix_of`]: the self-service revoke, for the key's owner only.
    RevokeOwn { account: String, prefix: String, now: i64 } -> RevokedKey,
    |j, tx| revoke_prefix_of(tx, &j.prefix, Some(&j.account), j.now).await
);

job!(
    /// Number of active API tokens of an account (read).
    ActiveTokenCount { account: String, now: i64 } -> i64,
    |j, tx| tx.int(
        &format!("SELECT COUNT(*) FROM keys k WHERE k.account = $1 AND k.kind = 'api_token' AND {}", active_sql(2)),
        &vals![&j.account, j.now],
    ).await
);
