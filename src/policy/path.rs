//! Path matchers: exact, prefix, and templates such as `/api/v1/keys/{id}`.
//! Compiled once at config load; matching allocates nothing.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatcher {
    Exact(String),
    Prefix(String),
    Template(Vec<Segment>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// `{name}`: exactly one non-empty path segment.
    Variable(String),
}

/// Why a path pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    MustStartWithSlash,
    QueryOrFragment,
    /// `{` or `}` that is not a whole `{name}` segment.
    BadBraces(String),
    BadVariableName(String),
    DuplicateVariable(String),
    EmptySegment,
    /// `{…}` in an exact or prefix path: it would be matched literally.
    BracesOutsideTemplate,
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathError::MustStartWithSlash => write!(f, "must start with '/'"),
            PathError::QueryOrFragment => write!(f, "must not contain '?' or '#' (paths are matched without the query)"),
            PathError::BadBraces(s) => write!(f, "segment {s:?}: a variable must be a whole segment like {{id}}"),
            PathError::BadVariableName(s) => write!(f, "variable {s:?}: names are letters, digits and '_' and start with a letter or '_'"),
            PathError::DuplicateVariable(s) => write!(f, "variable {s:?} appears twice"),
            PathError::EmptySegment => write!(f, "empty segment ('//')"),
            PathError::BracesOutsideTemplate => {
                write!(f, "'{{' or '}}' would be matched literally here; use {{\"template\": …}} for path variables")
            }
        }
    }
}

fn check_common(p: &str) -> Result<(), PathError> {
    if !p.starts_with('/') {
        return Err(PathError::MustStartWithSlash);
    }
    if p.contains(['?', '#']) {
        return Err(PathError::QueryOrFragment);
    }
    Ok(())
}

impl PathMatcher {
    pub fn exact(p: &str) -> Result<Self, PathError> {
        check_common(p)?;
        Ok(PathMatcher::Exact(p.to_owned()))
    }

    pub fn prefix(p: &str) -> Result<Self, PathError> {
        check_common(p)?;
        Ok(PathMatcher::Prefix(p.to_owned()))
    }

    pub fn template(p: &str) -> Result<Self, PathError> {
        check_common(p)?;
        let mut segments = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        // Skip the leading '/', then each piece is one segment. A trailing
        // slash yields a final empty literal, which matches only a trailing slash.
        let body = p.get(1..).unwrap_or_default();
        let pieces: Vec<&str> = body.split('/').collect();
        let last = pieces.len().saturating_sub(1);
        for (i, seg) in pieces.into_iter().enumerate() {
            if seg.is_empty() && i != last {
                return Err(PathError::EmptySegment);
            }
            if let Some(inner) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                let valid = inner.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && inner.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    return Err(PathError::BadVariableName(inner.to_owned()));
                }
                if names.contains(&inner) {
                    return Err(PathError::DuplicateVariable(inner.to_owned()));
                }
                names.push(inner);
                segments.push(Segment::Variable(inner.to_owned()));
            } else if seg.contains(['{', '}']) {
                return Err(PathError::BadBraces(seg.to_owned()));
            } else {
                segments.push(Segment::Literal(seg.to_owned()));
            }
        }
        Ok(PathMatcher::Template(segments))
    }

    /// `path` is the request path without its query string.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatcher::Exact(p) => path == p,
            PathMatcher::Prefix(p) => path.starts_with(p.as_str()),
            PathMatcher::Template(segments) => {
                let Some(body) = path.strip_prefix('/') else { return false };
                let mut parts = body.split('/');
                for seg in segments {
                    match (seg, parts.next()) {
                        (Segment::Literal(l), Some(p)) if l == p => {}
                        (Segment::Variable(_), Some(p)) if !p.is_empty() => {}
                        _ => return false,
                    }
                }
                parts.next().is_none()
            }
        }
    }
}

/// The request path with the query string and fragment cut off.
pub fn strip_query(path: &str) -> &str {
    let end = path.find(['?', '#']).unwrap_or(path.len());
    path.get(..end).unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_prefix() {
        let e = PathMatcher::exact("/api/v1/account").unwrap();
        assert!(e.matches("/api/v1/account"));
        assert!(!e.matches("/api/v1/account/"));
        assert!(!e.matches("/api/v1/accounts"));
        let p = PathMatcher::prefix("/echo").unwrap();
        assert!(p.matches("/echo") && p.matches("/echo/x") && !p.matches("/ech"));
    }

    #[test]
    fn templates() {
        let t = PathMatcher::template("/api/v1/keys/{id}").unwrap();
        assert!(t.matches("/api/v1/keys/abc12345"));
        assert!(!t.matches("/api/v1/keys/"));
        assert!(!t.matches("/api/v1/keys"));
        assert!(!t.matches("/api/v1/keys/a/b"));
        assert!(!t.matches("api/v1/keys/a"));
        let t = PathMatcher::template("/a/{x}/b/{y}").unwrap();
        assert!(t.matches("/a/1/b/2"));
        assert!(!t.matches("/a/1/c/2"));
    }

    #[test]
    fn template_errors() {
        assert_eq!(PathMatcher::template("a/{id}"), Err(PathError::MustStartWithSlash));
        assert_eq!(PathMatcher::template("/a/{id"), Err(PathError::BadBraces("{id".into())));
        assert_eq!(PathMatcher::template("/a/x{id}"), Err(PathError::BadBraces("x{id}".into())));
        assert_eq!(PathMatcher::template("/a/{1d}"), Err(PathError::BadVariableName("1d".into())));
        assert_eq!(PathMatcher::template("/a/{}"), Err(PathError::BadVariableName(String::new())));
        assert_eq!(PathMatcher::template("/{a}/{a}"), Err(PathError::DuplicateVariable("a".into())));
        assert_eq!(PathMatcher::template("/a//b"), Err(PathError::EmptySegment));
        assert_eq!(PathMatcher::exact("/a?b=1"), Err(PathError::QueryOrFragment));
    }

    #[test]
    fn strips_query() {
        assert_eq!(strip_query("/a/b?c=d"), "/a/b");
        assert_eq!(strip_query("/a#x"), "/a");
        assert_eq!(strip_query("/a"), "/a");
    }
}
