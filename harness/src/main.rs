//! `dialtone-harness run [--wasm FILE] [--verbose] CASES.yaml…`: runs case
//! files against the compiled filter, no Envoy needed. One line per case, a
//! summary, exit status 1 if any case failed (2 if a file could not be run).

use std::path::PathBuf;
use std::process::ExitCode;

use dialtone_harness::{cases, default_wasm_path, Wasm};

const USAGE: &str = "usage: dialtone-harness run [--wasm FILE] [--verbose] CASES.yaml...
  --wasm FILE   the filter to test (default: $DIALTONE_WASM, else target/wasm32-wasip1/wasm-release/dialtone.wasm
                in the dialtone checkout: $DIALTONE_ROOT, else the one holding the current directory)
  --verbose     print the filter's log lines for every case, not only failing ones
case file format: docs/case-files.md";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("run") {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    let mut wasm_path = None;
    let mut verbose = false;
    let mut files = Vec::new();
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--wasm" => match it.next() {
                Some(p) => wasm_path = Some(PathBuf::from(p)),
                None => {
                    eprintln!("--wasm needs a file\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "--verbose" | "-v" => verbose = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            f => files.push(PathBuf::from(f)),
        }
    }
    if files.is_empty() {
        eprintln!("no case files given\n{USAGE}");
        return ExitCode::from(2);
    }
    let wasm_path = match wasm_path.map_or_else(default_wasm_path, Ok) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let wasm = match Wasm::from_file(&wasm_path) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: cannot load {}: {e:#}", wasm_path.display());
            return ExitCode::from(2);
        }
    };
    let (mut passed, mut failed, mut broken) = (0usize, 0usize, 0usize);
    for file in &files {
        match cases::run_file(&wasm, file) {
            Err(e) => {
                println!("ERROR {}: {e:#}", file.display());
                broken += 1;
            }
            Ok(results) => {
                for r in results {
                    if r.passed() {
                        passed += 1;
                        println!("ok    {} :: {}", file.display(), r.name);
                    } else {
                        failed += 1;
                        println!("FAIL  {} :: {}", file.display(), r.name);
                        for d in &r.diffs {
                            println!("        {d}");
                        }
                    }
                    if verbose || !r.passed() {
                        for l in &r.logs {
                            println!("        log {l}");
                        }
                    }
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if broken > 0 {
        println!("{broken} case file(s) could not be run");
        return ExitCode::from(2);
    }
    if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
