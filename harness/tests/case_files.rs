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
