//! The filter proves itself to the key/credits service with `DIAL_SERVICE_KEY`
//! (the `x-dialtone-service-key` callout header), and the key is rotated
//! through Envoy with no failed request: the service accepts the old and the
//! new key (its key file, re-read on SIGHUP), a new Envoy sends the new key
//! and takes the traffic, the old key is dropped. An Envoy still sending the
//! old key is then refused, fail closed (503), with a log line that says why.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use dialtone_e2e::{bearer, raw_request, raw_request_complete, wait_for, TestStack};

const USER: &str = "did:privy:e2e-rotation";
const SMS: &str = "/api/v1/sms/send";
const SMS_BODY: &str = r#"{"to":"+18148835337","message":"rotating"}"#;

/// A direct call to the service's balance with `key` (the filter's own route).
fn direct_status(t: &TestStack, key: &str) -> u16 {
    let path = format!("/v1/accounts/{}", USER.replace(':', "%3A"));
    raw_request(t.stack.opts.ports.credits, "GET", &path, &[("x-dialtone-service-key", key.as_bytes())], None).status
}

#[test]
fn the_service_key_rotates_through_envoy_with_no_failed_request() {
    let mut t = TestStack::start("rotation");
    t.stack.create_account(USER, 100_000).unwrap();
    let api_key = t.stack.create_key(USER, &["sms:send"], &[]).unwrap();
    let old = t.stack.service_key.clone();
    let new = format!("rotated-{}", dialtone_e2e::devstack::random_hex(24).unwrap());
    assert_eq!((direct_status(&t, &old), direct_status(&t, &new)), (200, 401), "before: only the old key");
    assert_eq!(direct_status(&t, ""), 401);

    let first_envoy = t.stack.opts.ports.listen;
    let target = AtomicU16::new(first_envoy);
    let stop = AtomicBool::new(false);
    let answers: Mutex<Vec<(u16, u16, String)>> = Mutex::new(Vec::new());
    let served = || answers.lock().unwrap().len();
    let auth = bearer(&api_key);
    std::thread::scope(|scope| {
        // Paid requests, one after another, to whichever Envoy is current.
        scope.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let port = target.load(Ordering::SeqCst);
                let r = raw_request_complete(port, "POST", SMS, &[("authorization", auth.as_bytes())], Some(SMS_BODY.as_bytes()));
                answers.lock().unwrap().push((port, r.status, r.body));
            }
        });
        let after = |n: usize, what: &str| {
            let goal = served() + n;
            wait_for(what, Duration::from_secs(120), || (served() >= goal).then_some(()), || format!("{} answers", served()));
        };
        after(20, "traffic through the first Envoy");
        // (1) The service accepts the new key as well as the old one.
        t.stack.set_service_keys(&[&new, &old]).unwrap();
        wait_for("the service to take the new key", Duration::from_secs(30), || (direct_status(&t, &new) == 200).then_some(()), String::new);
        assert_eq!(direct_status(&t, &old), 200, "and still the old one");
        after(20, "traffic while both keys are accepted");
        // (2) A new Envoy sends the new key; the traffic moves to it.
        t.stack.service_key = new.clone();
        let second_envoy = t.stack.add_envoy().unwrap();
        target.store(second_envoy, Ordering::SeqCst);
        after(20, "traffic through the new Envoy");
        // (3) The old key is dropped.
        t.stack.set_service_keys(&[&new]).unwrap();
        wait_for("the service to drop the old key", Duration::from_secs(30), || (direct_status(&t, &old) == 401).then_some(()), String::new);
        after(20, "traffic after the old key is gone");
        stop.store(true, Ordering::SeqCst);
    });
    let answers = answers.into_inner().unwrap();
    let failed: Vec<_> = answers.iter().filter(|(_, s, _)| *s != 200).collect();
    assert!(failed.is_empty(), "{} of {} requests failed during the rotation: {failed:?}", failed.len(), answers.len());
    assert!(answers.iter().any(|(p, _, _)| *p == first_envoy) && answers.iter().any(|(p, _, _)| *p != first_envoy));
    // Each served request was charged once.
    assert_eq!(t.stack.balance(USER).unwrap(), 100_000 - answers.len() as i64);

    // An Envoy still sending the old key: refused by the service, so the
    // filter fails closed, and says why.
    let r = raw_request_complete(first_envoy, "POST", SMS, &[("authorization", auth.as_bytes())], Some(SMS_BODY.as_bytes()));
    assert_eq!((r.status, r.body.as_str()), (503, r#"{"success":false,"error":"credits_unavailable"}"#));
    let log = t.stack.log("envoy");
    assert!(log.contains("refused this filter's service key (DIAL_SERVICE_KEY)"), "{}", t.stack.log_tail("envoy"));
    assert!(!log.contains(&old) && !log.contains(&new), "a service key in Envoy's log");
    assert!(!t.stack.log("credits").contains(&new), "a service key in the service's log");
}
