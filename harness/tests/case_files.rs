//! Every example policy's case file passes, through the same runner a
//! platform team uses in CI (`dialtone-harness run`).

mod common;

use dialtone_harness::cases;

#[test]
fn example_policy_case_files_pass() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".cases.yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "expected the example case files in {}", dir.display());
    let mut failures = Vec::new();
    let mut count = 0;
    for f in &files {
        for r in cases::run_file(common::wasm(), f).unwrap_or_else(|e| panic!("{}: {e:#}", f.display())) {
            count += 1;
            if !r.passed() {
                failures.push(format!("{} :: {}\n  {}\n  logs: {}", f.display(), r.name, r.diffs.join("\n  "), r.logs.join(" | ")));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {count} cases failed:\n{}", failures.len(), failures.join("\n"));
    assert!(count >= 20, "only {count} cases");
}

/// The runner reports what differed, for every kind of expectation.
#[test]
fn the_runner_reports_differences() {
    let dir = std::env::temp_dir().join(format!("dialtone-cases-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("wrong.cases.yaml");
    let config = common::demo_config();
    let yaml = format!(
        r#"
config: {config}
cases:
  - name: wrong status
    request: {{ path: /healthz }}
    expect: {{ status: 401 }}
  - name: wrong body field and missing callout
    request: {{ method: POST, path: /api/v1/sms/send, headers: {{ authorization: "Bearer {key}" }} }}
    callouts:
      - expect: {{ path: /v1/keys/lookup, body: {{ key_sha256: "0000" }}, body_absent: ["{sha}"] }}
        respond: {{ status: 404, body: {{ error: key_not_found }} }}
      - respond: timeout
    expect: {{ status: 401, body: {{ error: forbidden }} }}
  - name: unexpected callout and upstream header
    request: {{ method: POST, path: /api/v1/sms/send, headers: {{ authorization: "Bearer {key}" }} }}
    expect: {{ status: 200, upstream_headers: {{ x-dialtone-account: someone }} }}
  - name: steps, a wrong counter and a tick that calls nobody
    steps:
      - request: {{ path: /healthz }}
        expect: {{ status: 200 }}
        metrics: {{ dialtone.lease.granted: 1 }}
      - tick: true
        advance_ms: 200
        callouts:
          - respond: {{ status: 200, body: {{}} }}
  - name: a step that is both a tick and a request
    steps:
      - tick: true
        expect: {{ status: 200 }}
"#,
        config = config,
        key = common::API_KEY,
        sha = dialtone::bearer::sha256_hex(common::API_KEY.as_bytes()),
    );
    std::fs::write(&file, yaml).unwrap();
    let results = cases::run_file(common::wasm(), &file).unwrap();
    let diffs: Vec<String> = results.iter().map(|r| r.diffs.join(" | ")).collect();
    assert!(results.iter().all(|r| !r.passed()), "{diffs:?}");
    assert!(diffs[0].contains("status: expected 401 (a local reply), but the request was passed upstream"), "{}", diffs[0]);
    assert!(diffs[1].contains("callout #1 body.key_sha256: expected \"0000\""), "{}", diffs[1]);
    assert!(diffs[1].contains("which must not leave the filter"), "{}", diffs[1]);
    assert!(diffs[1].contains("body.error: expected \"forbidden\", got \"unauthorized\""), "{}", diffs[1]);
    assert!(diffs[1].contains("expected 2 callouts, the filter made 1"), "{}", diffs[1]);
    assert!(diffs[2].contains("unexpected callout #1"), "{}", diffs[2]);
    assert!(diffs[3].contains("step 1: metric dialtone.lease.granted: expected 1, got 0"), "{}", diffs[3]);
    assert!(diffs[3].contains("step 2: expected 1 callouts, the filter made 0"), "{}", diffs[3]);
    assert!(diffs[4].contains("could not run") && diffs[4].contains("step 1: a step is `tick: true`"), "{}", diffs[4]);
    let _ = std::fs::remove_dir_all(&dir);
}
