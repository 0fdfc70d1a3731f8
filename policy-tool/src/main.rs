//! `dialtone-policy`: validate, convert, explain dialtone policies.

use std::io::Write;
use std::process::ExitCode;

use dialtone_policy::{convert_text, explain, report_lines, validate_text, Format, Outcome, SCHEMA_TEXT};

const USAGE: &str = "\
usage:
  dialtone-policy validate FILE...          check policies (YAML or JSON); every error, one per line
  dialtone-policy convert FILE [-o OUT]     valid policy -> compact JSON for Envoy's `configuration`
  dialtone-policy explain FILE              table of the routes of a valid policy
  dialtone-policy schema                    print the JSON Schema of the policy

FILE is YAML (.yaml/.yml) or JSON (.json); other names are tried as JSON, then YAML.
`-` reads standard input. Exit status: 0 valid, 1 invalid, 2 usage or I/O error.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("dialtone-policy: {msg}");
            ExitCode::from(2)
        }
    }
}

fn read(file: &str) -> Result<String, String> {
    if file == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map_err(|e| format!("stdin: {e}"))?;
        return Ok(s);
    }
    std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))
}

fn run(args: &[String]) -> Result<ExitCode, String> {
    let Some((cmd, rest)) = args.split_first() else {
        return Err(format!("missing command\n{USAGE}"));
    };
    match cmd.as_str() {
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        "validate" => {
            if rest.is_empty() {
                return Err(format!("validate needs at least one FILE\n{USAGE}"));
            }
            let mut all_ok = true;
            let mut out = std::io::stdout().lock();
            for file in rest {
                let text = match read(file) {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = writeln!(out, "{e}");
                        all_ok = false;
                        continue;
                    }
                };
                let outcome = validate_text(&text, Format::from_path(file));
                all_ok &= matches!(outcome, Outcome::Valid { .. });
                for line in report_lines(file, &outcome) {
                    let _ = writeln!(out, "{line}");
                }
            }
            Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        "convert" => {
            let (file, output) = match rest {
                [f] => (f, None),
                [f, o, out] | [o, out, f] if o == "-o" || o == "--output" => (f, Some(out)),
                _ => return Err(format!("convert takes FILE [-o OUT]\n{USAGE}")),
            };
            let text = read(file)?;
            match convert_text(&text, Format::from_path(file)) {
                Ok(json) => {
                    match output {
                        Some(path) if path != "-" => {
                            std::fs::write(path, format!("{json}\n")).map_err(|e| format!("{path}: {e}"))?;
                        }
                        _ => println!("{json}"),
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(outcome) => {
                    for line in report_lines(file, &outcome) {
                        eprintln!("{line}");
                    }
                    eprintln!("{file}: not converted: fix the errors above first");
                    Ok(ExitCode::from(1))
                }
            }
        }
        "explain" => {
            let [file] = rest else {
                return Err(format!("explain takes one FILE\n{USAGE}"));
            };
            let text = read(file)?;
            match validate_text(&text, Format::from_path(file)) {
                Outcome::Valid { policy, .. } => {
                    print!("{}", explain(&policy));
                    Ok(ExitCode::SUCCESS)
                }
                other => {
                    for line in report_lines(file, &other) {
                        eprintln!("{line}");
                    }
                    Ok(ExitCode::from(1))
                }
            }
        }
        "schema" => {
            if !rest.is_empty() {
                return Err(format!("schema takes no arguments\n{USAGE}"));
            }
            print!("{SCHEMA_TEXT}");
            Ok(ExitCode::SUCCESS)
        }
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    }
}
