//! The `dialtone-credits` binary end to end: operator commands and `serve`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{get, post, TempDb};
use dialtone_credits::keys;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_dialtone-credits");

fn run(db: &TempDb, args: &[&str]) -> Output {
    Command::new(BIN)
        .env("DIAL_SERVICE_KEY", common::SERVICE_KEY)
        .arg("--db")
        .arg(&db.path)
        .args(args)
        .output()
        .unwrap()
}

fn ok_json(db: &TempDb, args: &[&str]) -> Value {
    let out = run(db, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn failing(db: &TempDb, args: &[&str], code: i32) -> String {
    let out = run(db, args);
    assert_eq!(out.status.code(), Some(code), "{args:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    stderr
}

#[test]
fn account_commands() {
    let db = TempDb::new();
    let v = ok_json(
        &db,
        &[
            "account",
            "create",
            "did:privy:a",
            "--credits",
            "50",
            "--json",
        ],
    );
    assert_eq!(
        v,
        json!({ "account": "did:privy:a", "balance": 50, "created": true })
    );
    // Idempotent.
    let v = ok_json(
        &db,
        &["account", "create", "did:privy:a", "--credits=10", "--json"],
    );
    assert_eq!(
        v,
        json!({ "account": "did:privy:a", "balance": 50, "created": false })
    );
    let v = ok_json(
        &db,
        &[
            "--json",
            "account",
            "topup",
            "did:privy:a",
            "25",
            "--note",
            "promo",
        ],
    );
    assert_eq!(
        v,
        json!({ "account": "did:privy:a", "credited": 25, "balance": 75 })
    );
    let v = ok_json(&db, &["account", "show", "did:privy:a", "--json"]);
    assert_eq!(
        v,
        json!({ "account": "did:privy:a", "balance": 75, "total_credits": 75 })
    );

    let out = run(&db, &["account", "show", "did:privy:a"]);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "account did:privy:a balance 75\n"
    );

    assert!(failing(&db, &["account", "show", "did:privy:zzz"], 1).contains("account not found"));
    failing(&db, &["account", "topup", "did:privy:a", "0"], 2);
    failing(&db, &["account", "topup", "did:privy:a", "-5"], 2);
    failing(&db, &["account", "topup", "did:privy:a"], 2);
    failing(
        &db,
        &["account", "show", "did:privy:a", "--credits", "1"],
        2,
    );
}

#[test]
fn key_commands() {
    let db = TempDb::new();
    let created = ok_json(
        &db,
        &[
            "key",
            "create",
            "did:privy:k",
            "--kind",
            "api_token",
            "--scopes",
            "sms:send,contacts_read",
            "--expires",
            "30d",
            "--name",
            "laptop",
            "--json",
        ],
    );
    let secret = created["secret"].as_str().unwrap().to_string();
    let prefix = created["prefix"].as_str().unwrap().to_string();
    assert!(secret.starts_with("privy_") && secret.len() == 46);
    assert_eq!(prefix, secret[6..14]);
    assert_eq!(created["account"], "did:privy:k");
    assert_eq!(created["kind"], "api_token");
    assert_eq!(created["scopes"], json!(["sms:send", "contacts_read"]));
    assert!(created["expires_at"].is_i64());
    // The account was created on the fly.
    assert_eq!(
        ok_json(&db, &["account", "show", "did:privy:k", "--json"])["balance"],
        0
    );

    // Text mode prints the secret once and warns on stderr.
    let out = run(&db, &["key", "create", "did:privy:k"]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("secret: dial_live_"), "{stdout}");
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("not stored"));

    let list = run(&db, &["key", "list", "did:privy:k", "--json"]);
    let list_text = String::from_utf8(list.stdout).unwrap();
    assert!(!list_text.contains(&secret));
    assert!(!list_text.contains(&keys::sha256_hex(&secret)));
    let rows: Value = serde_json::from_str(&list_text).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2);
    assert_eq!(rows[0]["prefix"], prefix);
    assert_eq!(rows[0]["state"], "active");
    assert_eq!(rows[0]["name"], "laptop");

    let text = String::from_utf8(run(&db, &["key", "list", "did:privy:k"]).stdout).unwrap();
    assert!(text.starts_with("PREFIX"), "{text}");
    assert!(text.contains(&prefix));

    let v = ok_json(&db, &["key", "revoke", &prefix, "--json"]);
    assert_eq!(v["prefix"], prefix);
    assert_eq!(v["kind"], "api_token");
    let rows = ok_json(&db, &["key", "list", "did:privy:k", "--json"]);
    assert_eq!(rows[0]["state"], "revoked");
    assert!(failing(&db, &["key", "revoke", &prefix], 1).contains("no active key"));

    // Usage errors.
    failing(
        &db,
        &["key", "create", "did:privy:k", "--expires", "30d"],
        2,
    );
    failing(
        &db,
        &[
            "key",
            "create",
            "did:privy:k",
            "--kind",
            "api_token",
            "--expires",
            "7d",
        ],
        2,
    );
    failing(&db, &["key", "create", "did:privy:k", "--kind", "other"], 2);
    failing(
        &db,
        &["key", "create", "did:privy:k", "--scopes", "bad scope"],
        2,
    );
    failing(&db, &["key", "frobnicate"], 2);
    failing(&db, &[], 2);
    failing(&db, &["--bogus"], 2);
}

#[test]
fn help_prints_usage() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .starts_with("usage: dialtone-credits"));
}

/// Kills the child on drop so a failing assertion does not leak a server.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_prints_addresses_and_serves_both_apis() {
    let db = TempDb::new();
    let created = ok_json(
        &db,
        &[
            "key",
            "create",
            "did:privy:s",
            "--scopes",
            "sms:send",
            "--json",
        ],
    );
    let secret = created["secret"].as_str().unwrap();
    ok_json(&db, &["account", "topup", "did:privy:s", "5", "--json"]);

    let mut child = Child(
        Command::new(BIN)
            .env("DIAL_SERVICE_KEY", common::SERVICE_KEY)
            .arg("--db")
            .arg(&db.path)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--upstream-listen",
                "127.0.0.1:0",
                "--workers",
                "2",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // `listening credits=ADDR upstream=ADDR self_service=none`
    let mut fields = line.trim_end().split(' ');
    assert_eq!(fields.next(), Some("listening"));
    let credits = fields
        .next()
        .unwrap()
        .strip_prefix("credits=")
        .unwrap()
        .to_string();
    let upstream = fields
        .next()
        .unwrap()
        .strip_prefix("upstream=")
        .unwrap()
        .to_string();
    assert_eq!(fields.next(), Some("self_service=none"), "{line}");
    assert!(fields.next().is_none(), "{line}");

    assert_eq!(get(&format!("http://{credits}/healthz")).status, 200);
    assert_eq!(get(&format!("http://{upstream}/healthz")).status, 200);
    let r = post(
        &format!("http://{credits}/v1/keys/lookup"),
        &json!({ "key_sha256": keys::sha256_hex(secret) }).to_string(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json["account"], "did:privy:s");
    assert_eq!(r.json["balance"], 5);
    assert_eq!(r.json["state"], "active");

    let r = common::call(
        "GET",
        &format!("http://{upstream}/api/v1/account"),
        &[("x-dialtone-account", "did:privy:s")],
        None,
    );
    assert_eq!(r.json["credits"], 5);
    drop(child);
}

#[test]
fn serve_reports_bind_failure() {
    let db = TempDb::new();
    let out = run(&db, &["serve", "--listen", "127.0.0.1:notaport"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .starts_with("error: cannot listen"));
    let out = run(&db, &["serve"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn ledger_refund_check_and_agent_preset_commands() {
    let db = TempDb::new();
    ok_json(&db, &["account", "create", "did:privy:r", "--credits", "10", "--json"]);
    let mut store = db.open();
    store
        .debit(
            &dialtone_credits::store::DebitRequest {
                account: "did:privy:r".into(),
                amount: 4,
                idempotency_key: "sms_send:req-9".into(),
                route: Some("sms_send".into()),
                key_prefix: None,
            },
            1_700_000_000,
        )
        .unwrap();
    drop(store);

    let out = run(&db, &["check"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "ok: 1 accounts, 2 ledger rows\n");
    let v = ok_json(&db, &["check", "--json"]);
    assert_eq!(v, json!({ "ok": true, "accounts": 1, "ledger_rows": 2, "problems": [] }));

    let v = ok_json(&db, &["refund", "sms_send:req-9", "--note", "sms failed", "--json"]);
    assert_eq!(
        v,
        json!({ "refunded": 4, "account": "did:privy:r", "balance": 10,
                "idempotency_key": "sms_send:req-9", "hold_id": null })
    );
    assert!(failing(&db, &["refund", "sms_send:req-9"], 1).contains("already refunded"));
    assert!(failing(&db, &["refund", "nope"], 1).contains("nothing to refund"));
    failing(&db, &["refund"], 2);

    let v = ok_json(&db, &["account", "ledger", "did:privy:r", "--json"]);
    let kinds: Vec<&str> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["refund", "debit", "topup"]);
    assert_eq!(v["entries"][0]["note"], "sms failed");
    let v = ok_json(&db, &["account", "ledger", "did:privy:r", "--limit", "1", "--json"]);
    assert_eq!(v["entries"].as_array().unwrap().len(), 1);
    let out = run(&db, &["account", "ledger", "did:privy:r"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("refund") && text.contains("sms_send:req-9"), "{text}");
    assert!(failing(&db, &["account", "ledger", "did:privy:none"], 1).contains("account not found"));

    let v = ok_json(&db, &["key", "create", "did:privy:r", "--preset", "agent", "--json"]);
    assert_eq!(v["kind"], "api_key");
    assert_eq!(v["scopes"], json!(["sms:send"]));
    let listed = ok_json(&db, &["key", "list", "did:privy:r", "--json"]);
    assert_eq!(listed[0]["name"], "agent key");
    failing(&db, &["key", "create", "did:privy:r", "--preset", "robot"], 2);
    failing(&db, &["key", "create", "did:privy:r", "--preset", "agent", "--kind", "api_token"], 2);

    // Money that appears outside the ledger is reported; exit 1.
    let conn = rusqlite::Connection::open(&db.path).unwrap();
    conn.execute("UPDATE accounts SET balance = 99", []).unwrap();
    drop(conn);
    let out = run(&db, &["check"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("account did:privy:r: balance 99 != ledger sum of delta_available 10"), "{text}");
    assert!(String::from_utf8(out.stderr).unwrap().starts_with("error: check failed"));
}
