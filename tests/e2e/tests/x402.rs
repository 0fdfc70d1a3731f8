//! x402 v2 payments end to end: a real Envoy loading the built
//! `dialtone.wasm`, the reference x402 facilitator (`@x402/core` +
//! `@x402/evm`) on a local anvil chain with the TestUSDC token
//! (`scripts/x402-stack.sh`), payments signed by the reference client
//! (`node x402/pay.mjs`), token balances read on chain. Each test starts its
//! own stack (its own chain and facilitator on free ports), so tests run in
//! parallel. Nothing sleeps-then-asserts: every wait is for an observable
//! condition, bounded by a failure deadline.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use dialtone_e2e::{
    bearer, decode_b64_json, encode_b64_json, raw_request_complete, wait_for, with_x402, EnvoyStats, Fault, FaultServer, Resp, TestStack,
};
use serde_json::{json, Value};

/// An x402-paid route whose demo upstream echoes the request (`echo_paid`:
/// credits or x402, the demo's requirement of 10000 units).
const PAID: &str = "/echo/paid/x402";
const PRICE: u128 = 10_000;
const TOPUP: &str = "/api/v1/credits/top-up";
/// The top-up route's requirement: 1 USDC buys 100 credits.
const TOPUP_PRICE: u128 = 1_000_000;
const TOPUP_CREDITS: i64 = 100;
const USER: &str = "did:privy:x402-user";

/// The facilitator's reasons (`@x402/evm` 2.27.0, as x402/README.md lists them).
const IN_USE: &str = "this payment is already paying for another request";
const NONCE_USED: &str = "invalid_exact_evm_nonce_already_used";
const VALID_BEFORE: &str = "invalid_exact_evm_payload_authorization_valid_before";
const BAD_SIGNATURE: &str = "invalid_exact_evm_signature";
const NO_FUNDS: &str = "invalid_exact_evm_insufficient_balance";
const TX_FAILED: &str = "invalid_exact_evm_transaction_failed";
/// The filter's own reasons (refused before any callout).
const MISMATCH: &str = "the accepted requirements are not this resource's";
const NOT_BASE64: &str = "PAYMENT-SIGNATURE is not base64";
const NOT_JSON: &str = "PAYMENT-SIGNATURE is not a JSON object";
const TOO_LARGE: &str = "PAYMENT-SIGNATURE is too large";
const V1: &str = "x402 v1 (X-PAYMENT) is not accepted: pay with PAYMENT-SIGNATURE (x402 v2)";

const UNAVAILABLE: &str = r#"{"success":false,"error":"payment_unavailable"}"#;

/// One request on its own connection, read up to its `content-length`
/// (Envoy holds a locally answered `connection: close` request's socket up
/// to its 1 s delayed-close timeout: not worth waiting for, 402 after 402).
/// POSTs carry `{}`.
fn send(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
    let raw: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
    raw_request_complete(port, method, path, &raw, (method == "POST").then_some(&b"{}"[..]))
}

fn get(t: &TestStack, path: &str, headers: &[(&str, &str)]) -> Resp {
    send(t.stack.opts.ports.listen, "GET", path, headers)
}

fn post(t: &TestStack, path: &str, headers: &[(&str, &str)]) -> Resp {
    send(t.stack.opts.ports.listen, "POST", path, headers)
}

/// The TestUSDC balances of the payer and of payTo, on chain.
fn balances(t: &TestStack) -> (u128, u128) {
    let x = t.x402();
    (t.token_balance(&x.payer.address), t.token_balance(&x.pay_to))
}

/// The same balances read by `node x402/balance.mjs --stack DIR` (viem).
fn balances_by_node(t: &TestStack) -> (u128, u128) {
    let x = t.x402();
    let out = std::process::Command::new("node")
        .arg(t.stack.paths.root.join("x402/balance.mjs"))
        .args([&x.payer.address, &x.pay_to, "--stack"])
        .arg(&x.dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "balance.mjs: {}", String::from_utf8_lossy(&out.stderr));
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let units = |i: usize| rows[i]["balance"].as_str().unwrap().parse::<u128>().unwrap();
    (units(0), units(1))
}

/// Sends `method path` without a payment and returns the 402's
/// `PAYMENT-REQUIRED` value, after checking it offers the policy's own
/// requirement on the local chain.
fn payment_required(t: &TestStack, method: &str, path: &str, headers: &[(&str, &str)], amount: u128) -> String {
    let r = send(t.stack.opts.ports.listen, method, path, headers);
    let body = r.assert_refusal(402, "payment_required");
    let value = r.header("payment-required").unwrap_or_else(|| panic!("no PAYMENT-REQUIRED: {r:?}")).to_owned();
    let required = decode_b64_json(&value);
    assert_eq!(required["x402Version"], 2, "{required}");
    assert_eq!(required["accepts"], body["accepts"], "header and body offer the same");
    let accept = &required["accepts"][0];
    let x = t.x402();
    assert_eq!(accept["network"], x.network.as_str(), "{accept}");
    assert_eq!(accept["asset"].as_str().unwrap().to_lowercase(), x.asset.to_lowercase(), "{accept}");
    assert_eq!(accept["payTo"].as_str().unwrap().to_lowercase(), x.pay_to.to_lowercase(), "{accept}");
    assert_eq!(accept["amount"], amount.to_string(), "{accept}");
    value
}

/// A 402 `payment_required` for a payment that was sent: the body's
/// `reason` and the fresh `PAYMENT-REQUIRED`'s `error` both say `reason`.
fn assert_payment_refused(r: &Resp, reason: &str, what: &str) {
    assert_eq!(r.status, 402, "{what}: {}", r.body);
    let body = r.assert_refusal(402, "payment_required");
    assert_eq!(body["reason"], reason, "{what}: {body}");
    let fresh = decode_b64_json(r.header("payment-required").unwrap_or_else(|| panic!("{what}: no PAYMENT-REQUIRED")));
    assert_eq!(fresh["x402Version"], 2, "{what}");
    assert_eq!(fresh["error"], reason, "{what}: {fresh}");
    assert_eq!(fresh["accepts"], body["accepts"], "{what}");
    assert_eq!(r.header("payment-response"), None, "{what}: nothing was settled");
}

/// Requests the demo upstream received for `path`.
fn upstream_hits(t: &TestStack, path: &str) -> usize {
    t.stack.upstream_requests().unwrap().iter().filter(|r| r["path"] == path).count()
}

/// Lines of the facilitator's log (one per request) for `POST path`.
fn facilitator_calls(t: &TestStack, path: &str) -> usize {
    let log = std::fs::read_to_string(t.x402().dir.join("facilitator.log")).unwrap_or_default();
    log.lines().filter(|l| l.contains(&format!(" POST {path} "))).count()
}

/// Waits until the facilitator's log shows at least `n` calls of `path`
/// (it writes each line right after answering), then returns the count.
fn facilitator_calls_reach(t: &TestStack, path: &str, n: usize) -> usize {
    wait_for(
        &format!("{n} facilitator {path} calls logged"),
        Duration::from_secs(30),
        || Some(facilitator_calls(t, path)).filter(|c| *c >= n),
        || std::fs::read_to_string(t.x402().dir.join("facilitator.log")).unwrap_or_default(),
    )
}

/// The `PAYMENT-RESPONSE` of a settled payment, decoded and checked: success,
/// a 32-byte transaction hash, the route's network, the payer. Returns the hash.
fn settled_transaction(t: &TestStack, r: &Resp) -> String {
    let receipt = decode_b64_json(r.header("payment-response").unwrap_or_else(|| panic!("no PAYMENT-RESPONSE: {r:?}")));
    assert_eq!(receipt["success"], true, "{receipt}");
    assert_eq!(receipt["network"], t.x402().network.as_str(), "{receipt}");
    assert_eq!(receipt["payer"].as_str().unwrap().to_lowercase(), t.x402().payer.address.to_lowercase(), "{receipt}");
    let tx = receipt["transaction"].as_str().unwrap().to_owned();
    assert!(tx.len() == 66 && tx.starts_with("0x") && tx[2..].bytes().all(|b| b.is_ascii_hexdigit()), "{receipt}");
    tx
}

/// The transaction is mined, succeeded, and moved exactly `amount` of the
/// token from the payer to payTo (one ERC-20 `Transfer` log).
fn assert_transfer_on_chain(t: &TestStack, tx: &str, amount: u128) {
    const TRANSFER: &str = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef";
    let x = t.x402();
    let receipt = x.receipt(tx).unwrap();
    assert_eq!(receipt["status"], "0x1", "{receipt}");
    let topic = |address: &str| format!("0x{:0>64}", address.trim_start_matches("0x").to_lowercase());
    let transfers: Vec<&Value> = receipt["logs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["address"].as_str().unwrap().eq_ignore_ascii_case(&x.asset) && l["topics"][0] == TRANSFER)
        .collect();
    assert_eq!(transfers.len(), 1, "{receipt}");
    let log = transfers[0];
    assert_eq!(log["topics"][1].as_str().unwrap().to_lowercase(), topic(&x.payer.address), "{log}");
    assert_eq!(log["topics"][2].as_str().unwrap().to_lowercase(), topic(&x.pay_to), "{log}");
    let moved = u128::from_str_radix(log["data"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
    assert_eq!(moved, amount, "{log}");
}

/// Signs several payments at once (each `node x402/pay.mjs` start costs ~1 s).
fn sign_all(t: &TestStack, jobs: &[(String, Vec<String>)]) -> Vec<String> {
    std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(required, args)| {
                s.spawn(move || {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    t.pay(required, &args)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// `required` with `accepts[0][field]` changed: what a client that signs
/// other requirements than the route's declares.
fn edited(required: &str, field: &str, value: &str) -> String {
    let mut v = decode_b64_json(required);
    v["accepts"][0][field] = json!(value);
    encode_b64_json(&v)
}

fn stats(admin: u16) -> EnvoyStats {
    EnvoyStats::read(admin, "dialtone")
}

/// A valid payment reaches the upstream with the payment's identity, is
/// settled after the upstream's 2xx, and moves the price exactly once; its
/// replay is refused by the facilitator (nonce used) before the upstream;
/// an upstream 500 settles nothing (and the unsettled payment still pays
/// later).
#[test]
fn a_payment_is_settled_once_and_its_replay_is_refused() {
    let t = TestStack::start_x402("x402paid");
    let x = t.x402().clone();
    let required = payment_required(&t, "GET", PAID, &[], PRICE);
    let signed = sign_all(&t, &[(required.clone(), vec![]), (required.clone(), vec![])]);
    let (payment, second) = (&signed[0], &signed[1]);
    let (payer0, pay_to0) = balances(&t);
    assert_eq!(payer0, x.payer_balance);

    let r = get(&t, PAID, &[("payment-signature", payment)]);
    assert_eq!(r.status, 200, "{}", r.body);
    // The upstream is told who paid what, never an account.
    assert_eq!(r.echoed_header("x-dialtone-auth-method").as_deref(), Some("x402"));
    assert_eq!(r.echoed_header("x-dialtone-x402-payer").map(|p| p.to_lowercase()), Some(x.payer.address.to_lowercase()));
    assert_eq!(r.echoed_header("x-dialtone-x402-network").as_deref(), Some(x.network.as_str()));
    assert_eq!(r.echoed_header("x-dialtone-x402-amount").as_deref(), Some("10000"));
    assert_eq!(r.echoed_header("x-dialtone-x402-asset").map(|a| a.to_lowercase()), Some(x.asset.to_lowercase()));
    assert_eq!(r.echoed_header("x-dialtone-route").as_deref(), Some("echo_paid"));
    assert_eq!(r.echoed_header("x-dialtone-account"), None);
    assert_eq!(r.echoed_header("x-dialtone-x402-transaction"), None, "settled after the upstream answered");
    let tx = settled_transaction(&t, &r);
    assert_transfer_on_chain(&t, &tx, PRICE);
    assert_eq!(balances(&t), (payer0 - PRICE, pay_to0 + PRICE), "paid exactly once");
    assert_eq!(upstream_hits(&t, PAID), 1);

    // The same signed payment again: the facilitator says its nonce is used.
    let r = get(&t, PAID, &[("payment-signature", payment)]);
    assert_payment_refused(&r, NONCE_USED, "replay");
    assert_eq!(upstream_hits(&t, PAID), 1, "a replay never reaches the upstream");
    assert_eq!(balances(&t), (payer0 - PRICE, pay_to0 + PRICE));

    // The upstream fails: the client gets its 500, nothing is settled.
    let r = get(&t, PAID, &[("payment-signature", second), ("x-demo-status", "500")]);
    assert_eq!(r.status, 500, "{}", r.body);
    assert_eq!(r.header("payment-response"), None, "{r:?}");
    assert_eq!(r.json()["path"], PAID, "the upstream's own answer: {}", r.body);
    assert_eq!(upstream_hits(&t, PAID), 2);
    assert_eq!(balances(&t), (payer0 - PRICE, pay_to0 + PRICE), "an upstream failure costs nothing");
    // That payment was never settled: it still pays, once.
    let r = get(&t, PAID, &[("payment-signature", second)]);
    assert_eq!(r.status, 200, "{}", r.body);
    let tx2 = settled_transaction(&t, &r);
    assert_ne!(tx2, tx);
    assert_transfer_on_chain(&t, &tx2, PRICE);
    assert_eq!(balances(&t), (payer0 - 2 * PRICE, pay_to0 + 2 * PRICE));

    // The same numbers as the stack's own reader (viem) sees them.
    assert_eq!(balances_by_node(&t), (payer0 - 2 * PRICE, pay_to0 + 2 * PRICE));

    let envoy = stats(t.stack.opts.ports.admin);
    let (s, value) = (&envoy.0, |name: &str| envoy.value(name));
    assert_eq!(value("dialtone.x402.verified"), 3, "{s}");
    assert_eq!(value("dialtone.x402.settled"), 2, "{s}");
    assert_eq!(value("dialtone.x402.invalid.facilitator"), 1, "{s}");
    assert_eq!(value("dialtone.x402.settle_failed"), 0, "{s}");
    assert_eq!(value("dialtone.x402.unavailable"), 0, "{s}");
    assert_eq!(value("dialtone.allowed.x402"), 3, "{s}");
    // Three verifications, two settlements: nothing else reached the facilitator.
    assert_eq!(facilitator_calls_reach(&t, "/verify", 4), 4, "3 verified + 1 replay refused");
    assert_eq!(facilitator_calls_reach(&t, "/settle", 2), 2);
}

/// Every payment the filter or the facilitator refuses: a 402 that says
/// why, the upstream never called, nothing moved on chain. Requirements
/// other than the route's are refused by the filter before any callout.
#[test]
fn refused_payments_never_reach_the_upstream_and_move_nothing() {
    let t = TestStack::start_x402("x402refused");
    let required = payment_required(&t, "GET", PAID, &[], PRICE);
    let before = balances(&t);
    let past = (dialtone_e2e::tokens::now_unix() - 120).to_string();
    let wrong: [(&str, &str, &str); 4] = [
        ("wrong amount", "amount", "1"),
        ("wrong payTo", "payTo", "0x000000000000000000000000000000000000dEaD"),
        ("wrong network", "network", "eip155:84532"),
        ("wrong asset", "asset", "0x036CbD53842c5426634e7929541eC2318f3dCF7e"),
    ];
    let mut jobs: Vec<(String, Vec<String>)> = wrong.iter().map(|(_, f, v)| (edited(&required, f, v), vec![])).collect();
    jobs.push((required.clone(), vec!["--valid-before".into(), past]));
    jobs.push((required.clone(), vec![]));
    jobs.push((required.clone(), vec!["--key-env".into(), "X402_UNFUNDED_KEY".into()]));
    let signed = sign_all(&t, &jobs);

    // Local refusals first: nothing may reach the facilitator for them.
    for ((what, field, value), payment) in wrong.iter().zip(&signed) {
        // The client did sign (and declare) the other requirement.
        let payload = decode_b64_json(payment);
        assert_eq!(payload["accepted"][field], *value, "{what}: {payload}");
        let r = get(&t, PAID, &[("payment-signature", payment)]);
        assert_payment_refused(&r, MISMATCH, what);
    }
    let oversized = {
        let mut p = decode_b64_json(&signed[5]);
        p["resource"]["description"] = json!("x".repeat(9000));
        encode_b64_json(&p)
    };
    assert!(oversized.len() > 8192);
    for (what, header, value, reason) in [
        ("not base64", "payment-signature", "%%% not base64 %%%".to_owned(), NOT_BASE64),
        ("base64 of no JSON", "payment-signature", base64_of("not json"), NOT_JSON),
        ("base64 of broken JSON", "payment-signature", base64_of("{\"x402Version\": 2,"), NOT_JSON),
        ("oversized", "payment-signature", oversized, TOO_LARGE),
        ("v1 X-PAYMENT only", "x-payment", signed[5].clone(), V1),
    ] {
        let r = get(&t, PAID, &[(header, &value)]);
        assert_payment_refused(&r, reason, what);
    }
    assert_eq!(facilitator_calls(&t, "/verify") + facilitator_calls(&t, "/settle"), 0, "local refusals call nobody");

    // Refused by the facilitator: expired, tampered, unfunded.
    let tampered = {
        let mut p = decode_b64_json(&signed[5]);
        let sig = p["payload"]["signature"].as_str().unwrap().to_owned();
        // Flip one bit of one byte of r (the signature's first 32 bytes).
        let mut bytes = sig.into_bytes();
        bytes[10] = match bytes[10] {
            b'0' => b'1',
            _ => b'0',
        };
        p["payload"]["signature"] = json!(String::from_utf8(bytes).unwrap());
        encode_b64_json(&p)
    };
    for (what, payment, reason) in [
        ("expired validBefore", &signed[4], VALID_BEFORE),
        ("tampered signature", &tampered, BAD_SIGNATURE),
        ("unfunded payer", &signed[6], NO_FUNDS),
    ] {
        let r = get(&t, PAID, &[("payment-signature", payment)]);
        assert_payment_refused(&r, reason, what);
    }
    assert_eq!(upstream_hits(&t, PAID), 0, "no refused payment reached the upstream");
    assert_eq!(balances(&t), before, "nothing moved on chain");
    assert_eq!(t.token_balance(&t.x402().unfunded.address), 0);
    assert_eq!(facilitator_calls_reach(&t, "/verify", 3), 3, "one verification per facilitator refusal, none for the rest");
    assert_eq!(facilitator_calls(&t, "/settle"), 0);

    let envoy = stats(t.stack.opts.ports.admin);
    let (s, value) = (&envoy.0, |name: &str| envoy.value(name));
    assert_eq!(value("dialtone.x402.invalid.mismatch"), 4, "{s}");
    assert_eq!(value("dialtone.x402.invalid.facilitator"), 3, "{s}");
    assert_eq!(value("dialtone.x402.invalid.base64"), 1, "{s}");
    assert_eq!(value("dialtone.x402.invalid.json"), 2, "{s}");
    assert_eq!(value("dialtone.x402.invalid.too_large"), 1, "{s}");
    assert_eq!(value("dialtone.x402.invalid.v1"), 1, "{s}");
    assert_eq!((value("dialtone.x402.verified"), value("dialtone.x402.settled")), (0, 0), "{s}");
    assert_eq!(value("dialtone.x402.unavailable"), 0, "{s}");
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A facilitator that is down, slower than its timeout, answering 5xx or
/// garbage: 503 `payment_unavailable` (never a free pass), and the VM goes
/// on serving. After the upstream answered, a settlement that fails keeps
/// the response from the client (503), one the facilitator refuses turns
/// it into a 402 `payment_failed` with the failed receipt.
#[test]
fn an_unusable_facilitator_fails_closed() {
    let timeout_ms = 1000;
    let t = TestStack::start_full("x402faults", |cfg| cfg["x402_facilitator"]["timeout_ms"] = json!(timeout_ms), with_x402)
        .unwrap_or_else(|e| panic!("{e}"));
    let required = payment_required(&t, "GET", PAID, &[], PRICE);
    let payment = t.pay(&required, &[]);
    let before = balances(&t);
    let payer = t.x402().payer.address.clone();
    let serves = |what: &str| {
        let r = get(&t, "/echo/public/after", &[]);
        assert_eq!(r.status, 200, "after {what}: {}", r.body);
    };
    let unavailable = |what: &str| {
        let r = get(&t, PAID, &[("payment-signature", &payment)]);
        assert_eq!((r.status, r.body.as_str()), (503, UNAVAILABLE), "{what}");
        assert_eq!(r.header("payment-response"), None, "{what}");
        serves(what);
    };

    t.stack.stop_facilitator().unwrap();
    unavailable("facilitator down");
    let fault = FaultServer::start(t.stack.opts.ports.facilitator, Fault::Slow(Duration::from_secs(60)));
    let started = Instant::now();
    unavailable("facilitator slower than timeout_ms");
    assert!(started.elapsed() < Duration::from_secs(30), "the filter waited for the slow facilitator: {:?}", started.elapsed());
    assert!(fault.hits("/verify") >= 1);
    fault.set(Fault::ServerError);
    unavailable("facilitator 5xx");
    fault.set(Fault::Garbage);
    unavailable("facilitator garbage");
    assert_eq!(upstream_hits(&t, PAID), 0, "an unverified payment never reaches the upstream");

    // Verified, then the settlement fails: the upstream's answer is not delivered unpaid.
    let valid = json!({"isValid": true, "payer": payer}).to_string().into_bytes();
    let answer = move |settle: (u16, Value)| {
        let valid = valid.clone();
        move |path: &str, _: &str| if path == "/verify" { (200, valid.clone()) } else { (settle.0, settle.1.to_string().into_bytes()) }
    };
    fault.set_answer(answer((500, json!({"error": "boom"}))));
    let r = get(&t, PAID, &[("payment-signature", &payment)]);
    assert_eq!((r.status, r.body.as_str()), (503, UNAVAILABLE), "settlement 5xx");
    assert_eq!(upstream_hits(&t, PAID), 1, "verified: the upstream was called");
    assert_eq!(fault.hits("/settle"), 1, "a settlement is never sent twice");
    serves("settlement 5xx");
    // That payment stays claimed (it may have been settled): a copy is
    // refused, not served again.
    let r = get(&t, PAID, &[("payment-signature", &payment)]);
    assert_payment_refused(&r, IN_USE, "the claimed payment again");
    assert_eq!(upstream_hits(&t, PAID), 1, "not served twice");
    fault.set_answer(answer((200, json!({"success": false, "errorReason": "insufficient_funds", "transaction": "", "network": "eip155:31337"}))));
    let another = t.pay(&required, &[]);
    let r = get(&t, PAID, &[("payment-signature", &another)]);
    let b = r.assert_refusal(402, "payment_failed");
    assert_eq!(b["reason"], "insufficient_funds", "{b}");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let receipt = decode_b64_json(r.header("payment-response").unwrap());
    assert_eq!((receipt["success"].clone(), receipt["errorReason"].clone()), (json!(false), json!("insufficient_funds")), "{receipt}");
    assert_eq!(fault.hits("/settle"), 2);
    serves("settlement refused");
    drop(fault);

    assert_eq!(balances(&t), before, "nothing moved on chain");
    let envoy = stats(t.stack.opts.ports.admin);
    let (s, value) = (&envoy.0, |name: &str| envoy.value(name));
    assert_eq!(value("dialtone.x402.unavailable"), 5, "{s}");
    assert_eq!(value("dialtone.x402.settle_failed"), 1, "{s}");
    assert_eq!(value("dialtone.x402.verified"), 2, "{s}");
    assert_eq!(value("dialtone.x402.settled"), 0, "{s}");
    assert_eq!(value("dialtone.x402.invalid.in_use"), 1, "{s}");
    assert_eq!(value("dialtone.denied.payment_unavailable"), 5, "{s}");
    assert_eq!(upstream_hits(&t, PAID), 2, "the two verified, claimed payments");
}

/// One signed payment sent 8 times at once through 2 Envoys × 2 workers:
/// exactly one request is served, the others get 402, the chain moves once.
#[test]
fn one_payment_sent_concurrently_pays_once() {
    const COPIES: usize = 8;
    let mut t = TestStack::start_full(
        "x402race",
        |_| {},
        |o| {
            o.concurrency = 2;
            with_x402(o)
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let second = t.stack.add_envoy().unwrap();
    let ports = [t.stack.opts.ports.listen, second];
    let required = payment_required(&t, "GET", PAID, &[], PRICE);
    let payment = t.pay(&required, &[]);
    let before = balances(&t);

    let go = Arc::new(Barrier::new(COPIES));
    let answers: Vec<Resp> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..COPIES)
            .map(|i| {
                let (go, payment, port) = (go.clone(), payment.clone(), ports[i % 2]);
                s.spawn(move || {
                    go.wait();
                    raw_request_complete(port, "GET", PAID, &[("payment-signature", payment.as_bytes())], None)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let served: Vec<&Resp> = answers.iter().filter(|r| r.status == 200).collect();
    assert_eq!(served.len(), 1, "exactly one served: {answers:?}");
    let tx = settled_transaction(&t, served[0]);
    for r in answers.iter().filter(|r| r.status != 200) {
        assert_eq!(r.status, 402, "{r:?}");
        let b = r.json();
        match (b["error"].as_str(), b["reason"].as_str()) {
            // Refused at the claim: another copy is being served.
            (Some("payment_required"), Some(IN_USE)) => assert_payment_refused(r, IN_USE, "a losing copy"),
            // Refused at verification: the winner's settlement was mined.
            (Some("payment_required"), _) => assert_payment_refused(r, NONCE_USED, "a losing copy"),
            // Verified and claimed after the winner's claim was given back
            // (never while it is held), lost at settlement.
            (Some("payment_failed"), _) => {
                assert!([NONCE_USED, TX_FAILED].contains(&b["reason"].as_str().unwrap()), "{b}");
                assert_eq!(decode_b64_json(r.header("payment-response").unwrap())["success"], false);
            }
            _ => panic!("{r:?}"),
        }
    }
    assert_transfer_on_chain(&t, &tx, PRICE);
    assert_eq!(balances(&t), (before.0 - PRICE, before.1 + PRICE), "paid exactly once");

    let sum = |name: &str| -> u64 {
        [t.stack.opts.ports.admin, t.stack.more_envoy_ports()[0].1].iter().map(|a| stats(*a).value(name)).sum()
    };
    let (verified, settled, failed, refused) =
        (sum("dialtone.x402.verified"), sum("dialtone.x402.settled"), sum("dialtone.x402.settle_failed"), sum("dialtone.x402.invalid.facilitator"));
    let in_use = sum("dialtone.x402.invalid.in_use");
    assert_eq!(settled, 1);
    assert_eq!(failed, 0, "the claim holds until the winner settled: no copy reaches settlement");
    // `verified` counts payments verified and passed upstream (claimed).
    assert_eq!(verified, settled + failed, "every copy passed upstream was settled");
    assert_eq!(verified + in_use + refused, COPIES as u64, "the others refused at the claim or by the facilitator");
    assert_eq!(sum("dialtone.x402.unavailable"), 0);
    assert_eq!(upstream_hits(&t, PAID), 1, "served once: one payment, one upstream request");
}

/// Signs `n` payments for the top-up route's requirement (asked for with
/// the Bearer `auth`, as a client would).
fn top_up_payments(t: &TestStack, auth: &str, n: usize) -> Vec<String> {
    let required = payment_required(t, "POST", TOPUP, &[("authorization", auth)], TOPUP_PRICE);
    sign_all(t, &vec![(required, vec![]); n])
}

/// Top-up: the Bearer names the account, an x402 payment of the top-up
/// route's requirement pays, settled before the upstream credits it; the
/// account is credited once per settled payment, the ledger names the
/// transaction, a replay credits nothing.
#[test]
fn credits_top_up_paid_with_x402() {
    let t = TestStack::start_x402("x402topup");
    t.stack.create_account(USER, 5).unwrap();
    let key = t.stack.create_key(USER, &[], &[]).unwrap();
    let auth = bearer(&key);
    let signed = top_up_payments(&t, &auth, 2);
    let (first, second) = (&signed[0], &signed[1]);
    let before = balances(&t);

    let top_up = |payment: &str, credits: i64| -> String {
        let r = post(&t, TOPUP, &[("authorization", &auth), ("payment-signature", payment)]);
        assert_eq!(r.status, 200, "{}", r.body);
        let tx = settled_transaction(&t, &r);
        assert_transfer_on_chain(&t, &tx, TOPUP_PRICE);
        let b = r.json();
        assert_eq!(b, json!({"success": true, "credited": TOPUP_CREDITS, "credits": credits, "transaction": tx}), "the upstream's answer");
        assert_eq!(t.stack.balance(USER).unwrap(), credits);
        tx
    };
    let tx1 = top_up(first, 5 + TOPUP_CREDITS);
    assert_eq!(balances(&t), (before.0 - TOPUP_PRICE, before.1 + TOPUP_PRICE));

    // The same payment again: refused by the facilitator, nothing credited.
    let r = post(&t, TOPUP, &[("authorization", &auth), ("payment-signature", first)]);
    assert_payment_refused(&r, NONCE_USED, "top-up replay");
    assert_eq!(t.stack.balance(USER).unwrap(), 5 + TOPUP_CREDITS);
    assert_eq!(balances(&t), (before.0 - TOPUP_PRICE, before.1 + TOPUP_PRICE));

    let tx2 = top_up(second, 5 + 2 * TOPUP_CREDITS);
    assert_ne!(tx1, tx2);
    assert_eq!(balances(&t), (before.0 - 2 * TOPUP_PRICE, before.1 + 2 * TOPUP_PRICE));
    assert_eq!(upstream_hits(&t, TOPUP), 2, "the replay never reached the upstream");

    // The ledger: one top-up row per settled payment, naming its transaction.
    let ledger: Value = serde_json::from_str(&t.stack.cli(&["--json", "account", "ledger", USER]).unwrap()).unwrap();
    let topups: Vec<&Value> = ledger["entries"].as_array().unwrap().iter().filter(|e| e["kind"] == "topup").collect();
    let naming = |tx: &str| {
        topups
            .iter()
            .filter(|e| {
                ["reference", "idempotency_key"]
                    .iter()
                    .any(|f| e[*f].as_str().is_some_and(|v| v.to_lowercase().contains(&tx.to_lowercase())))
            })
            .count()
    };
    assert_eq!((naming(&tx1), naming(&tx2)), (1, 1), "one ledger row per transaction: {ledger}");
    assert_eq!(topups.len(), 3, "the initial credits and the two payments: {ledger}");
    let check = t.stack.cli(&["check"]).unwrap_or_else(|e| panic!("ledger check: {e}"));
    assert!(check.starts_with("ok"), "{check}");

    let envoy = stats(t.stack.opts.ports.admin);
    let (s, value) = (&envoy.0, |name: &str| envoy.value(name));
    assert_eq!(value("dialtone.x402.verified"), 2, "{s}");
    assert_eq!(value("dialtone.x402.settled"), 2, "{s}");
    assert_eq!(value("dialtone.x402.invalid.facilitator"), 1, "{s}");
}

/// The top-up route credits the account the Bearer names: a payment
/// without a Bearer names nobody, so it is refused (401) before anything is
/// verified or settled. Nothing moves on chain, the upstream is not called.
#[test]
fn a_top_up_without_a_bearer_pays_nothing() {
    let t = TestStack::start_x402("x402topupanon");
    t.stack.create_account(USER, 0).unwrap();
    let key = t.stack.create_key(USER, &[], &[]).unwrap();
    let payment = top_up_payments(&t, &bearer(&key), 1).remove(0);
    let before = balances(&t);
    let r = post(&t, TOPUP, &[("payment-signature", &payment)]);
    assert_eq!(upstream_hits(&t, TOPUP), 0, "the upstream was called: {r:?}");
    assert_eq!(balances(&t), before, "paid for a top-up that credits nobody: {r:?}");
    r.assert_refusal(401, "unauthorized");
    assert_eq!(facilitator_calls(&t, "/settle"), 0);
    // The same payment, with the Bearer, still pays (it was never settled).
    let r = post(&t, TOPUP, &[("authorization", &bearer(&key)), ("payment-signature", &payment)]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(t.stack.balance(USER).unwrap(), TOPUP_CREDITS);
}
