//! The filter as an OCI image, in an OCI image layout directory.
//!
//! Format: the "compat" Wasm image variant with standard OCI media types
//! (what `buildah` / `docker build` make from `FROM scratch` + `COPY
//! plugin.wasm ./`): an OCI image manifest, an OCI image config, and exactly
//! one `application/vnd.oci.image.layer.v1.tar+gzip` layer holding a tar with
//! one file, `plugin.wasm`. Istio (`pkg/wasm/imagefetcher.go`) and Envoy
//! Gateway (`internal/wasm/imagefetcher.go`) both try this variant first, and
//! every registry and copy tool accepts it as an ordinary image. (Their
//! "oci" artifact variant, by contrast, requires *two* layers -- a
//! `application/vnd.module.wasm.content.layer.v1+wasm` layer and a config
//! layer -- so a one-layer artifact pushed with a custom config media type
//! is refused by both.)
//!
//! Deterministic: no timestamps, owners or host names go into any blob, and
//! the tag is only in `index.json`, so the image manifest digest -- the
//! `sha256` Istio and Envoy Gateway check for an OCI source -- depends on the
//! `.wasm` bytes alone.

use std::fs;
use std::io::Write;
use std::path::Path;

use flate2::{Compression, GzBuilder};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The file name inside the layer that Istio and Envoy Gateway look for.
pub const PLUGIN_FILE: &str = "plugin.wasm";
/// Annotation that names a manifest in `index.json` (`oci:DIR:TAG`).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

/// A content-addressed blob.
#[derive(Debug, Clone)]
pub struct Blob {
    pub media_type: &'static str,
    pub bytes: Vec<u8>,
}

impl Blob {
    pub fn digest(&self) -> String {
        digest(&self.bytes)
    }
    fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest(), "size": self.bytes.len()})
    }
}

/// Everything `package` writes.
#[derive(Debug, Clone)]
pub struct Image {
    pub wasm_sha256: String,
    pub tar: Vec<u8>,
    pub layer: Blob,
    pub config: Blob,
    pub manifest: Blob,
    pub index: Vec<u8>,
}

impl Image {
    /// `sha256:<hex>` of the image manifest: the registry digest of the pushed image.
    pub fn manifest_digest(&self) -> String {
        self.manifest.digest()
    }
}

/// A valid OCI tag (distribution-spec): `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// A one-file ustar archive: `name`, mode 0644, owner 0:0, mtime 0.
pub fn tar_one_file(name: &str, data: &[u8]) -> Result<Vec<u8>, String> {
    if name.is_empty() || name.len() > 99 {
        return Err(format!("tar entry name {name:?} must be 1..99 bytes"));
    }
    if data.len() as u64 > 0o77777777777 {
        return Err("file too large for a ustar header".into());
    }
    let mut h = [0u8; 512];
    let mut put = |off: usize, s: &[u8]| h[off..off + s.len()].copy_from_slice(s);
    put(0, name.as_bytes());
    put(100, b"0000644\0"); // mode
    put(108, b"0000000\0"); // uid
    put(116, b"0000000\0"); // gid
    put(124, format!("{:011o}\0", data.len()).as_bytes()); // size
    put(136, b"00000000000\0"); // mtime
    put(148, b"        "); // checksum, counted as spaces
    put(156, b"0"); // regular file
    put(257, b"ustar\0"); // magic
    put(263, b"00"); // version
    put(329, b"0000000\0"); // devmajor
    put(337, b"0000000\0"); // devminor
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = Vec::with_capacity(512 + data.len() + 1536);
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.resize(out.len() + 1024, 0); // end of archive: two zero blocks
    Ok(out)
}

/// gzip with a fixed header (no name, mtime 0) and fixed level.
pub fn gzip(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut enc = GzBuilder::new().mtime(0).operating_system(255).write(Vec::new(), Compression::best());
    enc.write_all(data).map_err(|e| e.to_string())?;
    enc.finish().map_err(|e| e.to_string())
}

/// Builds the image for a `.wasm` module, tagged `tag` in the index.
pub fn build(wasm: &[u8], tag: &str) -> Result<Image, String> {
    if !wasm.starts_with(b"\0asm") {
        return Err("not a WebAssembly module (no \\0asm magic)".into());
    }
    if !valid_tag(tag) {
        return Err(format!("{tag:?} is not a valid OCI tag ([A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})"));
    }
    let tar = tar_one_file(PLUGIN_FILE, wasm)?;
    let layer = Blob { media_type: LAYER_MEDIA_TYPE, bytes: gzip(&tar)? };
    // The platform of a WASI module (as Docker/containerd Wasm images use);
    // diff_ids name the uncompressed layer, as the image spec requires.
    let config_json = json!({
        "architecture": "wasm",
        "os": "wasip1",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [digest(&tar)]}
    });
    let config = Blob { media_type: CONFIG_MEDIA_TYPE, bytes: to_bytes(&config_json)? };
    let manifest_json = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": config.descriptor(),
        "layers": [layer.descriptor()]
    });
    let manifest = Blob { media_type: MANIFEST_MEDIA_TYPE, bytes: to_bytes(&manifest_json)? };
    let mut manifest_desc = manifest.descriptor();
    if let Some(o) = manifest_desc.as_object_mut() {
        o.insert("annotations".into(), json!({ REF_NAME: tag }));
    }
    let index = to_bytes(&json!({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": [manifest_desc]}))?;
    Ok(Image { wasm_sha256: sha256_hex(wasm), tar, layer, config, manifest, index })
}

fn to_bytes(v: &Value) -> Result<Vec<u8>, String> {
    serde_json::to_vec(v).map_err(|e| e.to_string())
}

/// What `package` wrote.
#[derive(Debug, Clone)]
pub struct Packaged {
    pub image: Image,
    pub wasm_len: usize,
}

/// Writes `out/dialtone.wasm`, `out/dialtone.wasm.sha256` (sha256sum format),
/// `out/image-digest` (`sha256:<hex>` of the manifest) and the image layout
/// `out/oci/` (recreated from scratch, so no stale blobs remain).
pub fn package(wasm_path: &Path, out: &Path, tag: &str) -> Result<Packaged, String> {
    let wasm = fs::read(wasm_path).map_err(|e| format!("{}: {e} (build it with `make wasm`)", wasm_path.display()))?;
    let image = build(&wasm, tag).map_err(|e| format!("{}: {e}", wasm_path.display()))?;
    let write = |p: &Path, bytes: &[u8]| fs::write(p, bytes).map_err(|e| format!("{}: {e}", p.display()));
    fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    write(&out.join("dialtone.wasm"), &wasm)?;
    write(&out.join("dialtone.wasm.sha256"), format!("{}  dialtone.wasm\n", image.wasm_sha256).as_bytes())?;
    write(&out.join("image-digest"), format!("{}\n", image.manifest_digest()).as_bytes())?;
    let oci = out.join("oci");
    if oci.exists() {
        fs::remove_dir_all(&oci).map_err(|e| format!("{}: {e}", oci.display()))?;
    }
    let blobs = oci.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(|e| format!("{}: {e}", blobs.display()))?;
    write(&oci.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    write(&oci.join("index.json"), &image.index)?;
    for blob in [&image.layer, &image.config, &image.manifest] {
        write(&blobs.join(sha256_hex(&blob.bytes)), &blob.bytes)?;
    }
    Ok(Packaged { image, wasm_len: wasm.len() })
}
