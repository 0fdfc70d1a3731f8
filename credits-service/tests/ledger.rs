//! The ledger, holds, refunds, rate limits and `check`, on every backend
//! (SQLite always; PostgreSQL when DIALTONE_TEST_PG_URL is set). Time is
//! injected: nothing here sleeps to make a timing assertion.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{each_backend, TempDb, TestBackend};
use dialtone_credits::store::{
    DebitOutcome, DebitRequest, HoldOutcome, HoldReceipt, HoldRequest, HoldState, RateDecision,
    RateLimit, RefundOutcome, ReleaseReason, SettleOutcome, Store, StoreError,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};

const T0: i64 = 1_700_000_000;
const MS: i64 = 1000;

fn debit_req(account: &str, amount: i64, key: &str) -> DebitRequest {
    DebitRequest {
        account: account.to_string(),
        amount,
        idempotency_key: key.to_string(),
        route: Some("sms_send".to_string()),
        key_prefix: Some("abc12345".to_string()),
    }
}

fn hold_req(account: &str, amount: i64, key: &str, ttl: i64) -> HoldRequest {
    HoldRequest {
        account: account.to_string(),
        amount,
        idempotency_key: key.to_string(),
        ttl_seconds: ttl,
        route: Some("sms_send".to_string()),
        key_prefix: Some("abc12345".to_string()),
    }
}

fn held(outcome: HoldOutcome) -> HoldReceipt {
    match outcome {
        HoldOutcome::Held(h) => h,
        other => panic!("expected a hold, got {other:?}"),
    }
}

fn assert_check_ok(store: &mut Store) {
    let report = store.check().unwrap();
    assert!(report.is_ok(), "check failed: {:#?}", report.problems);
}

fn summary(store: &mut Store, account: &str, now: i64) -> (i64, i64) {
    let s = store.account_summary(account, now).unwrap().unwrap();
    (s.balance, s.held)
}

#[test]
fn every_operation_writes_its_ledger_row() {
    each_backend(|b| {
        let mut s = b.open();
        s.create_account("a", 10, T0).unwrap();
        s.topup("a", 5, Some("promo"), Some("pay-1"), T0).unwrap();
        s.debit(&debit_req("a", 2, "d1"), T0).unwrap();
        let h1 = held(s.create_hold(&hold_req("a", 3, "h1", 60), None, T0 * MS).unwrap());
        assert_eq!(h1.balance, 10);
        assert!(h1.hold_id.starts_with("hold_") && h1.hold_id.len() == 5 + 24);
        s.capture_hold(&h1.hold_id, T0 + 1).unwrap();
        let h2 = held(s.create_hold(&hold_req("a", 4, "h2", 60), None, T0 * MS).unwrap());
        s.release_hold(&h2.hold_id, ReleaseReason::UpstreamError, T0 + 1)
            .unwrap();
        s.refund("d1", None, T0 + 2).unwrap();
        s.refund("h1", Some("bad sms"), T0 + 2).unwrap();

        let rows = s.ledger("a", 100).unwrap();
        let got: Vec<(&str, i64, i64, i64)> = rows
            .iter()
            .rev()
            .map(|e| (e.kind.as_str(), e.delta_available, e.delta_held, e.amount))
            .collect();
        assert_eq!(
            got,
            vec![
                ("topup", 10, 0, 10),
                ("topup", 5, 0, 5),
                ("debit", -2, 0, 2),
                ("hold", -3, 3, 3),
                ("capture", 0, -3, 3),
                ("hold", -4, 4, 4),
                ("release", 4, -4, 4),
                ("refund", 2, 0, 2),
                ("refund", 3, 0, 3),
            ]
        );
        let newest_first: Vec<i64> = rows.iter().map(|e| e.id).collect();
        assert!(newest_first.windows(2).all(|w| w[0] > w[1]));
        let release = &rows[2];
        assert_eq!(release.hold_id.as_deref(), Some(h2.hold_id.as_str()));
        assert_eq!(release.idempotency_key.as_deref(), Some("h2"));
        assert_eq!(release.note.as_deref(), Some("upstream_error"));
        assert_eq!(rows[0].hold_id.as_deref(), Some(h1.hold_id.as_str()));
        assert_eq!(rows[0].note.as_deref(), Some("bad sms"));
        assert_eq!(rows[1].hold_id, None);
        assert_eq!(rows[6].route.as_deref(), Some("sms_send"));
        assert_eq!(rows[6].key_prefix.as_deref(), Some("abc12345"));
        assert_eq!(rows[7].idempotency_key.as_deref(), Some("pay-1"));

        assert_eq!(summary(&mut s, "a", T0 + 2), (15, 0));
        assert_eq!(s.ledger_balance("a").unwrap(), 15);
        assert_eq!(s.ledger("a", 2).unwrap().len(), 2);
        assert_check_ok(&mut s);
        let report = s.check().unwrap();
        assert_eq!((report.accounts, report.ledger_rows), (1, 9));
    });
}

#[test]
fn ledger_rows_cannot_be_updated_or_deleted() {
    each_backend(|b| {
        let mut s = b.open();
        s.create_account("a", 10, T0).unwrap();
        for sql in [
            "UPDATE ledger SET amount = 99",
            "UPDATE ledger SET note = 'edited'",
            "DELETE FROM ledger",
        ] {
            let err = s.raw_execute(sql).unwrap_err();
            assert!(err.to_string().contains("append-only"), "{sql}: {err}");
        }
        assert_eq!(s.ledger("a", 10).unwrap().len(), 1);
        assert_eq!(s.ledger("a", 10).unwrap()[0].note.as_deref(), Some("initial credits"));
        assert_check_ok(&mut s);
    });
}

#[test]
fn check_reports_every_discrepancy() {
    each_backend(|b| {
        let mut s = b.open();
        s.create_account("a", 10, T0).unwrap();
        s.create_account("b", 10, T0).unwrap();
        s.create_hold(&hold_req("b", 2, "hb", 60), None, T0 * MS)
            .unwrap();
        assert_check_ok(&mut s);
        // Money that appears without a ledger row is caught...
        s.raw_execute("UPDATE accounts SET balance = balance + 1 WHERE id = 'a'")
            .unwrap();
        // ...and so is a hold whose state changes behind the ledger's back.
        s.raw_execute("UPDATE holds SET state = 'captured', settled_at = 1 WHERE account = 'b'")
            .unwrap();
        let report = s.check().unwrap();
        assert!(!report.is_ok());
        let all = report.problems.join("\n");
        assert!(all.contains("account a: balance 11 != ledger sum of delta_available 10"), "{all}");
        assert!(all.contains("account b: held 2 != open holds 0 + unspent open leases 0"), "{all}");
        assert!(all.contains("(captured): 1 hold, 0 capture, 0 release"), "{all}");
    });
}

#[test]
fn holds_are_idempotent_conflict_and_refuse_without_credits() {
    each_backend(|b| {
        let mut s = b.open();
        s.create_account("a", 5, T0).unwrap();
        let first = held(s.create_hold(&hold_req("a", 3, "k1", 60), None, T0 * MS).unwrap());
        assert_eq!(
            (first.account.as_str(), first.amount, first.balance, first.expires_at, first.replayed),
            ("a", 3, 2, T0 + 60, false)
        );
        // Same key again (even later, even after capture): the original answer.
        s.capture_hold(&first.hold_id, T0 + 1).unwrap();
        let again = held(s.create_hold(&hold_req("a", 3, "k1", 60), None, (T0 + 5) * MS).unwrap());
        assert_eq!(again, HoldReceipt { replayed: true, ..first.clone() });
        // Same key, other account or amount: conflict, nothing recorded.
        assert_eq!(
            s.create_hold(&hold_req("a", 4, "k1", 60), None, T0 * MS).unwrap(),
            HoldOutcome::Conflict
        );
        assert_eq!(
            s.create_hold(&hold_req("b", 3, "k1", 60), None, T0 * MS).unwrap(),
            HoldOutcome::Conflict
        );
        // Too little available: 402, nothing recorded; the key can succeed later.
        assert_eq!(
            s.create_hold(&hold_req("a", 3, "k2", 60), None, T0 * MS).unwrap(),
            HoldOutcome::Insufficient { balance: 2, required: 3 }
        );
        assert_eq!(
            s.create_hold(&hold_req("ghost", 1, "k3", 60), None, T0 * MS).unwrap(),
            HoldOutcome::Insufficient { balance: 0, required: 1 }
        );
        assert_eq!(s.balance("ghost").unwrap(), None);
        assert_eq!(s.ledger("a", 100).unwrap().len(), 3);
        s.topup("a", 1, None, None, T0).unwrap();
        let later = held(s.create_hold(&hold_req("a", 3, "k2", 60), None, T0 * MS).unwrap());
        assert_eq!(later.balance, 0);
        for bad in [
            hold_req("a", 0, "x", 60),
            hold_req("a", 1, "", 60),
            hold_req("a", 1, "x", 0),
            hold_req("a", 1, "x", 3601),
            hold_req("", 1, "x", 60),
        ] {
            assert!(
                matches!(s.create_hold(&bad, None, T0 * MS), Err(StoreError::Invalid(_))),
                "{bad:?}"
            );
        }
        s.topup("z", 1, None, None, T0).unwrap();
        let max = held(s.create_hold(&hold_req("z", 1, "ttl-max", 3600), None, T0 * MS).unwrap());
        assert_eq!(max.expires_at, T0 + 3600);
        assert_check_ok(&mut s);
    });
}

#[test]
fn capture_and_release_are_idempotent_and_exclusive() {
    each_backend(|b| {
        let mut s = b.open();
        s.create_account("a", 10, T0).unwrap();
        let c = held(s.create_hold(&hold_req("a", 3, "c", 60), None, T0 * MS).unwrap());
        let r = held(s.create_hold(&hold_req("a", 2, "r", 60), None, T0 * MS).unwrap());
        assert_eq!(summary(&mut s, "a", T0), (5, 5));

        let SettleOutcome::Settled(done) = s.capture_hold(&c.hold_id, T0 + 1).unwrap() else {
            panic!()
        };
        assert_eq!((done.state, done.amount, done.balance, done.held), (HoldState::Captured, 3, 5, 2));
        // Capturing again: same answer, nothing charged twice.
        let SettleOutcome::Settled(again) = s.capture_hold(&c.hold_id, T0 + 2).unwrap() else {
            panic!()
        };
        assert_eq!(again, done);
        assert_eq!(
            s.release_hold(&c.hold_id, ReleaseReason::Requested, T0 + 2).unwrap(),
            SettleOutcome::NotOpen { state: HoldState::Captured }
        );

        let SettleOutcome::Settled(rel) =
            s.release_hold(&r.hold_id, ReleaseReason::UpstreamError, T0 + 1).unwrap()
        else {
            panic!()
        };
        assert_eq!((rel.state, rel.balance, rel.held), (HoldState::Released, 7, 0));
        assert_eq!(rel.release_reason, Some(ReleaseReason::UpstreamError));
        let SettleOutcome::Settled(rel2) =
            s.release_hold(&r.hold_id, ReleaseReason::Requested, T0 + 3).unwrap()
        else {
            panic!()
        };
        assert_eq!(rel2.release_reason, Some(ReleaseReason::UpstreamError));
        assert_eq!(
            s.capture_hold(&r.hold_id, T0 + 3).unwrap(),
            SettleOutcome::NotOpen { state: HoldState::Released }
        );
        assert_eq!(s.capture_hold("hold_000000000000000000000000", T0).unwrap(), SettleOutcome::NotFound);
        assert_eq!(
            s.release_hold("nope", ReleaseReason::Requested, T0).unwrap(),
            SettleOutcome::NotFound
        );
        assert_eq!(summary(&mut s, "a", T0 + 3), (7, 0));
        assert_eq!(s.ledger("a", 100).unwrap().len(), 5);
        assert_check_ok(&mut s);
    });
}

#[test]
fn holds_expire_by_the_clock_lazily_and_by_the_sweeper() {
    each_backend(|b| {
        let mut s = b.open();
        s.create_account("a", 10, T0).unwrap();
        s.create_account("idle", 10, T0).unwrap();
        let h = held(s.create_hold(&hold_req("a", 4, "h", 10), None, T0 * MS).unwrap());
        let idle = held(s.create_hold(&hold_req("idle", 4, "i", 10), None, T0 * MS).unwrap());
        // One second before expiry the hold can still be captured... (checked
        // on a second hold so this one stays open)
        let h2 = held(s.create_hold(&hold_req("a", 1, "h2", 10), None, T0 * MS).unwrap());
        assert!(matches!(s.capture_hold(&h2.hold_id, T0 + 9).unwrap(), SettleOutcome::Settled(_)));
        // ...at expires_at it is released (reason expired), in the capture's
        // own transaction, and the capture fails with 409.
        assert_eq!(
            s.capture_hold(&h.hold_id, T0 + 10).unwrap(),
            SettleOutcome::NotOpen { state: HoldState::Released }
        );
        assert_eq!(
            s.hold_state(&h.hold_id).unwrap(),
            Some((HoldState::Released, Some(ReleaseReason::Expired)))
        );
        assert_eq!(summary(&mut s, "a", T0 + 10), (9, 0));
        let release = &s.ledger("a", 1).unwrap()[0];
        assert_eq!((release.kind.as_str(), release.note.as_deref()), ("release", Some("hold expired")));
        // Releasing an expired hold is simply "already released".
        let SettleOutcome::Settled(r) =
            s.release_hold(&h.hold_id, ReleaseReason::UpstreamError, T0 + 11).unwrap()
        else {
            panic!()
        };
        assert_eq!(r.release_reason, Some(ReleaseReason::Expired));

        // A debit on the idle account would also expire it; here the sweeper does.
        assert_eq!(s.balance("idle").unwrap(), Some(6));
        assert_eq!(s.expire_holds(T0 + 9).unwrap(), 0);
        assert_eq!(s.expire_holds(T0 + 10).unwrap(), 1);
        assert_eq!(s.expire_holds(T0 + 11).unwrap(), 0);
        assert_eq!(s.balance("idle").unwrap(), Some(10));
        assert_eq!(
            s.hold_state(&idle.hold_id).unwrap(),
            Some((HoldState::Released, Some(ReleaseReason::Expired)))
        );

        // A debit sees credits of expired holds immediately (lazy expiry).
        held(s.create_hold(&hold_req("idle", 10, "all", 5), None, T0 * MS).unwrap());
        assert_eq!(
            s.debit(&debit_req("idle", 10, "d"), T0 + 4).unwrap(),
            DebitOutcome::Insufficient { balance: 0, required: 10 }
        );
        assert!(matches!(
            s.debit(&debit_req("idle", 10, "d"), T0 + 5).unwrap(),
            DebitOutcome::Charged { balance: 0, .. }
        ));
        assert_check_ok(&mut s);
    });
}

#[test]
fn refunds_happen_once() {
    each_backend(|b| {
        let mut s = b.open();
        s.create_account("a", 10, T0).unwrap();
        s.debit(&debit_req("a", 3, "d"), T0).unwrap();
        let RefundOutcome::Refunded { amount, balance, hold_id, .. } =
            s.refund("d", None, T0).unwrap()
        else {
            panic!()
        };
        assert_eq!((amount, balance, hold_id), (3, 10, None));
        assert_eq!(
            s.refund("d", None, T0).unwrap(),
            RefundOutcome::AlreadyRefunded { idempotency_key: "d".into() }
        );
        // The debit itself stays recorded: a retry of it is still a replay,
        // never a second charge.
        assert!(matches!(
            s.debit(&debit_req("a", 3, "d"), T0).unwrap(),
            DebitOutcome::Charged { replayed: true, .. }
        ));
        assert_eq!(s.refund("unknown", None, T0).unwrap(), RefundOutcome::NotFound);

        let open = held(s.create_hold(&hold_req("a", 2, "open", 60), None, T0 * MS).unwrap());
        assert_eq!(
            s.refund("open", None, T0).unwrap(),
            RefundOutcome::NotRefundable { state: HoldState::Open }
        );
        s.release_hold(&open.hold_id, ReleaseReason::Requested, T0).unwrap();
        assert_eq!(
            s.refund("open", None, T0).unwrap(),
            RefundOutcome::NotRefundable { state: HoldState::Released }
        );
        let cap = held(s.create_hold(&hold_req("a", 4, "cap", 60), None, T0 * MS).unwrap());
        s.capture_hold(&cap.hold_id, T0).unwrap();
        assert_eq!(s.balance("a").unwrap(), Some(6));
        let RefundOutcome::Refunded { hold_id, balance, .. } = s.refund("cap", None, T0).unwrap() else {
            panic!()
        };
        assert_eq!((hold_id.as_deref(), balance), (Some(cap.hold_id.as_str()), 10));
        assert!(matches!(s.refund("cap", None, T0).unwrap(), RefundOutcome::AlreadyRefunded { .. }));
        assert_check_ok(&mut s);
    });
}

#[test]
fn rate_limit_bursts_then_refills_by_the_clock() {
    each_backend(|b| {
        let mut s = b.open();
        // 1 request per 2 s, burst 3.
        let rl = RateLimit { requests: 1, window_seconds: 2, burst: 3 };
        let t = T0 * MS;
        for remaining in [2, 1, 0] {
            assert_eq!(s.rate_limit("a", &rl, t).unwrap(), RateDecision::Allowed { remaining });
        }
        assert_eq!(
            s.rate_limit("a", &rl, t).unwrap(),
            RateDecision::Limited { retry_after_seconds: 2 }
        );
        // Half a token later: 1 s still to wait.
        assert_eq!(
            s.rate_limit("a", &rl, t + 1000).unwrap(),
            RateDecision::Limited { retry_after_seconds: 1 }
        );
        // 1.999 s: not yet (sub-second precision), retry_after rounds up to 1.
        assert_eq!(
            s.rate_limit("a", &rl, t + 1999).unwrap(),
            RateDecision::Limited { retry_after_seconds: 1 }
        );
        assert_eq!(s.rate_limit("a", &rl, t + 2000).unwrap(), RateDecision::Allowed { remaining: 0 });
        // Another account has its own bucket.
        assert_eq!(s.rate_limit("b", &rl, t).unwrap(), RateDecision::Allowed { remaining: 2 });
        // A long pause refills only up to the burst.
        assert_eq!(
            s.rate_limit("a", &rl, t + 3_600_000).unwrap(),
            RateDecision::Allowed { remaining: 2 }
        );
        // A second connection (another instance) shares the same bucket.
        let mut other = b.open();
        assert_eq!(
            other.rate_limit("a", &rl, t + 3_600_000).unwrap(),
            RateDecision::Allowed { remaining: 1 }
        );
        for bad in [
            RateLimit { requests: 0, ..rl },
            RateLimit { window_seconds: 0, ..rl },
            RateLimit { burst: 0, ..rl },
        ] {
            assert!(matches!(s.rate_limit("a", &bad, t), Err(StoreError::Invalid(_))));
        }
    });
}

#[test]
fn rate_limit_is_checked_before_charging_and_replays_pass() {
    each_backend(|b| {
        let mut s = b.open();
        s.create_account("a", 100, T0).unwrap();
        let rl = RateLimit { requests: 10, window_seconds: 60, burst: 2 };
        let t = T0 * MS;
        assert!(matches!(
            s.debit_limited(&debit_req("a", 1, "d1"), Some(&rl), t).unwrap(),
            DebitOutcome::Charged { .. }
        ));
        held(s.create_hold(&hold_req("a", 1, "h1", 60), Some(&rl), t).unwrap());
        assert_eq!(
            s.debit_limited(&debit_req("a", 1, "d2"), Some(&rl), t).unwrap(),
            DebitOutcome::RateLimited { retry_after_seconds: 6 }
        );
        assert_eq!(
            s.create_hold(&hold_req("a", 1, "h2", 60), Some(&rl), t).unwrap(),
            HoldOutcome::RateLimited { retry_after_seconds: 6 }
        );
        // Refused requests recorded nothing.
        assert!(s.debit_record("d2").unwrap().is_none());
        assert_eq!(summary(&mut s, "a", T0), (98, 1));
        // A retry of a recorded request replays its answer, limited or not.
        assert!(matches!(
            s.debit_limited(&debit_req("a", 1, "d1"), Some(&rl), t).unwrap(),
            DebitOutcome::Charged { replayed: true, .. }
        ));
        assert!(held(s.create_hold(&hold_req("a", 1, "h1", 60), Some(&rl), t).unwrap()).replayed);
        // Without a rate_limit there is no rate check.
        assert!(matches!(
            s.debit(&debit_req("a", 1, "d3"), T0).unwrap(),
            DebitOutcome::Charged { .. }
        ));
        assert_check_ok(&mut s);
    });
}

/// A small deterministic pseudo-random generator (64-bit LCG).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn below(&mut self, n: u64) -> i64 {
        i64::try_from(self.next() % n).unwrap()
    }
}

#[derive(Default, Debug)]
struct ModelAccount {
    balance: i64,
    held: i64,
}

#[derive(Debug, Clone)]
struct ModelHold {
    id: String,
    account: String,
    amount: i64,
    expires_at: i64,
    state: HoldState,
    key: String,
}

#[derive(Default)]
struct Model {
    accounts: BTreeMap<String, ModelAccount>,
    holds: Vec<ModelHold>,
    /// key -> (account, amount)
    debits: BTreeMap<String, (String, i64)>,
    refunded: Vec<String>,
}

impl Model {
    /// What the store does at the start of every transaction on `account`.
    fn expire(&mut self, account: &str, now: i64) {
        for h in &mut self.holds {
            if h.account == account && h.state == HoldState::Open && h.expires_at <= now {
                h.state = HoldState::Released;
                let a = self.accounts.get_mut(account).unwrap();
                a.balance += h.amount;
                a.held -= h.amount;
            }
        }
    }
}

#[test]
fn random_mix_matches_a_model_and_check_passes() {
    each_backend(|b| {
        let mut s = b.open();
        let mut m = Model::default();
        let mut rng = Lcg(0x5eed_d1a1_7043);
        let names = ["acct-0", "acct-1", "acct-2", "acct-3"];
        let mut now = T0;
        let mut seq = 0;
        for step in 0..600 {
            seq += 1;
            let account = names[usize::try_from(rng.below(4)).unwrap()].to_string();
            match rng.below(100) {
                // top-up
                0..=14 => {
                    let amount = 1 + rng.below(20);
                    s.topup(&account, amount, None, None, now).unwrap();
                    m.accounts.entry(account.clone()).or_default();
                    m.expire(&account, now);
                    m.accounts.get_mut(&account).unwrap().balance += amount;
                }
                // debit (sometimes a retry of an earlier one)
                15..=34 => {
                    let (key, acct, amount) = if rng.below(5) == 0 && !m.debits.is_empty() {
                        let i = usize::try_from(rng.below(m.debits.len() as u64)).unwrap();
                        let (k, (a, amt)) = m.debits.iter().nth(i).unwrap();
                        (k.clone(), a.clone(), *amt)
                    } else {
                        (format!("d{seq}"), account.clone(), 1 + rng.below(6))
                    };
                    let out = s.debit(&debit_req(&acct, amount, &key), now).unwrap();
                    if m.accounts.contains_key(&acct) {
                        m.expire(&acct, now);
                    }
                    let available = m.accounts.get(&acct).map_or(0, |a| a.balance);
                    match out {
                        DebitOutcome::Charged { replayed: true, .. } => {
                            assert!(m.debits.contains_key(&key), "step {step}");
                        }
                        DebitOutcome::Charged { replayed: false, balance, .. } => {
                            assert!(!m.debits.contains_key(&key));
                            let a = m.accounts.get_mut(&acct).unwrap();
                            a.balance -= amount;
                            assert_eq!(balance, a.balance, "step {step}");
                            m.debits.insert(key, (acct, amount));
                        }
                        DebitOutcome::Insufficient { balance, .. } => {
                            assert!(available < amount, "step {step}");
                            assert_eq!(balance, available, "step {step}");
                        }
                        other => panic!("step {step}: {other:?}"),
                    }
                }
                // hold
                35..=59 => {
                    let amount = 1 + rng.below(6);
                    let ttl = 1 + rng.below(30);
                    let key = format!("h{seq}");
                    let out = s
                        .create_hold(&hold_req(&account, amount, &key, ttl), None, now * MS)
                        .unwrap();
                    if m.accounts.contains_key(&account) {
                        m.expire(&account, now);
                    }
                    let available = m.accounts.get(&account).map_or(0, |a| a.balance);
                    match out {
                        HoldOutcome::Held(h) => {
                            let a = m.accounts.get_mut(&account).unwrap();
                            a.balance -= amount;
                            a.held += amount;
                            assert_eq!(h.balance, a.balance, "step {step}");
                            m.holds.push(ModelHold {
                                id: h.hold_id,
                                account: account.clone(),
                                amount,
                                expires_at: now + ttl,
                                state: HoldState::Open,
                                key,
                            });
                        }
                        HoldOutcome::Insufficient { .. } => assert!(available < amount, "step {step}"),
                        other => panic!("step {step}: {other:?}"),
                    }
                }
                // capture or release a random hold
                60..=84 if !m.holds.is_empty() => {
                    let i = usize::try_from(rng.below(m.holds.len() as u64)).unwrap();
                    let h = m.holds[i].clone();
                    let capture = rng.below(3) != 0;
                    let out = if capture {
                        s.capture_hold(&h.id, now).unwrap()
                    } else {
                        s.release_hold(&h.id, ReleaseReason::UpstreamError, now).unwrap()
                    };
                    m.expire(&h.account, now);
                    let state = m.holds[i].state;
                    let want = if capture { HoldState::Captured } else { HoldState::Released };
                    match (state, out) {
                        (HoldState::Open, SettleOutcome::Settled(r)) => {
                            assert_eq!(r.state, want, "step {step}");
                            let a = m.accounts.get_mut(&h.account).unwrap();
                            a.held -= h.amount;
                            if !capture {
                                a.balance += h.amount;
                            }
                            m.holds[i].state = want;
                            assert_eq!((r.balance, r.held), (a.balance, a.held), "step {step}");
                        }
                        (st, SettleOutcome::Settled(r)) => {
                            assert_eq!((st, r.state), (want, want), "step {step}")
                        }
                        (st, SettleOutcome::NotOpen { state }) => {
                            assert_eq!(st, state, "step {step}");
                            assert_ne!(st, want, "step {step}");
                        }
                        (st, other) => panic!("step {step}: {st:?} {other:?}"),
                    }
                }
                // refund a random debit or hold
                85..=91 => {
                    let keys: Vec<String> = m
                        .debits
                        .keys()
                        .cloned()
                        .chain(m.holds.iter().map(|h| h.key.clone()))
                        .collect();
                    if keys.is_empty() {
                        continue;
                    }
                    let key = keys[usize::try_from(rng.below(keys.len() as u64)).unwrap()].clone();
                    let out = s.refund(&key, None, now).unwrap();
                    let target = match m.debits.get(&key) {
                        Some((a, amt)) => Some((a.clone(), *amt, None)),
                        None => {
                            let h = m.holds.iter().find(|h| h.key == key).unwrap().clone();
                            m.expire(&h.account, now);
                            let h = m.holds.iter().find(|x| x.key == key).unwrap().clone();
                            (h.state == HoldState::Captured).then_some((h.account, h.amount, Some(h.state)))
                                .or_else(|| {
                                    assert_eq!(out, RefundOutcome::NotRefundable { state: h.state }, "step {step}");
                                    None
                                })
                        }
                    };
                    if let Some((acct, amount, _)) = target {
                        m.expire(&acct, now);
                        if m.refunded.contains(&key) {
                            assert!(matches!(out, RefundOutcome::AlreadyRefunded { .. }), "step {step}");
                        } else {
                            let a = m.accounts.get_mut(&acct).unwrap();
                            a.balance += amount;
                            let RefundOutcome::Refunded { balance, .. } = out else {
                                panic!("step {step}: {out:?}")
                            };
                            assert_eq!(balance, a.balance, "step {step}");
                            m.refunded.push(key);
                        }
                    }
                }
                // time passes
                _ => now += rng.below(8),
            }
            if step % 100 == 99 {
                assert_check_ok(&mut s);
            }
        }
        s.expire_holds(now).unwrap();
        let names: Vec<String> = m.accounts.keys().cloned().collect();
        for n in &names {
            m.expire(n, now);
        }
        for (name, a) in &m.accounts {
            assert_eq!(
                s.account_summary(name, now).unwrap().map(|x| (x.balance, x.held)),
                Some((a.balance, a.held)),
                "{name}"
            );
            assert_eq!(s.ledger_balance(name).unwrap(), a.balance);
        }
        let captured = m.holds.iter().filter(|h| h.state == HoldState::Captured).count();
        let released = m.holds.iter().filter(|h| h.state == HoldState::Released).count();
        assert!(captured > 10 && released > 10 && m.refunded.len() > 5, "{captured} {released} {}", m.refunded.len());
        assert_check_ok(&mut s);
    });
}

#[test]
fn concurrent_holds_then_captures_never_overdraw() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 50;
    each_backend(|b| {
        b.open().create_account("shared", 100, T0).unwrap();
        let barrier = Arc::new(Barrier::new(THREADS));
        let captured: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let barrier = Arc::clone(&barrier);
                    let mut store = b.open(); // one connection per thread
                    scope.spawn(move || {
                        barrier.wait();
                        let mut captured = 0usize;
                        for i in 0..PER_THREAD {
                            match store
                                .create_hold(&hold_req("shared", 1, &format!("t{t}-{i}"), 60), None, T0 * MS)
                                .unwrap()
                            {
                                HoldOutcome::Held(h) => {
                                    let SettleOutcome::Settled(s) = store.capture_hold(&h.hold_id, T0).unwrap() else {
                                        panic!("capture failed")
                                    };
                                    assert_eq!(s.state, HoldState::Captured);
                                    captured += 1;
                                }
                                HoldOutcome::Insufficient { required: 1, .. } => {}
                                other => panic!("unexpected outcome {other:?}"),
                            }
                        }
                        captured
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        let mut store = b.open();
        assert_eq!(captured, 100);
        assert_eq!(summary(&mut store, "shared", T0), (0, 0));
        assert_check_ok(&mut store);
        let report = store.check().unwrap();
        assert_eq!(report.ledger_rows, 1 + 2 * 100);
    });
}

/// The v1 schema exactly as shipped before the ledger existed.
const V1_SCHEMA: &str = r#"
    CREATE TABLE accounts (id TEXT PRIMARY KEY, balance INTEGER NOT NULL CHECK (balance >= 0), created_at INTEGER NOT NULL) STRICT;
    CREATE TABLE keys (key_sha256 TEXT PRIMARY KEY CHECK (length(key_sha256) = 64), prefix TEXT NOT NULL,
        account TEXT NOT NULL REFERENCES accounts(id), kind TEXT NOT NULL CHECK (kind IN ('api_key', 'api_token')),
        scopes TEXT NOT NULL DEFAULT '[]', name TEXT, created_at INTEGER NOT NULL, expires_at INTEGER,
        revoked_at INTEGER, last_used_at INTEGER) STRICT;
    CREATE INDEX keys_prefix ON keys(prefix);
    CREATE INDEX keys_account ON keys(account);
    CREATE TABLE debits (idempotency_key TEXT PRIMARY KEY, account TEXT NOT NULL REFERENCES accounts(id),
        amount INTEGER NOT NULL CHECK (amount >= 1), balance_after INTEGER NOT NULL CHECK (balance_after >= 0),
        route TEXT, key_prefix TEXT, created_at INTEGER NOT NULL) STRICT;
    CREATE INDEX debits_account ON debits(account, created_at);
    CREATE TABLE topups (id INTEGER PRIMARY KEY AUTOINCREMENT, account TEXT NOT NULL REFERENCES accounts(id),
        amount INTEGER NOT NULL CHECK (amount >= 1), created_at INTEGER NOT NULL, note TEXT,
        idempotency_key TEXT UNIQUE) STRICT;
    CREATE INDEX topups_account ON topups(account, created_at);
    PRAGMA user_version = 1;
"#;

#[test]
fn a_pre_ledger_database_migrates_and_passes_check() {
    let db = TempDb::new();
    let conn = rusqlite::Connection::open(&db.path).unwrap();
    conn.execute_batch(V1_SCHEMA).unwrap();
    conn.execute_batch(
        "INSERT INTO accounts VALUES ('consistent', 7, 100), ('unexplained', 4, 100), ('empty', 0, 100), ('spent', 0, 100);
         INSERT INTO topups (account, amount, created_at, note, idempotency_key) VALUES
            ('consistent', 10, 101, 'initial credits', NULL), ('consistent', 2, 102, NULL, 'pay-1'),
            ('spent', 3, 101, NULL, NULL);
         INSERT INTO debits VALUES ('c1', 'consistent', 5, 7, 'sms_send', 'abc12345', 103),
            ('u1', 'unexplained', 1, 4, NULL, NULL, 103), ('s1', 'spent', 3, 0, NULL, NULL, 104);
         INSERT INTO keys (key_sha256, prefix, account, kind, created_at) VALUES
            ('1111111111111111111111111111111111111111111111111111111111111111', 'cafef00d', 'consistent', 'api_key', 100);",
    )
    .unwrap();
    drop(conn);

    let mut s = Store::open(&db.path).unwrap();
    assert_eq!(s.schema_version().unwrap(), Store::supported_schema_version());
    assert_check_ok(&mut s);
    for (a, bal) in [("consistent", 7), ("unexplained", 4), ("empty", 0), ("spent", 0)] {
        assert_eq!(s.balance(a).unwrap(), Some(bal), "{a}");
        assert_eq!(s.ledger_balance(a).unwrap(), bal, "{a}");
    }
    let kinds = |s: &Store, a: &str| -> Vec<(String, i64, Option<String>)> {
        s.ledger(a, 100)
            .unwrap()
            .into_iter()
            .rev()
            .map(|e| (e.kind, e.amount, e.idempotency_key))
            .collect()
    };
    assert_eq!(
        kinds(&s, "consistent"),
        vec![
            ("topup".to_string(), 10, None),
            ("topup".to_string(), 2, Some("pay-1".to_string())),
            ("debit".to_string(), 5, Some("c1".to_string())),
        ]
    );
    // Top-ups that do not explain the balance: one opening top-up instead.
    assert_eq!(
        kinds(&s, "unexplained"),
        vec![("topup".to_string(), 5, None), ("debit".to_string(), 1, Some("u1".to_string()))]
    );
    assert!(kinds(&s, "empty").is_empty());
    // Old debits still replay; new operations work on the migrated file.
    assert!(matches!(
        s.debit(&debit_req("consistent", 5, "c1"), T0).unwrap(),
        DebitOutcome::Charged { replayed: true, balance: 7, .. }
    ));
    held(s.create_hold(&hold_req("consistent", 7, "h", 60), None, T0 * MS).unwrap());
    assert_eq!(summary(&mut s, "consistent", T0), (0, 7));
    assert!(matches!(s.refund("c1", None, T0).unwrap(), RefundOutcome::Refunded { balance: 5, .. }));
    assert_check_ok(&mut s);
    let report = s.check().unwrap();
    assert_eq!((report.accounts, report.ledger_rows), (4, 9));
}

#[test]
fn lookup_expires_holds_so_the_balance_is_current() {
    each_backend(|b: &TestBackend| {
        let mut s = b.open();
        s.create_account("a", 5, T0).unwrap();
        let key = s
            .create_key(
                &dialtone_credits::store::NewKey {
                    account: "a".into(),
                    kind: dialtone_credits::keys::KeyKind::ApiKey,
                    scopes: vec![],
                    name: None,
                    expiry: dialtone_credits::keys::Expiry::Never,
                },
                T0,
            )
            .unwrap();
        held(s.create_hold(&hold_req("a", 5, "h", 30), None, T0 * MS).unwrap());
        let hash = dialtone_credits::keys::sha256_hex(&key.secret);
        assert_eq!(s.lookup_key(&hash, T0 + 29).unwrap().unwrap().balance, 0);
        assert_eq!(s.lookup_key(&hash, T0 + 30).unwrap().unwrap().balance, 5);
        assert_check_ok(&mut s);
    });
}
