//! `dialtone-deploy package`: the filter as `dialtone.wasm` + sha256 + an OCI image layout.
//! `dialtone-deploy check`: the example manifests against the CRD schemas and the filter's config validation.

use std::path::PathBuf;

use dialtone_deploy::{k8s, oci};

const USAGE: &str = "usage:
  dialtone-deploy package [--wasm PATH] [--out DIR] [--tag TAG]
        writes DIR/dialtone.wasm, DIR/dialtone.wasm.sha256, DIR/image-digest and the
        OCI image layout DIR/oci (push: docs/packaging.md)
        defaults: --wasm target/wasm32-wasip1/wasm-release/dialtone.wasm (make wasm)
                  --out target/package   --tag the crate version
  dialtone-deploy check
        validates envoy/istio/*.yaml and envoy/gateway/*.yaml against the CRD
        schemas in envoy/crds, and every embedded plugin configuration with the
        filter's own validation

relative paths and the defaults are taken from the dialtone checkout: DIALTONE_ROOT,
else the one holding the current directory";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("package") => package(&args[1..]),
        Some("check") if args.len() == 1 => check(),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(USAGE.to_owned()),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// The checkout, for relative paths and defaults: only looked for when one is needed.
fn root_for_paths() -> Result<PathBuf, String> {
    dialtone_deploy::root().map_err(|e| format!("{e}, or give --wasm and --out as absolute paths"))
}

fn in_root(p: PathBuf) -> Result<PathBuf, String> {
    if p.is_absolute() {
        Ok(p)
    } else {
        root_for_paths().map(|r| r.join(p))
    }
}

fn package(args: &[String]) -> Result<(), String> {
    let (mut wasm, mut out) = (None, None);
    let mut tag = env!("CARGO_PKG_VERSION").to_owned();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--wasm" => wasm = Some(PathBuf::from(value)),
            "--out" => out = Some(PathBuf::from(value)),
            "--tag" => tag = value.clone(),
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    let wasm = match wasm {
        Some(p) => in_root(p)?,
        None => dialtone_deploy::default_wasm().map_err(|e| format!("{e}, or give --wasm (or DIALTONE_WASM)"))?,
    };
    let out = match out {
        Some(p) => in_root(p)?,
        None => root_for_paths()?.join("target/package"),
    };
    let p = oci::package(&wasm, &out, &tag)?;
    let digest = p.image.manifest_digest();
    println!("packaged {} ({} bytes) into {}", wasm.display(), p.wasm_len, out.display());
    println!("  dialtone.wasm sha256   {}  (HTTP sources; Envoy `vm_config.code.remote.sha256`)", p.image.wasm_sha256);
    println!("  image manifest digest  {digest}  (WasmPlugin / EnvoyExtensionPolicy `sha256`, without `sha256:`)");
    println!("  OCI layout             {}/oci, tag {tag}", out.display());
    println!("push: oras cp --from-oci-layout {}/oci:{tag} REGISTRY/REPO:{tag}", out.display());
    Ok(())
}

fn check() -> Result<(), String> {
    let root = dialtone_deploy::root()?;
    let dirs = [root.join("envoy/istio"), root.join("envoy/gateway")];
    let (count, problems) = k8s::check_dirs(&root.join("envoy/crds"), &dirs)?;
    if problems.is_empty() {
        println!("{count} manifests OK (CRD schemas + plugin configuration)");
        Ok(())
    } else {
        Err(format!("{} problem(s):\n{}", problems.len(), problems.join("\n")))
    }
}
