//! Store behaviour on a real SQLite file: secrets, key states, money rules,
//! token limits, prefix collisions, migrations and cross-connection concurrency.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{each_backend, TempDb};
use dialtone_credits::keys::{self, Expiry, KeyKind, KeyState, DAY_SECS};
use dialtone_credits::store::{DebitOutcome, DebitRequest, NewKey, Store, StoreError};
use std::sync::{Arc, Barrier};

const T0: i64 = 1_700_000_000;

fn new_key(account: &str, kind: KeyKind, expiry: Expiry) -> NewKey {
    NewKey {
        account: account.to_string(),
        kind,
        scopes: vec!["sms:send".to_string()],
        name: Some("test".to_string()),
        expiry,
    }
}

fn debit_req(account: &str, amount: i64, key: &str) -> DebitRequest {
    DebitRequest {
        account: account.to_string(),
        amount,
        idempotency_key: key.to_string(),
        route: Some("sms_send".to_string()),
        key_prefix: Some("abc12345".to_string()),
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn key_creation_stores_only_hash_and_prefix() {
    let db = TempDb::new();
    let mut store = db.open();
    let key = store
        .create_key(
            &new_key("did:privy:alice", KeyKind::ApiKey, Expiry::Never),
            T0,
        )
        .unwrap();
    let token = store
        .create_key(
            &new_key("did:privy:alice", KeyKind::ApiToken, Expiry::Days(30)),
            T0,
        )
        .unwrap();
    drop(store);

    // WAL mode: recent pages may live in -wal rather than the main file.
    let mut bytes = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let p = format!("{}{suffix}", db.path.display());
        if let Ok(b) = std::fs::read(&p) {
            bytes.extend(b);
        }
    }
    for created in [&key, &token] {
        let random_part = &created.secret[created.kind.marker().len()..];
        assert!(
            !contains(&bytes, &created.secret),
            "secret found in DB files"
        );
        assert!(
            !contains(&bytes, random_part),
            "secret body found in DB files"
        );
        // Sanity: we did read the data that was written.
        assert!(contains(&bytes, &keys::sha256_hex(&created.secret)));
        assert!(contains(&bytes, &created.prefix));
    }
    assert!(key.secret.starts_with("dial_live_"));
    assert_eq!(key.prefix, &key.secret[10..18]);
    assert!(token.secret.starts_with("privy_"));
    assert_eq!(token.prefix, &token.secret[6..14]);
    assert_eq!(key.expires_at, None);
    assert_eq!(token.expires_at, Some(T0 + 30 * DAY_SECS));
}

#[test]
fn lookup_reports_active_revoked_and_expired() {
    each_backend(|db| {
        let mut store = db.open();
        store.create_account("did:privy:bob", 42, T0).unwrap();
        let token = store
            .create_key(
                &new_key("did:privy:bob", KeyKind::ApiToken, Expiry::Days(30)),
                T0,
            )
            .unwrap();
        let hash = keys::sha256_hex(&token.secret);

        let l = store.lookup_key(&hash, T0 + 5).unwrap().unwrap();
        assert_eq!(l.key.state, KeyState::Active);
        assert_eq!(l.key.account, "did:privy:bob");
        assert_eq!(l.key.kind, KeyKind::ApiToken);
        assert_eq!(l.key.scopes, vec!["sms:send"]);
        assert_eq!(l.key.prefix, token.prefix);
        assert_eq!(l.balance, 42);
        assert_eq!(l.key.last_used_at, Some(T0 + 5));

        let expiry = T0 + 30 * DAY_SECS;
        let l = store.lookup_key(&hash, expiry - 1).unwrap().unwrap();
        assert_eq!(l.key.state, KeyState::Active);
        let l = store.lookup_key(&hash, expiry).unwrap().unwrap();
        assert_eq!(l.key.state, KeyState::Expired);
        // Expired lookups do not count as use.
        assert_eq!(l.key.last_used_at, Some(expiry - 1));
        let listed = store.list_keys("did:privy:bob", expiry).unwrap();
        assert_eq!(listed[0].last_used_at, Some(expiry - 1));

        let key = store
            .create_key(
                &new_key("did:privy:bob", KeyKind::ApiKey, Expiry::Never),
                T0,
            )
            .unwrap();
        let key_hash = keys::sha256_hex(&key.secret);
        store.revoke_by_prefix(&key.prefix, T0 + 10).unwrap();
        let l = store.lookup_key(&key_hash, T0 + 11).unwrap().unwrap();
        assert_eq!(l.key.state, KeyState::Revoked);
        assert_eq!(l.key.revoked_at, Some(T0 + 10));
        // Even far in the future an api key never "expires"; it stays revoked.
        let l = store
            .lookup_key(&key_hash, T0 + 10_000 * DAY_SECS)
            .unwrap()
            .unwrap();
        assert_eq!(l.key.state, KeyState::Revoked);

        assert!(store
            .lookup_key(&keys::sha256_hex("nope"), T0)
            .unwrap()
            .is_none());
        assert!(matches!(
            store.lookup_key(&hash.to_uppercase(), T0),
            Err(StoreError::Invalid(_))
        ));
    });
}

#[test]
fn debit_is_idempotent_and_replays_original_result() {
    each_backend(|db| {
        let mut store = db.open();
        store.create_account("acct", 10, T0).unwrap();

        let first = store.debit(&debit_req("acct", 3, "req-1"), T0).unwrap();
        assert_eq!(
            first,
            DebitOutcome::Charged {
                account: "acct".into(),
                charged: 3,
                balance: 7,
                replayed: false
            }
        );
        // Another debit moves the balance; the replay still reports the original.
        store.debit(&debit_req("acct", 2, "req-2"), T0).unwrap();
        let replay = store.debit(&debit_req("acct", 3, "req-1"), T0 + 1).unwrap();
        assert_eq!(
            replay,
            DebitOutcome::Charged {
                account: "acct".into(),
                charged: 3,
                balance: 7,
                replayed: true
            }
        );
        assert_eq!(store.balance("acct").unwrap(), Some(5));
        assert_eq!(store.debit_count("acct").unwrap(), 2);
        assert_eq!(store.ledger_balance("acct").unwrap(), 5);

        let rec = store.debit_record("req-1").unwrap().unwrap();
        assert_eq!(rec.amount, 3);
        assert_eq!(rec.balance_after, 7);
        assert_eq!(rec.route.as_deref(), Some("sms_send"));
        assert_eq!(rec.key_prefix.as_deref(), Some("abc12345"));
    });
}

#[test]
fn reused_idempotency_key_for_other_charge_conflicts() {
    each_backend(|db| {
        let mut store = db.open();
        store.create_account("a", 10, T0).unwrap();
        store.create_account("b", 10, T0).unwrap();
        store.debit(&debit_req("a", 1, "k"), T0).unwrap();
        assert_eq!(
            store.debit(&debit_req("a", 2, "k"), T0).unwrap(),
            DebitOutcome::Conflict
        );
        assert_eq!(
            store.debit(&debit_req("b", 1, "k"), T0).unwrap(),
            DebitOutcome::Conflict
        );
        assert_eq!(store.balance("a").unwrap(), Some(9));
        assert_eq!(store.balance("b").unwrap(), Some(10));
    });
}

#[test]
fn insufficient_credits_records_nothing_and_can_succeed_later() {
    each_backend(|db| {
        let mut store = db.open();
        store.create_account("poor", 2, T0).unwrap();
        assert_eq!(
            store.debit(&debit_req("poor", 5, "k5"), T0).unwrap(),
            DebitOutcome::Insufficient {
                balance: 2,
                required: 5
            }
        );
        assert!(store.debit_record("k5").unwrap().is_none());
        assert_eq!(store.balance("poor").unwrap(), Some(2));

        // Unknown account: treated as balance 0 and not created.
        assert_eq!(
            store.debit(&debit_req("ghost", 1, "g1"), T0).unwrap(),
            DebitOutcome::Insufficient {
                balance: 0,
                required: 1
            }
        );
        assert_eq!(store.balance("ghost").unwrap(), None);

        // After a top-up the same idempotency key goes through.
        store.topup("poor", 10, Some("manual"), None, T0).unwrap();
        assert_eq!(
            store.debit(&debit_req("poor", 5, "k5"), T0).unwrap(),
            DebitOutcome::Charged {
                account: "poor".into(),
                charged: 5,
                balance: 7,
                replayed: false
            }
        );
        assert_eq!(store.ledger_balance("poor").unwrap(), 7);
    });
}

#[test]
fn debit_input_is_validated() {
    each_backend(|db| {
        let mut store = db.open();
        store.create_account("a", 10, T0).unwrap();
        for bad in [
            debit_req("a", 0, "k"),
            debit_req("a", -1, "k"),
            debit_req("a", 1, ""),
            debit_req("a", 1, &"x".repeat(201)),
            debit_req("", 1, "k"),
        ] {
            assert!(
                matches!(store.debit(&bad, T0), Err(StoreError::Invalid(_))),
                "{bad:?}"
            );
        }
        // 200 characters (not bytes) is the limit.
        let key: String = "é".repeat(200);
        assert!(matches!(
            store.debit(&debit_req("a", 1, &key), T0),
            Ok(DebitOutcome::Charged { .. })
        ));
    });
}

#[test]
fn twenty_sixth_active_token_is_refused_until_a_slot_frees() {
    each_backend(|db| {
        let mut store = db.open();
        let acct = "did:privy:many";
        // 24 tokens that never expire + 1 that expires after 30 days = 25 active.
        for _ in 0..24 {
            store
                .create_key(&new_key(acct, KeyKind::ApiToken, Expiry::Never), T0)
                .unwrap();
        }
        store
            .create_key(&new_key(acct, KeyKind::ApiToken, Expiry::Days(30)), T0)
            .unwrap();
        assert_eq!(store.active_token_count(acct, T0).unwrap(), 25);

        let err = store
            .create_key(&new_key(acct, KeyKind::ApiToken, Expiry::Never), T0 + 1)
            .unwrap_err();
        assert!(
            matches!(err, StoreError::TooManyTokens { limit: 25, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("25 active api tokens"));
        // API keys are not limited by the token cap.
        store
            .create_key(&new_key(acct, KeyKind::ApiKey, Expiry::Never), T0 + 1)
            .unwrap();

        // Once the 30-day token has expired, its slot is free again.
        let later = T0 + 30 * DAY_SECS;
        assert_eq!(store.active_token_count(acct, later).unwrap(), 24);
        let extra = store
            .create_key(&new_key(acct, KeyKind::ApiToken, Expiry::Never), later)
            .unwrap();
        assert!(matches!(
            store.create_key(&new_key(acct, KeyKind::ApiToken, Expiry::Never), later),
            Err(StoreError::TooManyTokens { .. })
        ));

        // Revoking one frees a slot too.
        store.revoke_by_prefix(&extra.prefix, later + 1).unwrap();
        store
            .create_key(&new_key(acct, KeyKind::ApiToken, Expiry::Never), later + 2)
            .unwrap();
        assert_eq!(store.active_token_count(acct, later + 2).unwrap(), 25);
        // Another account is unaffected.
        store
            .create_key(&new_key("other", KeyKind::ApiToken, Expiry::Never), later)
            .unwrap();
    });
}

#[test]
fn api_keys_cannot_have_an_expiry() {
    each_backend(|db| {
        let mut store = db.open();
        assert!(matches!(
            store.create_key(&new_key("a", KeyKind::ApiKey, Expiry::Days(30)), T0),
            Err(StoreError::Invalid(_))
        ));
    });
}

#[test]
fn prefix_collision_regenerates() {
    each_backend(|db| {
        let mut store = db.open();
        let first = format!("dial_live_aaaaaaaa{}", "1".repeat(32));
        let clash = format!("dial_live_aaaaaaaa{}", "2".repeat(32));
        let fresh = format!("dial_live_bbbbbbbb{}", "3".repeat(32));

        let mut queue = vec![first.clone()];
        let k1 = store
            .create_key_with(
                &new_key("a", KeyKind::ApiKey, Expiry::Never),
                T0,
                &mut |_| Ok(queue.remove(0)),
            )
            .unwrap();
        assert_eq!(k1.prefix, "aaaaaaaa");

        let mut queue = vec![clash, fresh.clone()];
        let mut calls = 0;
        let k2 = store
            .create_key_with(
                &new_key("a", KeyKind::ApiKey, Expiry::Never),
                T0,
                &mut |_| {
                    calls += 1;
                    Ok(queue.remove(0))
                },
            )
            .unwrap();
        assert_eq!(calls, 2);
        assert_eq!(k2.prefix, "bbbbbbbb");
        assert_eq!(k2.secret, fresh);

        // A generator that only ever clashes gives up with an error, not a loop.
        let err = store
            .create_key_with(
                &new_key("a", KeyKind::ApiKey, Expiry::Never),
                T0,
                &mut |_| Ok(first.clone()),
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)));
    });
}

#[test]
fn revoke_by_prefix_errors() {
    each_backend(|db| {
        let mut store = db.open();
        assert!(matches!(
            store.revoke_by_prefix("0123abcd", T0),
            Err(StoreError::KeyNotFound(_))
        ));
        assert!(matches!(
            store.revoke_by_prefix("nothex!!", T0),
            Err(StoreError::Invalid(_))
        ));
        let k = store
            .create_key(&new_key("a", KeyKind::ApiKey, Expiry::Never), T0)
            .unwrap();
        let revoked = store.revoke_by_prefix(&k.prefix, T0).unwrap();
        assert_eq!(revoked.account, "a");
        assert_eq!(revoked.kind, KeyKind::ApiKey);
        // Already revoked: no *active* key has the prefix any more.
        assert!(matches!(
            store.revoke_by_prefix(&k.prefix, T0),
            Err(StoreError::KeyNotFound(_))
        ));
        drop(store);

        // Two active keys sharing a prefix (e.g. imported data) are ambiguous.
        let mut raw = db.open();
        for h in ["1", "2"] {
            raw.raw_execute(&format!(
                "INSERT INTO keys (key_sha256, prefix, account, kind, created_at) VALUES ('{}', 'cafef00d', 'a', 'api_key', 0)",
                h.repeat(64)
            ))
            .unwrap();
        }
        drop(raw);
        let mut store = db.open();
        assert!(matches!(
            store.revoke_by_prefix("cafef00d", T0),
            Err(StoreError::AmbiguousPrefix { matches: 2, .. })
        ));
    });
}

#[test]
fn accounts_and_topups() {
    each_backend(|db| {
        let mut store = db.open();
        let created = store.create_account("x", 50, T0).unwrap();
        assert!(created.created);
        assert_eq!(created.balance, 50);
        // Idempotent: an existing account is left unchanged.
        let again = store.create_account("x", 999, T0).unwrap();
        assert!(!again.created);
        assert_eq!(again.balance, 50);

        let r = store.topup("x", 25, Some("promo"), None, T0).unwrap();
        assert_eq!((r.balance, r.replayed), (75, false));
        // Idempotent top-up: same key credits once.
        let r = store.topup("x", 100, None, Some("pay-1"), T0).unwrap();
        assert_eq!((r.balance, r.replayed), (175, false));
        let r = store.topup("x", 100, None, Some("pay-1"), T0).unwrap();
        assert_eq!((r.balance, r.replayed), (175, true));
        assert!(matches!(
            store.topup("y", 100, None, Some("pay-1"), T0),
            Err(StoreError::IdempotencyConflict(_))
        ));
        assert!(matches!(
            store.topup("x", 0, None, None, T0),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.topup("x", i64::MAX, None, None, T0),
            Err(StoreError::Invalid(_))
        ));
        assert_eq!(store.balance("x").unwrap(), Some(175));
        assert_eq!(store.ledger_balance("x").unwrap(), 175);
        // Top-up creates a missing account.
        assert_eq!(store.topup("new", 5, None, None, T0).unwrap().balance, 5);
    });
}

#[test]
fn schema_is_versioned_and_newer_files_are_refused() {
    let db = TempDb::new();
    let store = db.open();
    assert_eq!(
        store.schema_version().unwrap(),
        Store::supported_schema_version()
    );
    drop(store);
    // Reopening an up-to-date file is a no-op.
    let store = db.open();
    assert_eq!(
        store.schema_version().unwrap(),
        Store::supported_schema_version()
    );
    drop(store);

    let conn = rusqlite::Connection::open(&db.path).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    assert!(matches!(
        Store::open(&db.path),
        Err(StoreError::SchemaTooNew { found: 99, .. })
    ));
}

#[test]
fn balance_can_never_go_negative_even_bypassing_the_store() {
    each_backend(|db| {
        db.open().create_account("a", 1, T0).unwrap();
        let mut raw = db.open();
        assert!(raw
            .raw_execute("UPDATE accounts SET balance = -1 WHERE id = 'a'")
            .is_err());
        assert!(raw
            .raw_execute("UPDATE accounts SET held = -1 WHERE id = 'a'")
            .is_err());
        // SQLite STRICT table: a fractional balance is rejected too
        // (PostgreSQL's BIGINT column cannot hold a fraction at all).
        if !db.is_postgres() {
            assert!(raw
                .raw_execute("UPDATE accounts SET balance = 0.5 WHERE id = 'a'")
                .is_err());
        }
    });
}

#[test]
fn concurrent_debits_from_separate_connections_never_overdraw() {
    each_backend(|db| {
        const THREADS: usize = 8;
        const PER_THREAD: usize = 50;
        db.open().create_account("shared", 100, T0).unwrap();

        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                // Each thread has its own connection, as two processes would.
                let mut store = db.open();
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut charged = 0usize;
                    for i in 0..PER_THREAD {
                        match store
                            .debit(&debit_req("shared", 1, &format!("t{t}-{i}")), T0)
                            .unwrap()
                        {
                            DebitOutcome::Charged {
                                replayed: false, ..
                            } => charged += 1,
                            DebitOutcome::Insufficient { required: 1, .. } => {}
                            other => panic!("unexpected outcome {other:?}"),
                        }
                    }
                    charged
                })
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();

        let store = db.open();
        assert_eq!(total, 100);
        assert_eq!(store.balance("shared").unwrap(), Some(0));
        assert_eq!(store.debit_count("shared").unwrap(), 100);
        assert_eq!(store.ledger_balance("shared").unwrap(), 0);
    });
}

/// CI guard: with DIALTONE_TEST_PG_REQUIRED=1 the PostgreSQL half of this
/// suite must run, so a missing DIALTONE_TEST_PG_URL fails instead of
/// silently testing SQLite only.
#[test]
fn postgres_is_configured_when_required() {
    if std::env::var(common::PG_REQUIRED_ENV).as_deref() == Ok("1") {
        let url = common::pg_url().unwrap_or_else(|| {
            panic!(
                "{}=1 but {} is unset: start one with `scripts/postgres.sh start target/pg 15432`",
                common::PG_REQUIRED_ENV,
                common::PG_URL_ENV
            )
        });
        let store = Store::connect(&url).unwrap();
        assert_eq!(store.dialect(), dialtone_credits::db::Dialect::Postgres);
        assert_eq!(
            store.schema_version().unwrap(),
            dialtone_credits::pg::supported_schema_version()
        );
    }
}
