//! `Authorization` parsing, credential classification and cookie lookup.
//!
//! Input: one control byte, then the header values separated by `\n` (which
//! Envoy never passes inside a value). Control bits 0-1 pick the token size
//! cap (4096, 256, 16384, 64); bit 2 set means no header at all. The seeds
//! start with the printable `0` (cap 4096, headers present).
#![no_main]

use dialtone::bearer::{self, BearerError, Credential, KeyKind, API_KEY_PREFIX, API_TOKEN_PREFIX, KEY_PREFIX_LEN};
use dialtone::identity::is_identity_header;
use dialtone_fuzz::{hex, sha256, ADMIN_KEY};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&ctrl, rest)) = data.split_first() else { return };
    let max_len = match ctrl & 3 {
        0 => bearer::DEFAULT_MAX_TOKEN_BYTES,
        1 => 256,
        2 => 16 * 1024,
        _ => 64,
    };
    let values: Vec<&[u8]> = if ctrl & 4 != 0 { Vec::new() } else { rest.split(|b| *b == b'\n').collect() };

    check_bearer(&values, max_len);
    check_cookie(&values);

    // The classifier and the digest parser on the raw text as well, whatever
    // the header parser thought of it.
    let text = String::from_utf8_lossy(rest);
    check_classify(&text);
    if let Some(d) = bearer::parse_sha256_hex(&text) {
        assert!(text.eq_ignore_ascii_case(&bearer::hex_lower(&d)), "{text:?}");
    }
    assert_eq!(is_identity_header(&text), text.to_ascii_lowercase().starts_with("x-dialtone-"), "{text:?}");
});

fn b64token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
}

fn check_bearer(values: &[&[u8]], max_len: usize) {
    let got = bearer::bearer_token(values, max_len);
    match values.len() {
        0 => assert_eq!(got, Ok(None)),
        1 => {}
        _ => assert_eq!(got, Err(BearerError::MultipleHeaders)),
    }
    if let Err(e) = got {
        assert!(!e.describe().is_empty());
    }
    let Ok(Some(token)) = got else { return };
    // RFC 6750 b64token, within the cap, taken from the one header value.
    assert!(!token.is_empty() && token.len() <= max_len, "{token:?}");
    let body = token.trim_end_matches('=');
    assert!(!body.is_empty() && body.bytes().all(b64token_char), "{token:?}");
    let value = values[0];
    assert!(value.windows(token.len()).any(|w| w == token.as_bytes()), "token not from the header");
    // The scheme word before it is `bearer`, in any case.
    let trimmed = value.iter().position(|b| !matches!(b, b' ' | b'\t')).map_or(&[][..], |i| &value[i..]);
    assert!(trimmed.len() > 6 && trimmed[..6].eq_ignore_ascii_case(b"bearer") && trimmed[6] == b' ', "{:?}",
        String::from_utf8_lossy(value));
    // Canonical form reads back the same.
    let again = format!("Bearer {token}");
    assert_eq!(bearer::bearer_token(&[again.as_bytes()], max_len), Ok(Some(token)));
    check_classify(token);
}

fn check_classify(token: &str) {
    let admin = [sha256(ADMIN_KEY.as_bytes())];
    let plain = bearer::classify(token, &[]);
    let with_admin = bearer::classify(token, &admin);
    if token == ADMIN_KEY {
        assert_eq!(with_admin, Ok(Credential::Admin));
    } else {
        // The admin check changes nothing for any other token.
        assert_eq!(with_admin, plain, "{token:?}");
    }
    match plain {
        Ok(Credential::Admin) => panic!("admin without an admin digest: {token:?}"),
        Ok(Credential::PrivyAccessToken(t)) => {
            assert_eq!(t, token);
            assert!(token.starts_with("eyJ"), "{token:?}");
        }
        Ok(Credential::Key(k)) => {
            assert_eq!(k.secret, token);
            let body = match k.kind {
                KeyKind::ApiKey => {
                    let body = token.strip_prefix(API_KEY_PREFIX).unwrap_or_else(|| panic!("{token:?}"));
                    assert!((16..=128).contains(&body.len()) && body.bytes().all(|b| b.is_ascii_alphanumeric()), "{token:?}");
                    body
                }
                KeyKind::ApiToken => {
                    let body = token.strip_prefix(API_TOKEN_PREFIX).unwrap_or_else(|| panic!("{token:?}"));
                    assert!(body.len() == 40 && body.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{token:?}");
                    body
                }
            };
            assert_eq!(k.prefix, &body[..KEY_PREFIX_LEN]);
            // The only form in which a key leaves the filter.
            assert_eq!(k.sha256_hex(), hex(&sha256(token.as_bytes())));
        }
        Err(e) => {
            assert!(!e.describe().is_empty());
            assert!(!token.starts_with("eyJ") || token.starts_with(API_KEY_PREFIX) || token.starts_with(API_TOKEN_PREFIX));
        }
    }
}

fn check_cookie(values: &[&[u8]]) {
    for name in [dialtone::decision::PRIVY_COOKIE, "a"] {
        let Some(v) = bearer::cookie_value(values, name) else { continue };
        assert!(!v.contains(&b';'), "{:?}", String::from_utf8_lossy(v));
        // `v` is the part of one header right after `<name>=`.
        let (start, header) = values
            .iter()
            .find_map(|h| {
                let off = (v.as_ptr() as usize).checked_sub(h.as_ptr() as usize)?;
                (off + v.len() <= h.len()).then_some((off, *h))
            })
            .unwrap_or_else(|| panic!("cookie value is not inside a header"));
        let before = &header[..start];
        let want = format!("{name}=");
        assert!(before.ends_with(want.as_bytes()), "{:?}", String::from_utf8_lossy(header));
        let lead = &before[..before.len() - want.len()];
        let lead = lead.iter().rposition(|b| !matches!(b, b' ' | b'\t')).map_or(&[][..], |i| &lead[..=i]);
        assert!(lead.is_empty() || lead.ends_with(b";"), "{:?}", String::from_utf8_lossy(header));
    }
}
