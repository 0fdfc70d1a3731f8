//! Credit leases at the edge: the VM's book of the leases it holds. Pure
//! logic; the glue sends the calls [`LeaseBook::due`] returns from the root
//! context's tick and hands their answers back.
//!
//! A lease is a hold of `credits` at the key/credits service that this VM
//! spends locally: a paid request of its account is charged here, with no
//! callout. Each spend keeps its idempotency key, route and key prefix and
//! is reported in a batch (every `report_ms`, and when the lease closes), so
//! the service's ledger still has one row per charged request.
//!
//! How the money rules stay intact:
//! - **Only with credits to spare.** The VM asks for a lease only after a
//!   per-request charge of the account showed available credits ≥
//!   `min_balance_factor × credits`; the service checks the same, under the
//!   account's lock, and declines otherwise. Near an empty balance no lease
//!   exists and every request is a per-request hold, exactly as without
//!   leases.
//! - **Never more than the lease.** A spend is taken from `remaining` before
//!   the request goes upstream; a lease with too little left serves nothing
//!   (the request falls back to a per-request charge). The service also
//!   refuses any spend past the lease.
//! - **Charge on success.** A spend waits (`reserved`) until the upstream
//!   answers: 2xx/3xx makes it a charge to report, anything else returns it
//!   to the lease.
//! - **Renewed before it runs out.** When the lease being spent has less
//!   than a quarter left and the service last said the account has room
//!   for another, the next lease is asked for; at most two are open per
//!   account (the one being spent and the next).
//! - **Given back.** A lease is returned (a `final` report) when it is
//!   spent, when it has been idle for `idle_ms`, when its local deadline
//!   (the service's expiry less two report rounds) passes, and when the
//!   service recalls it (a per-request charge of the account was refused
//!   while the lease held credits).
//! - **Bounded loss.** If the VM dies, what it spent since its last report
//!   is never recorded (the service closes the lease at its expiry and gives
//!   back the unspent credits): at most two leases' `credits`, and in
//!   practice the spends of one `report_ms`. Nothing is charged twice (each
//!   spend's key is recorded once) and nothing is overdrawn (spends come out
//!   of credits the service already holds).

use serde_json::{json, Value};

use crate::credits_api::{self, CallOutcome, ServiceError};
use crate::policy::LeaseConfig;

/// Spends per report (the service's own limit is 1000).
pub const MAX_SPENDS_PER_REPORT: usize = 500;
/// Accounts whose leases one VM keeps track of at most (a lease is worth
/// having only for an account busy on this VM; a short list is scanned).
pub const MAX_ACCOUNTS: usize = 256;

/// One charged request, to be reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spend {
    pub idempotency_key: String,
    pub amount: u64,
    pub route: Option<String>,
    pub key_prefix: Option<String>,
}

impl Spend {
    fn to_json(&self) -> Value {
        let mut v = json!({ "idempotency_key": self.idempotency_key, "amount": self.amount });
        if let Some(o) = v.as_object_mut() {
            if let Some(r) = &self.route {
                o.insert("route".into(), Value::from(r.as_str()));
            }
            if let Some(k) = &self.key_prefix {
                o.insert("key_prefix".into(), Value::from(k.as_str()));
            }
        }
        v
    }
}

/// A service answer as a JSON object (Value: the parser the x402 code
/// already brings, so leases add no deserializer to the .wasm).
fn answer_object(outcome: CallOutcome, not_found_ok: bool) -> Result<Option<Value>, ServiceError> {
    let (status, body) = credits_api::answered(outcome)?;
    match status {
        200 => credits_api::object::<Value>(&body).map(Some),
        404 if not_found_ok => Ok(None),
        other => Err(ServiceError::Status(other)),
    }
}

/// A request's claim on a lease, settled when the upstream answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub account: String,
    pub lease_id: String,
    pub spend: Spend,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Lease {
    id: String,
    credits: u64,
    remaining: u64,
    reserved: u64,
    /// No new spends from this time on (ms).
    spend_until_ms: i64,
    last_spend_ms: i64,
    last_report_ms: i64,
    unreported: Vec<Spend>,
    /// A report of these spends is in flight (`final` or not).
    reporting: Option<(Vec<Spend>, bool)>,
    /// Being given back: no new spends; the final report goes once nothing
    /// is reserved.
    closing: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Asking {
    No,
    /// A grant should be asked for at the next round.
    Wanted,
    InFlight { key: String },
    /// Declined (or failed) until then (ms).
    Declined { until_ms: i64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct AccountLeases {
    leases: Vec<Lease>,
    asking: Asking,
    /// Available credits the service last reported (outside any lease).
    available: i64,
}

/// What a lease call is about (the glue keeps it with the callout's token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseCallKind {
    Grant { account: String },
    Report { account: String, lease_id: String },
}

/// One call to the key/credits service for the leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseCall {
    pub path: String,
    pub body: Vec<u8>,
    pub kind: LeaseCallKind,
}

/// What happened to the book, for the VM's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseStats {
    pub spends: u32,
    pub granted: u32,
    pub declined: u32,
    pub reports: u32,
    pub returned: u32,
    pub recalled: u32,
    /// Spends the service refused or that could not be reported (lease
    /// closed under them): served, never charged.
    pub lost: u32,
}

/// Accounts and their leases: a short list (a map type of its own would
/// cost the .wasm more than the scan costs a request).
#[derive(Debug, Default)]
struct Accounts(Vec<(String, AccountLeases)>);

impl Accounts {
    fn get(&self, account: &str) -> Option<&AccountLeases> {
        self.0.iter().find(|(a, _)| a == account).map(|(_, e)| e)
    }
    fn get_mut(&mut self, account: &str) -> Option<&mut AccountLeases> {
        self.0.iter_mut().find(|(a, _)| a == account).map(|(_, e)| e)
    }
    fn contains_key(&self, account: &str) -> bool {
        self.get(account).is_some()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn insert(&mut self, account: String, e: AccountLeases) {
        self.0.push((account, e));
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// This VM's leases, per account.
#[derive(Debug, Default)]
pub struct LeaseBook {
    accounts: Accounts,
    /// Names this VM in lease requests (and makes their keys unique).
    holder: String,
    requests: u64,
    stats: LeaseStats,
}

/// What a report's answer says.
struct Reported {
    lease_id: String,
    open: bool,
    recall: bool,
    balance: i64,
    refused: usize,
}

fn valid_lease_id(id: &str) -> bool {
    id.len() <= 128 && id.starts_with("lease_") && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl LeaseBook {
    /// `holder` names this VM (its requests' idempotency keys start with it).
    pub fn new(holder: String) -> LeaseBook {
        LeaseBook { holder, ..LeaseBook::default() }
    }

    fn idle_ms(cfg: &LeaseConfig) -> i64 {
        i64::try_from(cfg.report_ms.saturating_mul(10).max(2000)).unwrap_or(i64::MAX)
    }

    /// The name this VM gives itself in lease requests.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Takes `amount` for a request from the account's lease, if one can
    /// pay it now. `None`: charge this request the usual way.
    pub fn try_spend(&mut self, account: &str, spend: Spend, now_ms: i64) -> Option<Ticket> {
        let entry = self.accounts.get_mut(account)?;
        // The oldest open lease pays; a spent or expiring one is given back
        // and the next (asked for when the first ran low) takes over.
        for lease in entry.leases.iter_mut().filter(|l| !l.closing) {
            if now_ms >= lease.spend_until_ms || lease.remaining < spend.amount {
                lease.closing = true;
                continue;
            }
            lease.remaining -= spend.amount;
            lease.reserved += spend.amount;
            lease.last_spend_ms = now_ms;
            self.stats.spends += 1;
            return Some(Ticket { account: account.to_owned(), lease_id: lease.id.clone(), spend });
        }
        None
    }

    /// Credits this VM believes the account has (the service's last word on
    /// available credits plus what its open lease still holds): the
    /// `x-dialtone-credits-remaining` of a leased request.
    pub fn believed_balance(&self, account: &str) -> Option<i64> {
        let entry = self.accounts.get(account)?;
        let leased: u64 = entry.leases.iter().filter(|l| !l.closing).map(|l| l.remaining).sum();
        Some(entry.available.saturating_add(i64::try_from(leased).unwrap_or(i64::MAX)))
    }

    /// The upstream answered (`charged`: 2xx/3xx) or never did.
    pub fn settle(&mut self, ticket: Ticket, charged: bool) {
        let Some(lease) = self
            .accounts
            .get_mut(&ticket.account)
            .and_then(|e| e.leases.iter_mut().find(|l| l.id == ticket.lease_id))
        else {
            // The lease is gone (closed by the service): a charge can no
            // longer be recorded.
            if charged {
                self.stats.lost += 1;
            }
            return;
        };
        lease.reserved = lease.reserved.saturating_sub(ticket.spend.amount);
        if charged {
            lease.unreported.push(ticket.spend);
        } else {
            lease.remaining += ticket.spend.amount;
        }
    }

    /// A per-request charge of `account` succeeded and left `available`
    /// credits: ask for a lease if there is room for one.
    pub fn charged(&mut self, cfg: &LeaseConfig, account: &str, available: i64, now_ms: i64) {
        let needed = cfg.credits.saturating_mul(cfg.min_balance_factor);
        let room = u64::try_from(available).is_ok_and(|a| a >= needed);
        if !self.accounts.contains_key(account) {
            if !room || self.accounts.len() >= MAX_ACCOUNTS {
                return;
            }
            self.accounts
                .insert(account.to_owned(), AccountLeases { leases: Vec::new(), asking: Asking::No, available });
        }
        let Some(entry) = self.accounts.get_mut(account) else { return };
        entry.available = available;
        if !room || entry.leases.iter().any(|l| !l.closing) {
            return;
        }
        match entry.asking {
            Asking::No => entry.asking = Asking::Wanted,
            Asking::Declined { until_ms } if now_ms >= until_ms => entry.asking = Asking::Wanted,
            _ => {}
        }
    }

    /// The calls to send now: lease requests, reports and returns.
    pub fn due(&mut self, cfg: &LeaseConfig, now_ms: i64) -> Vec<LeaseCall> {
        let idle_ms = Self::idle_ms(cfg);
        let report_ms = i64::try_from(cfg.report_ms).unwrap_or(i64::MAX);
        let mut calls = Vec::new();
        let holder = self.holder.clone();
        let needed = i64::try_from(cfg.credits.saturating_mul(cfg.min_balance_factor)).unwrap_or(i64::MAX);
        for (account, entry) in self.accounts.0.iter_mut() {
            // Running low (under a quarter left) with room to spare: ask for
            // the next lease now, so requests never wait for one. At most
            // two open leases per account: the one being spent and the next.
            let mut open = entry.leases.iter().filter(|l| !l.closing);
            let low = match (open.next(), open.next()) {
                (Some(l), None) => l.remaining.saturating_mul(4) < l.credits,
                _ => false,
            };
            if low && entry.available >= needed {
                match entry.asking {
                    Asking::No => entry.asking = Asking::Wanted,
                    Asking::Declined { until_ms } if now_ms >= until_ms => entry.asking = Asking::Wanted,
                    _ => {}
                }
            }
            if entry.asking == Asking::Wanted {
                self.requests += 1;
                let key = format!("{holder}:{}", self.requests);
                let body = json!({
                    "account": account,
                    "credits": cfg.credits,
                    "ttl_seconds": cfg.ttl_seconds,
                    "min_balance_factor": cfg.min_balance_factor,
                    "idempotency_key": key,
                    "holder": holder,
                })
                .to_string()
                .into_bytes();
                calls.push(LeaseCall {
                    path: cfg.path.clone(),
                    body,
                    kind: LeaseCallKind::Grant { account: account.clone() },
                });
                entry.asking = Asking::InFlight { key };
            }
            // Only the lease being spent can be idle (the next one waits).
            let mut first_open = true;
            for lease in entry.leases.iter_mut() {
                let idle = first_open && now_ms.saturating_sub(lease.last_spend_ms) >= idle_ms;
                if !lease.closing && (now_ms >= lease.spend_until_ms || idle) {
                    lease.closing = true;
                }
                if !lease.closing {
                    first_open = false;
                }
                if lease.reporting.is_some() {
                    continue;
                }
                let final_report = lease.closing && lease.reserved == 0;
                // An open lease reports every report_ms even with nothing
                // spent (its answer is how a recall reaches us); a closing
                // one only carries spends until its final report.
                let due = final_report
                    || lease.unreported.len() >= MAX_SPENDS_PER_REPORT
                    || (now_ms.saturating_sub(lease.last_report_ms) >= report_ms
                        && (!lease.closing || !lease.unreported.is_empty()));
                if !due {
                    continue;
                }
                let n = lease.unreported.len().min(MAX_SPENDS_PER_REPORT);
                let batch: Vec<Spend> = lease.unreported.drain(..n).collect();
                // A final report carries every spend (more than one batch's
                // worth: the rest go first, in non-final reports).
                let final_report = final_report && lease.unreported.is_empty();
                let spends: Vec<Value> = batch.iter().map(Spend::to_json).collect();
                let body = json!({ "spends": spends, "final": final_report }).to_string().into_bytes();
                calls.push(LeaseCall {
                    path: format!("{}/{}/report", cfg.path, lease.id),
                    body,
                    kind: LeaseCallKind::Report { account: account.clone(), lease_id: lease.id.clone() },
                });
                lease.last_report_ms = now_ms;
                lease.reporting = Some((batch, final_report));
            }
        }
        self.stats.reports += u32::try_from(calls.iter().filter(|c| matches!(c.kind, LeaseCallKind::Report { .. })).count())
            .unwrap_or(u32::MAX);
        // Accounts with nothing left to track are forgotten.
        self.accounts.0.retain(|(_, e)| !e.leases.is_empty() || e.asking != Asking::No);
        calls
    }

    /// A lease request was answered (or failed).
    pub fn granted(&mut self, cfg: &LeaseConfig, account: &str, outcome: CallOutcome, now_ms: i64) {
        let Some(entry) = self.accounts.get_mut(account) else { return };
        let retry_ms = i64::try_from(cfg.report_ms.saturating_mul(5).max(1000)).unwrap_or(i64::MAX);
        entry.asking = Asking::Declined { until_ms: now_ms.saturating_add(retry_ms) };
        let Ok(Some(g)) = answer_object(outcome, false) else { return };
        let (Some(granted), Some(balance)) = (g.get("granted").and_then(Value::as_bool), g.get("balance").and_then(Value::as_i64))
        else {
            return;
        };
        if balance >= 0 {
            entry.available = balance;
        }
        if !granted {
            self.stats.declined += 1;
            return;
        }
        let (Some(id), Some(credits)) = (g.get("lease_id").and_then(Value::as_str), g.get("credits").and_then(Value::as_u64))
        else {
            return;
        };
        // Trust only the lease we asked for, for this account and size.
        if !valid_lease_id(id) || g.get("account").and_then(Value::as_str) != Some(account) || credits != cfg.credits || balance < 0 {
            return;
        }
        if entry.leases.iter().any(|l| l.id == id) {
            entry.asking = Asking::No;
            return;
        }
        let id = id.to_owned();
        let ttl = g.get("ttl_seconds").and_then(Value::as_u64).unwrap_or(cfg.ttl_seconds).min(cfg.ttl_seconds);
        let ttl_ms = i64::try_from(ttl.saturating_mul(1000)).unwrap_or(i64::MAX);
        let report_ms = i64::try_from(cfg.report_ms).unwrap_or(i64::MAX);
        let lease = Lease {
            id,
            credits,
            remaining: credits,
            reserved: 0,
            // Stop two report rounds before the service's expiry, so the
            // last spends reach it while the lease is open.
            spend_until_ms: now_ms.saturating_add(ttl_ms).saturating_sub(report_ms.saturating_mul(2)),
            last_spend_ms: now_ms,
            last_report_ms: now_ms,
            unreported: Vec::new(),
            reporting: None,
            // A third open lease (a replayed answer): return it.
            closing: entry.leases.iter().filter(|l| !l.closing).count() >= 2,
        };
        entry.leases.push(lease);
        entry.asking = Asking::No;
        self.stats.granted += 1;
    }

    /// A report was answered (or failed). `true`: it was recorded and more
    /// is due now (a backlog of full batches, or the final report), so the
    /// glue sends the next round at once instead of at the next tick: a
    /// busy lease is never reported slower than it is spent. A failed
    /// report waits for the next tick.
    pub fn reported(&mut self, account: &str, lease_id: &str, outcome: CallOutcome) -> bool {
        let Some(entry) = self.accounts.get_mut(account) else { return false };
        let Some(pos) = entry.leases.iter().position(|l| l.id == lease_id) else { return false };
        let Some(lease) = entry.leases.get_mut(pos) else { return false };
        let Some((batch, final_report)) = lease.reporting.take() else { return false };
        let answer = answer_object(outcome, true).and_then(|v| match v {
            None => Ok(None),
            Some(v) => match (
                v.get("lease_id").and_then(Value::as_str),
                v.get("state").and_then(Value::as_str),
                v.get("balance").and_then(Value::as_i64),
            ) {
                (Some(id), Some(state), Some(balance)) => Ok(Some(Reported {
                    lease_id: id.to_owned(),
                    open: state == "open",
                    recall: v.get("recall").and_then(Value::as_bool).unwrap_or(false),
                    balance,
                    refused: v.get("refused").and_then(Value::as_array).map_or(0, Vec::len),
                })),
                _ => Err(ServiceError::Garbage),
            },
        });
        match answer {
            // Not recorded (the service is down or said something we cannot
            // read): the same spends go again next round (idempotent).
            Err(_) => {
                let mut again = batch;
                again.append(&mut lease.unreported);
                lease.unreported = again;
            }
            // The service does not know the lease: nothing more can be recorded.
            Ok(None) => {
                let lost = batch.len() + lease.unreported.len();
                self.stats.lost += u32::try_from(lost).unwrap_or(u32::MAX);
                entry.leases.remove(pos);
            }
            Ok(Some(r)) => {
                if r.lease_id != lease_id {
                    let mut again = batch;
                    again.append(&mut lease.unreported);
                    lease.unreported = again;
                    return false;
                }
                if r.balance >= 0 {
                    entry.available = r.balance;
                }
                self.stats.lost += u32::try_from(r.refused).unwrap_or(u32::MAX);
                if !r.open {
                    // Closed: by our final report, or by the service (expired).
                    if final_report {
                        self.stats.returned += 1;
                    }
                    let lost = lease.unreported.len();
                    self.stats.lost += u32::try_from(lost).unwrap_or(u32::MAX);
                    // Requests still reserved on it are charged nowhere: the
                    // `settle` of their tickets counts them as lost.
                    entry.leases.remove(pos);
                } else {
                    if r.recall && !lease.closing {
                        lease.closing = true;
                        self.stats.recalled += 1;
                    }
                    return lease.unreported.len() >= MAX_SPENDS_PER_REPORT || (lease.closing && lease.reserved == 0);
                }
            }
        }
        false
    }

    /// Spends not yet recorded by the service (queued or in a report in flight).
    pub fn unreported(&self) -> usize {
        self.accounts
            .0
            .iter()
            .flat_map(|(_, e)| e.leases.iter())
            .map(|l| l.unreported.len() + l.reporting.as_ref().map_or(0, |(b, _)| b.len()))
            .sum()
    }

    /// Whether any lease or request is being tracked (the glue's tick
    /// needs to run).
    pub fn is_busy(&self) -> bool {
        !self.accounts.is_empty()
    }

    pub fn take_stats(&mut self) -> LeaseStats {
        std::mem::take(&mut self.stats)
    }

    /// Open (not closing) lease of an account: (id, remaining, reserved).
    pub fn active(&self, account: &str) -> Option<(&str, u64, u64)> {
        self.accounts
            .get(account)?
            .leases
            .iter()
            .find(|l| !l.closing)
            .map(|l| (l.id.as_str(), l.remaining, l.reserved))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LeaseConfig {
        LeaseConfig { credits: 10, report_ms: 200, ttl_seconds: 30, min_balance_factor: 4, path: "/v1/leases".into() }
    }

    fn spend(key: &str, amount: u64) -> Spend {
        Spend { idempotency_key: key.into(), amount, route: Some("sms_send".into()), key_prefix: Some("abcd1234".into()) }
    }

    fn ok(body: serde_json::Value) -> CallOutcome {
        CallOutcome::Answered { status: 200, body: body.to_string().into_bytes(), truncated: false }
    }

    fn grant_answer(id: &str, balance: i64) -> CallOutcome {
        ok(serde_json::json!({ "granted": true, "lease_id": id, "account": "acct", "credits": 10, "balance": balance, "ttl_seconds": 30 }))
    }

    fn report_answer(id: &str, state: &str, recall: bool) -> CallOutcome {
        ok(serde_json::json!({ "lease_id": id, "state": state, "recall": recall, "balance": 50, "refused": [] }))
    }

    /// A book holding a granted lease `lease_a` of 10 for `acct`, at t = 0.
    fn leased() -> LeaseBook {
        let mut book = LeaseBook::new("vm-1".into());
        book.charged(&cfg(), "acct", 100, 0);
        let calls = book.due(&cfg(), 0);
        assert_eq!(calls.len(), 1);
        let body: serde_json::Value = serde_json::from_slice(&calls[0].body).unwrap();
        assert_eq!(body["credits"], 10);
        assert_eq!(body["min_balance_factor"], 4);
        assert_eq!(body["idempotency_key"], "vm-1:1");
        book.granted(&cfg(), "acct", grant_answer("lease_a", 90), 0);
        book
    }

    #[test]
    fn no_lease_is_asked_for_without_room_to_spare() {
        let mut book = LeaseBook::new("vm-1".into());
        book.charged(&cfg(), "acct", 39, 0);
        assert!(book.due(&cfg(), 0).is_empty());
        assert!(book.try_spend("acct", spend("k", 1), 0).is_none());
        book.charged(&cfg(), "acct", 40, 0);
        assert_eq!(book.due(&cfg(), 0).len(), 1);
        // Only one request in flight at a time.
        book.charged(&cfg(), "acct", 40, 1);
        assert!(book.due(&cfg(), 1).is_empty());
    }

    #[test]
    fn spends_come_out_of_the_lease_and_are_reported_once_each() {
        let mut book = leased();
        assert_eq!(book.believed_balance("acct"), Some(100));
        let t1 = book.try_spend("acct", spend("sms_send:r1", 3), 10).unwrap();
        let t2 = book.try_spend("acct", spend("sms_send:r2", 3), 11).unwrap();
        assert_eq!(book.active("acct"), Some(("lease_a", 4, 6)));
        // Charge on success: a failed upstream gives its credits back.
        book.settle(t1, true);
        book.settle(t2, false);
        assert_eq!(book.active("acct"), Some(("lease_a", 7, 0)));
        // Not yet report_ms: nothing to send.
        assert!(book.due(&cfg(), 100).is_empty());
        let calls = book.due(&cfg(), 200);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].path, "/v1/leases/lease_a/report");
        let body: serde_json::Value = serde_json::from_slice(&calls[0].body).unwrap();
        assert_eq!(body["spends"].as_array().unwrap().len(), 1);
        assert_eq!(body["spends"][0]["idempotency_key"], "sms_send:r1");
        assert_eq!(body["final"], false);
        // A failed report is sent again with the same spends.
        book.reported("acct", "lease_a", CallOutcome::Failed);
        let calls = book.due(&cfg(), 400);
        let body: serde_json::Value = serde_json::from_slice(&calls[0].body).unwrap();
        assert_eq!(body["spends"][0]["idempotency_key"], "sms_send:r1");
        book.reported("acct", "lease_a", report_answer("lease_a", "open", false));
        assert_eq!(book.unreported(), 0);
    }

    #[test]
    fn a_spent_lease_falls_back_and_is_returned() {
        let mut book = leased();
        let t = book.try_spend("acct", spend("k1", 9), 10).unwrap();
        book.settle(t, true);
        // 1 left, 3 asked: this request is charged the usual way and the
        // lease is given back with a final report.
        assert!(book.try_spend("acct", spend("k2", 3), 11).is_none());
        let calls = book.due(&cfg(), 12);
        assert_eq!(calls.len(), 1);
        let body: serde_json::Value = serde_json::from_slice(&calls[0].body).unwrap();
        assert_eq!(body["final"], true);
        assert_eq!(body["spends"][0]["idempotency_key"], "k1");
        book.reported("acct", "lease_a", report_answer("lease_a", "closed", false));
        assert_eq!(book.active("acct"), None);
        assert_eq!(book.take_stats().returned, 1);
    }

    #[test]
    fn a_lease_running_low_brings_the_next_one_before_it_runs_out() {
        let mut book = leased();
        // 10 credits, 9 spent: under a quarter left, and 90 available ≥ 40.
        let t = book.try_spend("acct", spend("k1", 9), 10).unwrap();
        book.settle(t, true);
        let calls = book.due(&cfg(), 20);
        assert_eq!(calls.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(), ["/v1/leases"]);
        book.granted(&cfg(), "acct", grant_answer("lease_b", 70), 20);
        // The next one waits while the first is spent, idle or not.
        let t = book.try_spend("acct", spend("k2", 1), 1_500).unwrap();
        assert_eq!(t.lease_id, "lease_a");
        book.settle(t, true);
        let beats = book.due(&cfg(), 2_500);
        assert!(!beats.is_empty() && beats.iter().all(|c| !String::from_utf8_lossy(&c.body).contains("\"final\":true")));
        for id in ["lease_a", "lease_b"] {
            book.reported("acct", id, report_answer(id, "open", false));
        }
        // The first is spent: the next pays, no request waits for a grant.
        let t = book.try_spend("acct", spend("k3", 1), 2_600).unwrap();
        assert_eq!(t.lease_id, "lease_b");
        book.settle(t, true);
        let calls = book.due(&cfg(), 2_700);
        let ret = calls.iter().find(|c| c.path == "/v1/leases/lease_a/report").unwrap();
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&ret.body).unwrap()["final"], true);
        assert!(calls.iter().all(|c| c.path != "/v1/leases"), "lease_b is not low: no third lease");
        // A replayed grant of a lease already held adds nothing.
        book.charged(&cfg(), "acct", 100, 2_800);
        book.granted(&cfg(), "acct", grant_answer("lease_b", 70), 2_800);
        assert_eq!(book.active("acct"), Some(("lease_b", 9, 0)));

        // Low, but the service said there is no room for another: none asked.
        let mut tight = leased();
        assert_eq!(tight.due(&cfg(), 200).len(), 1, "a heartbeat");
        tight.reported("acct", "lease_a", ok(serde_json::json!({ "lease_id": "lease_a", "state": "open", "recall": false, "balance": 39, "refused": [] })));
        let t = tight.try_spend("acct", spend("k1", 9), 210).unwrap();
        tight.settle(t, true);
        assert!(tight.due(&cfg(), 220).is_empty());
    }

    #[test]
    fn a_busy_lease_reports_full_batches_back_to_back_but_not_after_a_failure() {
        let big = LeaseConfig { credits: 5_000, ..cfg() };
        let mut book = LeaseBook::new("vm-1".into());
        book.charged(&big, "acct", 100_000, 0);
        let _ = book.due(&big, 0);
        book.granted(&big, "acct", ok(serde_json::json!({ "granted": true, "lease_id": "lease_a", "account": "acct", "credits": 5_000, "balance": 95_000 })), 0);
        for i in 0..1_100 {
            let t = book.try_spend("acct", spend(&format!("k{i}"), 1), 1).unwrap();
            book.settle(t, true);
        }
        let batch = |calls: Vec<LeaseCall>| -> usize {
            assert_eq!(calls.len(), 1);
            serde_json::from_slice::<serde_json::Value>(&calls[0].body).unwrap()["spends"].as_array().unwrap().len()
        };
        assert_eq!(batch(book.due(&big, 2)), MAX_SPENDS_PER_REPORT);
        // Recorded, 600 left: the next full batch is due at once.
        assert!(book.reported("acct", "lease_a", report_answer("lease_a", "open", false)));
        assert_eq!(batch(book.due(&big, 3)), MAX_SPENDS_PER_REPORT);
        // A failure waits for the tick (no retry loop against a service that is down).
        assert!(!book.reported("acct", "lease_a", CallOutcome::Failed));
        assert_eq!(book.unreported(), 600);
        assert_eq!(batch(book.due(&big, 4)), MAX_SPENDS_PER_REPORT, "600 queued: a full batch is due");
        // 100 left: they wait for the next round.
        assert!(!book.reported("acct", "lease_a", report_answer("lease_a", "open", false)));
        assert!(book.due(&big, 5).is_empty());
        assert_eq!(batch(book.due(&big, 205)), 100);
    }

    #[test]
    fn a_closing_lease_waits_for_requests_in_flight() {
        let mut book = leased();
        let t = book.try_spend("acct", spend("k1", 2), 10).unwrap();
        book.reported("acct", "lease_a", report_answer("lease_a", "open", true)); // not in flight: ignored
        let _ = book.due(&cfg(), 200); // a heartbeat report
        book.reported("acct", "lease_a", report_answer("lease_a", "open", true));
        assert_eq!(book.take_stats().recalled, 1);
        // Recalled: no new spends, and no final report while k1 is upstream.
        assert!(book.try_spend("acct", spend("k2", 1), 201).is_none());
        assert!(book.due(&cfg(), 400).iter().all(|c| !String::from_utf8_lossy(&c.body).contains("\"final\":true")));
        book.settle(t, true);
        let calls = book.due(&cfg(), 600);
        assert_eq!(calls.len(), 1);
        let body: serde_json::Value = serde_json::from_slice(&calls[0].body).unwrap();
        assert_eq!((body["final"].as_bool(), body["spends"][0]["idempotency_key"].as_str()), (Some(true), Some("k1")));
    }

    #[test]
    fn leases_stop_before_they_expire_and_when_idle() {
        let mut book = leased();
        // spend_until = 30 s − 2 × 200 ms.
        assert!(book.try_spend("acct", spend("k1", 1), 29_599).is_some());
        assert!(book.try_spend("acct", spend("k2", 1), 29_600).is_none());
        let mut idle = leased();
        let calls = idle.due(&cfg(), 2_000);
        let body: serde_json::Value = serde_json::from_slice(&calls[0].body).unwrap();
        assert_eq!(body["final"], true, "idle for 10 × report_ms (at least 2 s): given back");
    }

    #[test]
    fn answers_that_do_not_fit_grant_nothing() {
        for answer in [
            ok(serde_json::json!({ "granted": true, "lease_id": "lease_x", "account": "other", "credits": 10, "balance": 1 })),
            ok(serde_json::json!({ "granted": true, "lease_id": "lease_x", "account": "acct", "credits": 11, "balance": 1 })),
            ok(serde_json::json!({ "granted": true, "lease_id": "hold_x", "account": "acct", "credits": 10, "balance": 1 })),
            ok(serde_json::json!({ "granted": true, "lease_id": "lease_x", "account": "acct", "credits": 10, "balance": -1 })),
            ok(serde_json::json!({ "granted": false, "balance": 3 })),
            ok(serde_json::json!([1, 2])),
            CallOutcome::Answered { status: 500, body: b"{}".to_vec(), truncated: false },
            CallOutcome::Failed,
        ] {
            let mut book = LeaseBook::new("vm".into());
            book.charged(&cfg(), "acct", 100, 0);
            let _ = book.due(&cfg(), 0);
            book.granted(&cfg(), "acct", answer, 0);
            assert!(book.try_spend("acct", spend("k", 1), 1).is_none());
            // Asked again only after a pause.
            book.charged(&cfg(), "acct", 100, 2);
            assert!(book.due(&cfg(), 2).is_empty());
            book.charged(&cfg(), "acct", 100, 1_000);
            assert_eq!(book.due(&cfg(), 1_000).len(), 1);
        }
    }

    #[test]
    fn a_lease_the_service_closed_counts_its_unrecorded_spends_as_lost() {
        let mut book = leased();
        let t = book.try_spend("acct", spend("k1", 1), 10).unwrap();
        book.settle(t, true);
        let _ = book.due(&cfg(), 200);
        book.reported(
            "acct",
            "lease_a",
            ok(serde_json::json!({ "lease_id": "lease_a", "state": "closed", "balance": 5, "refused": [{ "idempotency_key": "k1", "reason": "lease_closed" }] })),
        );
        assert_eq!(book.take_stats().lost, 1);
        assert_eq!(book.active("acct"), None);
    }
}
