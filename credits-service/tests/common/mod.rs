//! Helpers shared by the integration tests.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use dialtone_credits::store::Store;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// A temp directory holding one database file; removed on drop.
pub struct TempDb {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl TempDb {
    pub fn new() -> TempDb {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credits.db");
        TempDb { dir, path }
    }

    pub fn open(&self) -> Store {
        Store::open(&self.path).unwrap()
    }

    pub fn shared(&self) -> Arc<Mutex<Store>> {
        Arc::new(Mutex::new(self.open()))
    }
}

/// Result of one HTTP call: status, content-type, parsed JSON body.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub content_type: String,
    pub json: Value,
}

fn finish(result: Result<ureq::Response, ureq::Error>) -> Resp {
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = response.status();
    let content_type = response
        .header("content-type")
        .unwrap_or_default()
        .to_string();
    let text = response.into_string().unwrap();
    let json =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("non-JSON body {text:?}: {e}"));
    Resp {
        status,
        content_type,
        json,
    }
}

pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().build()
}

/// Send `method url` with optional body and extra headers.
pub fn call(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> Resp {
    let mut req = agent().request(method, url);
    for (n, v) in headers {
        req = req.set(n, v);
    }
    finish(match body {
        Some(b) => req.set("content-type", "application/json").send_string(b),
        None => req.call(),
    })
}

pub fn get(url: &str) -> Resp {
    call("GET", url, &[], None)
}

pub fn post(url: &str, body: &str) -> Resp {
    call("POST", url, &[], Some(body))
}
