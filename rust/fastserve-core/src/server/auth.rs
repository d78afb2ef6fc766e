//! Optional bearer-token authentication, shared by the HTTP and gRPC front ends.
//!
//! The inference token guards inference, metadata and statistics; the admin token guards the
//! repository API (and, being the stronger one, is accepted everywhere). Without an admin token,
//! the repository API takes the inference token. Health probes and `/metrics` stay open.

use std::fmt;

use subtle::ConstantTimeEq;

use crate::error::{Result, ServeError};

/// What an endpoint needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Liveness/readiness probes: never authenticated.
    Open,
    /// Inference, metadata, statistics.
    Inference,
    /// The repository (model management) API.
    Admin,
}

/// The configured tokens. Debug output never shows them.
#[derive(Clone, Default)]
pub struct Auth {
    inference: Option<Vec<u8>>,
    admin: Option<Vec<u8>>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("inference", &self.inference.as_ref().map(|_| "<set>"))
            .field("admin", &self.admin.as_ref().map(|_| "<set>"))
            .finish()
    }
}

fn matches(expected: &Option<Vec<u8>>, given: &[u8]) -> bool {
    expected.as_deref().is_some_and(|t| bool::from(t.ct_eq(given)))
}

impl Auth {
    /// Empty tokens are rejected by the callers; `None` leaves that scope unauthenticated.
    pub fn new(inference: Option<String>, admin: Option<String>) -> Self {
        Self { inference: inference.map(String::into_bytes), admin: admin.map(String::into_bytes) }
    }

    /// Whether the repository API has a token of its own.
    pub fn has_admin_token(&self) -> bool {
        self.admin.is_some()
    }

    pub fn is_enabled(&self) -> bool {
        self.inference.is_some() || self.admin.is_some()
    }

    /// Checks an `Authorization` header value against what `scope` needs.
    pub fn check(&self, scope: Scope, authorization: Option<&[u8]>) -> Result<()> {
        let required = match scope {
            Scope::Open => false,
            Scope::Inference => self.inference.is_some(),
            Scope::Admin => self.is_enabled(),
        };
        if !required {
            return Ok(());
        }
        let Some(token) = authorization.and_then(bearer) else {
            return Err(ServeError::Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'".into()));
        };
        // Both comparisons always run, so timing does not tell which token matched.
        let admin = matches(&self.admin, token);
        let inference = matches(&self.inference, token);
        let ok = match scope {
            Scope::Open => true,
            Scope::Inference => admin | inference,
            Scope::Admin if self.admin.is_some() => admin,
            Scope::Admin => inference,
        };
        if ok {
            Ok(())
        } else {
            Err(ServeError::Unauthorized("invalid bearer token".into()))
        }
    }
}

/// The token of `Bearer <token>` (the scheme is case-insensitive).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then(|| rest.trim_ascii()).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(t: &str) -> Option<&[u8]> {
        Some(t.as_bytes())
    }

    #[test]
    fn no_tokens_means_open() {
        let auth = Auth::default();
        for scope in [Scope::Open, Scope::Inference, Scope::Admin] {
            assert_eq!(auth.check(scope, None), Ok(()));
        }
    }

    #[test]
    fn inference_token_guards_everything_but_probes() {
        let auth = Auth::new(Some("s3cret".into()), None);
        assert_eq!(auth.check(Scope::Open, None), Ok(()));
        for scope in [Scope::Inference, Scope::Admin] {
            assert!(matches!(auth.check(scope, None), Err(ServeError::Unauthorized(_))));
            assert!(matches!(auth.check(scope, hdr("Bearer wrong")), Err(ServeError::Unauthorized(_))));
            assert!(matches!(auth.check(scope, hdr("Basic s3cret")), Err(ServeError::Unauthorized(_))));
            assert!(matches!(auth.check(scope, hdr("Bearer s3cre")), Err(ServeError::Unauthorized(_))));
            assert_eq!(auth.check(scope, hdr("Bearer s3cret")), Ok(()));
            assert_eq!(auth.check(scope, hdr("bearer s3cret")), Ok(()));
        }
    }

    #[test]
    fn admin_token_is_separate() {
        let auth = Auth::new(Some("infer".into()), Some("admin".into()));
        assert!(auth.check(Scope::Admin, hdr("Bearer infer")).is_err());
        assert_eq!(auth.check(Scope::Admin, hdr("Bearer admin")), Ok(()));
        assert_eq!(auth.check(Scope::Inference, hdr("Bearer infer")), Ok(()));
        assert_eq!(auth.check(Scope::Inference, hdr("Bearer admin")), Ok(()));
        let admin_only = Auth::new(None, Some("admin".into()));
        assert_eq!(admin_only.check(Scope::Inference, None), Ok(()));
        assert!(admin_only.check(Scope::Admin, None).is_err());
    }

    #[test]
    fn debug_hides_tokens() {
        let text = format!("{:?}", Auth::new(Some("s3cret".into()), Some("adm1n".into())));
        assert!(!text.contains("s3cret") && !text.contains("adm1n"), "{text}");
    }
}
