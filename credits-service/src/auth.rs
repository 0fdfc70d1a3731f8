//! Who may call what.
//!
//! - [`ServiceAuth`]: the filter proves itself on every `/v1/*` call (except
//!   the operator API) with `x-dialtone-service-key: <secret>`. Up to two
//!   secrets are accepted at once, so the secret can be rotated without a
//!   failed request: `DIAL_SERVICE_KEY` (+ `DIAL_SERVICE_KEY_PREVIOUS`), or
//!   `--service-key-file` (one or two non-empty lines, re-read on SIGHUP).
//! - [`AdminAuth`]: the operator API `/v1/admin/*` takes
//!   `Authorization: Bearer <DIAL_ADMIN_API_KEY>`.
//!
//! Secrets are kept only as SHA-256 digests and compared in constant time
//! (every accepted digest is compared, whatever matches first); they are
//! never logged.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use subtle::ConstantTimeEq;

/// Header carrying the service secret.
pub const SERVICE_KEY_HEADER: &str = "x-dialtone-service-key";
/// Environment variable holding the current service secret.
pub const SERVICE_KEY_ENV: &str = "DIAL_SERVICE_KEY";
/// Environment variable holding the previous service secret (rotation).
pub const SERVICE_KEY_PREVIOUS_ENV: &str = "DIAL_SERVICE_KEY_PREVIOUS";
/// Shortest accepted service secret.
pub const MIN_SERVICE_KEY_CHARS: usize = 32;
/// Environment variable holding the operator admin key.
pub const ADMIN_KEY_ENV: &str = "DIAL_ADMIN_API_KEY";
/// Shortest admin key accepted; shorter (or unset) disables the admin API.
pub const MIN_ADMIN_KEY_CHARS: usize = 16;
/// Realm of the admin API's `WWW-Authenticate` challenge.
pub const ADMIN_REALM: &str = "dialtone-admin";

type Digests = Arc<Vec<[u8; 32]>>;

fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// True if `presented` matches any of `accepted`, in time independent of
/// which (if any) matches.
fn matches_any(accepted: &[[u8; 32]], presented: &[u8]) -> bool {
    let d = digest(presented);
    let found = accepted
        .iter()
        .fold(subtle::Choice::from(0), |acc, a| acc | a.ct_eq(&d));
    bool::from(found)
}

enum Source {
    /// Fixed secrets (environment, tests).
    Fixed,
    /// Re-read from this file by [`ServiceAuth::reload`].
    File(PathBuf),
    /// `--insecure-no-service-key`: every call is let through.
    Insecure,
}

struct Inner {
    source: Source,
    digests: RwLock<Digests>,
}

/// The secrets accepted on `x-dialtone-service-key`. Cheap to clone; a
/// reload is seen by every clone.
#[derive(Clone)]
pub struct ServiceAuth(Arc<Inner>);

/// Check and digest one or two secrets.
fn digests_of(secrets: &[String], origin: &str) -> Result<Vec<[u8; 32]>, String> {
    if secrets.is_empty() || secrets.len() > 2 {
        return Err(format!(
            "{origin}: expected one or two service keys, found {}",
            secrets.len()
        ));
    }
    secrets
        .iter()
        .map(|s| {
            if s.chars().count() < MIN_SERVICE_KEY_CHARS {
                Err(format!(
                    "{origin}: a service key must be at least {MIN_SERVICE_KEY_CHARS} characters"
                ))
            } else {
                Ok(digest(s.as_bytes()))
            }
        })
        .collect()
}

fn read_key_file(path: &Path) -> Result<Vec<[u8; 32]>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read service key file {}: {e}", path.display()))?;
    let secrets: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    digests_of(&secrets, &path.display().to_string())
}

impl ServiceAuth {
    /// Accept exactly these secrets (one or two, each >= 32 characters).
    pub fn from_keys(keys: &[&str]) -> Result<ServiceAuth, String> {
        let secrets: Vec<String> = keys.iter().map(|k| (*k).to_string()).collect();
        Ok(Self::new(
            Source::Fixed,
            digests_of(&secrets, "service key")?,
        ))
    }

    /// From `DIAL_SERVICE_KEY` (+ `DIAL_SERVICE_KEY_PREVIOUS`); `Ok(None)`
    /// when neither is set.
    pub fn from_env() -> Result<Option<ServiceAuth>, String> {
        Self::from_env_vars(SERVICE_KEY_ENV, SERVICE_KEY_PREVIOUS_ENV)
    }

    /// From the variables `current` (+ `previous`), e.g. the self-service
    /// gate's `DIAL_GATE_KEY` (+ `DIAL_GATE_KEY_PREVIOUS`); `Ok(None)` when
    /// neither is set.
    pub fn from_env_vars(current: &str, previous: &str) -> Result<Option<ServiceAuth>, String> {
        let get = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let secrets: Vec<String> = match (get(current), get(previous)) {
            (None, None) => return Ok(None),
            (None, Some(_)) => return Err(format!("{previous} is set but {current} is not")),
            (Some(c), p) => std::iter::once(c).chain(p).collect(),
        };
        Ok(Some(Self::new(Source::Fixed, digests_of(&secrets, current)?)))
    }

    /// From a file of one or two non-empty lines; [`ServiceAuth::reload`]
    /// re-reads it.
    pub fn from_file(path: &Path) -> Result<ServiceAuth, String> {
        let digests = read_key_file(path)?;
        warn_if_readable_by_others(path);
        Ok(Self::new(Source::File(path.to_path_buf()), digests))
    }

    /// No secret configured: every call is refused.
    pub fn none() -> ServiceAuth {
        Self::new(Source::Fixed, Vec::new())
    }

    /// Accept every call (`--insecure-no-service-key`; local experiments).
    pub fn insecure() -> ServiceAuth {
        Self::new(Source::Insecure, Vec::new())
    }

    fn new(source: Source, digests: Vec<[u8; 32]>) -> ServiceAuth {
        ServiceAuth(Arc::new(Inner {
            source,
            digests: RwLock::new(Arc::new(digests)),
        }))
    }

    /// True when calls need no key at all.
    pub fn is_insecure(&self) -> bool {
        matches!(self.0.source, Source::Insecure)
    }

    /// How many secrets are accepted now.
    pub fn key_count(&self) -> usize {
        self.current().len()
    }

    fn current(&self) -> Digests {
        Arc::clone(
            &self
                .0
                .digests
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Re-read the key file (SIGHUP). On any error the accepted keys stay
    /// as they were. Returns how many keys are accepted now.
    pub fn reload(&self) -> Result<usize, String> {
        let Source::File(path) = &self.0.source else {
            return Ok(self.key_count());
        };
        let digests = read_key_file(path)?;
        let n = digests.len();
        *self
            .0
            .digests
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(digests);
        Ok(n)
    }

    /// Is this header value (if any) an accepted secret?
    pub fn allows(&self, presented: Option<&[u8]>) -> bool {
        if self.is_insecure() {
            return true;
        }
        let accepted = self.current();
        match presented {
            Some(p) if !p.is_empty() => matches_any(&accepted, p),
            _ => {
                // Same work as a wrong key.
                let _ = matches_any(&accepted, b"");
                false
            }
        }
    }

    /// For the startup log line (never a secret).
    pub fn describe(&self) -> String {
        match &self.0.source {
            Source::Insecure => "DISABLED (--insecure-no-service-key)".to_string(),
            Source::Fixed => format!("{} key(s) from the environment", self.key_count()),
            Source::File(p) => format!(
                "{} key(s) from {} (SIGHUP re-reads it)",
                self.key_count(),
                p.display()
            ),
        }
    }
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o004 != 0 {
            tracing::warn!(file = %path.display(), "the service key file is readable by every user; chmod 600 it");
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

/// Who may use `/v1/admin/*`: nobody (`Disabled`), or the holder of the key
/// whose SHA-256 is kept here (the key itself is not kept).
#[derive(Clone)]
pub enum AdminAuth {
    Disabled,
    Key([u8; 32]),
}

/// Why the admin API refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRefusal {
    /// 403 `admin_disabled`.
    Disabled,
    /// 401 `unauthorized` with `WWW-Authenticate`.
    Unauthorized,
}

impl AdminAuth {
    /// From the configured key: unset or shorter than 16 characters disables.
    pub fn from_key(key: Option<&str>) -> AdminAuth {
        match key {
            Some(k) if k.chars().count() >= MIN_ADMIN_KEY_CHARS => {
                AdminAuth::Key(digest(k.as_bytes()))
            }
            _ => AdminAuth::Disabled,
        }
    }

    /// From `DIAL_ADMIN_API_KEY`.
    pub fn from_env() -> AdminAuth {
        let key = std::env::var(ADMIN_KEY_ENV).ok();
        AdminAuth::from_key(key.as_deref())
    }

    pub fn is_enabled(&self) -> bool {
        matches!(self, AdminAuth::Key(_))
    }

    /// `Ok` when `authorization` carries the admin key as a Bearer token.
    pub fn authorize(&self, authorization: Option<&str>) -> Result<(), AdminRefusal> {
        let AdminAuth::Key(expected) = self else {
            return Err(AdminRefusal::Disabled);
        };
        let presented = authorization
            .and_then(|h| {
                let (scheme, token) = h.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or(AdminRefusal::Unauthorized)?;
        if matches_any(std::slice::from_ref(expected), presented.as_bytes()) {
            Ok(())
        } else {
            Err(AdminRefusal::Unauthorized)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "service-key-aaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "service-key-bbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn two_keys_are_accepted_and_nothing_else() {
        let auth = ServiceAuth::from_keys(&[A, B]).unwrap();
        assert!(auth.allows(Some(A.as_bytes())));
        assert!(auth.allows(Some(B.as_bytes())));
        assert!(!auth.allows(Some(b"service-key-cccccccccccccccccccccccccccc")));
        assert!(!auth.allows(Some(b"")));
        assert!(!auth.allows(None));
        assert!(ServiceAuth::from_keys(&["short"]).is_err());
        assert!(ServiceAuth::from_keys(&[]).is_err());
        assert!(ServiceAuth::from_keys(&[A, B, A]).is_err());
        assert!(ServiceAuth::insecure().allows(None));
    }

    #[test]
    fn the_key_file_is_reloaded_and_a_bad_file_keeps_the_old_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, format!("{A}\n")).unwrap();
        let auth = ServiceAuth::from_file(&path).unwrap();
        assert!(auth.allows(Some(A.as_bytes())) && !auth.allows(Some(B.as_bytes())));
        std::fs::write(&path, format!("\n{B}\r\n{A}\n\n")).unwrap();
        assert_eq!(auth.reload().unwrap(), 2);
        assert!(auth.allows(Some(A.as_bytes())) && auth.allows(Some(B.as_bytes())));
        std::fs::write(&path, "too short\n").unwrap();
        assert!(auth.reload().is_err());
        assert!(auth.allows(Some(A.as_bytes())) && auth.allows(Some(B.as_bytes())));
        std::fs::write(&path, format!("{B}\n")).unwrap();
        assert_eq!(auth.reload().unwrap(), 1);
        assert!(!auth.allows(Some(A.as_bytes())) && auth.allows(Some(B.as_bytes())));
    }

    #[test]
    fn admin_bearer() {
        let admin = AdminAuth::from_key(Some("admin-key-0123456789"));
        assert_eq!(admin.authorize(Some("Bearer admin-key-0123456789")), Ok(()));
        assert_eq!(
            admin.authorize(Some("bearer  admin-key-0123456789 ")),
            Ok(())
        );
        assert_eq!(
            admin.authorize(Some("Bearer nope")),
            Err(AdminRefusal::Unauthorized)
        );
        assert_eq!(
            admin.authorize(Some("Basic x")),
            Err(AdminRefusal::Unauthorized)
        );
        assert_eq!(admin.authorize(None), Err(AdminRefusal::Unauthorized));
        assert_eq!(
            AdminAuth::from_key(Some("short")).authorize(None),
            Err(AdminRefusal::Disabled)
        );
    }
}
