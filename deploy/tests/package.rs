//! `dialtone-deploy package`: the OCI image layout is self-consistent
//! (index -> manifest -> config + layer, digests and sizes), the layer holds
//! exactly the .wasm as `plugin.wasm`, and the output is deterministic.

// Test helpers fail loudly (as the repository's other test files do).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use dialtone_deploy::oci::{self, sha256_hex};
use serde_json::Value;

fn tiny_wasm() -> Vec<u8> {
    // A valid empty module plus a custom section, so the content is not trivial.
    let mut w = b"\0asm\x01\0\0\0".to_vec();
    let payload = b"\x04testhello dialtone";
    w.push(0);
    w.push(payload.len() as u8);
    w.extend_from_slice(payload);
    w
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// Reads a blob by descriptor, checking digest and size.
fn blob(oci: &Path, desc: &Value) -> Vec<u8> {
    let digest = desc["digest"].as_str().unwrap();
    let hex = digest.strip_prefix("sha256:").unwrap();
    let bytes = std::fs::read(oci.join("blobs/sha256").join(hex)).unwrap();
    assert_eq!(sha256_hex(&bytes), hex, "blob content does not match its digest");
    assert_eq!(desc["size"].as_u64().unwrap(), bytes.len() as u64, "descriptor size");
    bytes
}

/// Parses a ustar archive into (name, mode, data) entries, checking header checksums.
fn untar(tar: &[u8]) -> Vec<(String, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 512 <= tar.len() {
        let h = &tar[off..off + 512];
        if h.iter().all(|&b| b == 0) {
            break;
        }
        let field =
            |a: usize, b: usize| String::from_utf8(h[a..b].iter().copied().take_while(|&c| c != 0).collect()).unwrap();
        let stored = u32::from_str_radix(field(148, 155).trim(), 8).unwrap();
        let sum: u32 =
            h.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u32::from(b) }).sum();
        assert_eq!(stored, sum, "tar header checksum");
        assert_eq!(&h[257..263], b"ustar\0");
        let size = usize::from_str_radix(field(124, 136).trim(), 8).unwrap();
        let data = tar[off + 512..off + 512 + size].to_vec();
        out.push((field(0, 100), field(100, 108), data));
        off += 512 + size.div_ceil(512) * 512;
    }
    out
}

/// Walks the layout from index.json and returns the .wasm inside the image.
fn wasm_from_layout(oci_dir: &Path, tag: &str) -> (String, Vec<u8>) {
    assert_eq!(read_json(&oci_dir.join("oci-layout")), serde_json::json!({"imageLayoutVersion": "1.0.0"}));
    let index = read_json(&oci_dir.join("index.json"));
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(index["mediaType"], oci::INDEX_MEDIA_TYPE);
    let m = index["manifests"].as_array().unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0]["mediaType"], oci::MANIFEST_MEDIA_TYPE);
    assert_eq!(m[0]["annotations"][oci::REF_NAME], tag);
    let manifest: Value = serde_json::from_slice(&blob(oci_dir, &m[0])).unwrap();
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(manifest["mediaType"], oci::MANIFEST_MEDIA_TYPE);
    assert_eq!(manifest["config"]["mediaType"], oci::CONFIG_MEDIA_TYPE);
    let config: Value = serde_json::from_slice(&blob(oci_dir, &manifest["config"])).unwrap();
    assert_eq!(config["architecture"], "wasm");
    assert_eq!(config["os"], "wasip1");
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "the compat variant has exactly one layer");
    assert_eq!(layers[0]["mediaType"], oci::LAYER_MEDIA_TYPE);
    let gz = blob(oci_dir, &layers[0]);
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut tar).unwrap();
    assert_eq!(config["rootfs"]["type"], "layers");
    assert_eq!(
        config["rootfs"]["diff_ids"][0],
        format!("sha256:{}", sha256_hex(&tar)),
        "diff_id = digest of the uncompressed layer"
    );
    let entries = untar(&tar);
    assert_eq!(entries.len(), 1);
    let (name, mode, data) = entries.into_iter().next().unwrap();
    assert_eq!(name, oci::PLUGIN_FILE);
    assert_eq!(mode, "0000644");
    (m[0]["digest"].as_str().unwrap().to_owned(), data)
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn layout_holds_the_wasm_with_matching_digests() {
    let tmp = tempfile::tempdir().unwrap();
    let wasm = tiny_wasm();
    let input = tmp.path().join("in.wasm");
    std::fs::write(&input, &wasm).unwrap();
    let out = tmp.path().join("pkg");
    let p = oci::package(&input, &out, "1.2.3").unwrap();
    let (manifest_digest, inside) = wasm_from_layout(&out.join("oci"), "1.2.3");
    assert_eq!(inside, wasm, "layer content is the .wasm");
    assert_eq!(manifest_digest, p.image.manifest_digest());
    assert_eq!(std::fs::read(out.join("dialtone.wasm")).unwrap(), wasm);
    assert_eq!(
        std::fs::read_to_string(out.join("dialtone.wasm.sha256")).unwrap(),
        format!("{}  dialtone.wasm\n", sha256_hex(&wasm))
    );
    assert_eq!(std::fs::read_to_string(out.join("image-digest")).unwrap(), format!("{manifest_digest}\n"));
    // Exactly three blobs: no leftovers.
    assert_eq!(std::fs::read_dir(out.join("oci/blobs/sha256")).unwrap().count(), 3);
}

#[test]
fn the_built_filter_packages() {
    let wasm_path = dialtone_deploy::default_wasm().unwrap();
    assert!(wasm_path.exists(), "{} not built: run `make wasm`", wasm_path.display());
    let tmp = tempfile::tempdir().unwrap();
    oci::package(&wasm_path, tmp.path(), "latest").unwrap();
    let (_, inside) = wasm_from_layout(&tmp.path().join("oci"), "latest");
    assert_eq!(inside, std::fs::read(&wasm_path).unwrap());
}

#[test]
fn output_is_deterministic_and_the_digest_does_not_depend_on_the_tag() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.wasm");
    std::fs::write(&input, tiny_wasm()).unwrap();
    let (a, b, c) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
    let pa = oci::package(&input, &a, "v1").unwrap();
    let _ = oci::package(&input, &b, "v1").unwrap();
    assert_eq!(files(&a), files(&b), "same input, same bytes");
    let pc = oci::package(&input, &c, "other-tag").unwrap();
    assert_eq!(pa.image.manifest_digest(), pc.image.manifest_digest());
    // Re-packaging into the same directory leaves no stale blobs behind.
    std::fs::write(&input, [tiny_wasm(), b"x".to_vec()].concat()).unwrap();
    oci::package(&input, &a, "v1").unwrap();
    assert_eq!(std::fs::read_dir(a.join("oci/blobs/sha256")).unwrap().count(), 3);
}

#[test]
fn refuses_what_is_not_wasm_and_bad_tags() {
    assert!(oci::build(b"#!/bin/sh\n", "v1").unwrap_err().contains("not a WebAssembly module"));
    for tag in ["", "-x", "a/b", "a:b", &"x".repeat(129)] {
        assert!(oci::build(&tiny_wasm(), tag).is_err(), "{tag:?} accepted");
    }
    assert!(oci::valid_tag("0.1.0") && oci::valid_tag("latest") && oci::valid_tag("_v1-rc.2"));
}

#[test]
fn cli_package_and_check() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.wasm");
    std::fs::write(&input, tiny_wasm()).unwrap();
    let bin = env!("CARGO_BIN_EXE_dialtone-deploy");
    let out = Command::new(bin)
        .args(["package", "--wasm"])
        .arg(&input)
        .arg("--out")
        .arg(tmp.path().join("pkg"))
        .args(["--tag", "9.9.9"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (digest, _) = wasm_from_layout(&tmp.path().join("pkg/oci"), "9.9.9");
    assert!(stdout.contains(&digest), "{stdout}");
    assert!(!Command::new(bin).args(["package", "--bogus", "x"]).output().unwrap().status.success());
    let check = Command::new(bin).arg("check").output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
}
