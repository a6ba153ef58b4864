//! Who may read and write which namespaces: tokens, their scopes, and the
//! checks both APIs make.
//!
//! A token is a bearer secret (`authorization: Bearer <token>`, as gRPC
//! metadata or an HTTP header) with a name, the namespaces it covers
//! (`"*"`: all) and an access right: `read`, or `write` (which includes
//! reading). Every request is checked against the namespace it touches.
//! Anonymous requests may read the namespaces [`crate::Config::open_reads`]
//! lists; with no tokens configured at all, everything is open (a
//! development registry).
//!
//! Tokens come from a JSON file ([`Tokens::from_file`]), from one legacy
//! token with write access to every namespace ([`Tokens::single`]), or
//! both.
//!
//! Errors name the token (by its name), the namespace and the right that
//! was missing; never the secret. Secrets are compared as SHA-256 digests
//! in constant time, and do not appear in `Debug` output.

use std::path::Path;
use std::sync::Arc;

use lodestar::registry::limits::quoted;
use serde::Deserialize;

/// What a token allows in its namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Look up, list and watch.
    Read,
    /// Everything `Read` allows, and register, heartbeat, deregister,
    /// enable and disable instances, and set protection thresholds.
    Write,
}

impl Access {
    fn verb(self) -> &'static str {
        match self {
            Access::Read => "reading",
            Access::Write => "writing",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

/// The namespace that means "every namespace" in scopes and in
/// [`crate::Config::open_reads`].
pub const ALL_NAMESPACES: &str = "*";

/// One token: its name (shown in errors and logs), the SHA-256 of its
/// secret, its namespaces and its access.
struct Grant {
    name: String,
    sha256: [u8; 32],
    namespaces: Vec<String>,
    access: Access,
}

impl Grant {
    fn covers(&self, namespace: &str) -> bool {
        covers(&self.namespaces, namespace)
    }
}

fn covers(namespaces: &[String], namespace: &str) -> bool {
    namespaces
        .iter()
        .any(|n| n == ALL_NAMESPACES || n == namespace)
}

/// The tokens a registry accepts, each with a name, namespaces and an
/// [`Access`]. In a file (JSON), each token gives its secret, or the
/// secret's SHA-256 in hexadecimal so that the file holds no secrets:
///
/// ```json
/// {"tokens": [
///   {"name": "orders-team", "sha256": "9f86d0…", "namespaces": ["orders"], "access": "write"},
///   {"name": "dashboards", "secret": "r3ad-0nly", "namespaces": ["*"], "access": "read"}
/// ]}
/// ```
///
/// `Debug` shows names and scopes, never secrets.
///
/// ```
/// use lodestar_registry_server::Tokens;
///
/// let tokens = Tokens::from_json(
///     r#"{"tokens": [{"name": "ci", "secret": "s3cret", "namespaces": ["staging"], "access": "write"}]}"#,
/// )?;
/// assert!(!format!("{tokens:?}").contains("s3cret"));
/// # Ok::<(), lodestar_registry_server::TokensError>(())
/// ```
#[derive(Clone, Default)]
pub struct Tokens {
    grants: Vec<Arc<Grant>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names and scopes only: never the secrets.
        f.debug_list()
            .entries(
                self.grants
                    .iter()
                    .map(|g| format!("{} ({:?} {:?})", g.name, g.access, g.namespaces)),
            )
            .finish()
    }
}

/// A tokens file that cannot be used: which file, which token, and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("registry tokens: {0}")]
pub struct TokensError(String);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tokens: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    secret: Option<String>,
    sha256: Option<String>,
    namespaces: Vec<String>,
    access: Access,
}

fn sha256(secret: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn parse_hex(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// A secret travels in a header: printable ASCII without spaces.
fn check_secret(secret: &str) -> Result<(), String> {
    if secret.is_empty() || !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "its secret must be non-empty printable ASCII without spaces \
                    (it travels in a header)"
                .to_owned(),
        );
    }
    Ok(())
}

/// The name of the token given with `--token` (or `LODESTAR_REGISTRY_TOKEN`).
pub const SINGLE_TOKEN_NAME: &str = "registry-token";

impl Tokens {
    /// No tokens: every request is allowed.
    pub fn none() -> Self {
        Self::default()
    }

    /// One token (named [`SINGLE_TOKEN_NAME`]) with write access to every
    /// namespace: what `--token` sets.
    pub fn single(secret: &str) -> Result<Self, TokensError> {
        check_secret(secret)
            .map_err(|why| TokensError(format!("the registry token is unusable: {why}")))?;
        Ok(Self {
            grants: vec![Arc::new(Grant {
                name: SINGLE_TOKEN_NAME.to_owned(),
                sha256: sha256(secret.as_bytes()),
                namespaces: vec![ALL_NAMESPACES.to_owned()],
                access: Access::Write,
            })],
        })
    }

    /// Tokens from a JSON document (in the format [`Tokens`] shows).
    pub fn from_json(json: &str) -> Result<Self, TokensError> {
        let file: File = serde_json::from_str(json).map_err(|e| {
            TokensError(format!(
                "not a tokens document ({e}); expected {{\"tokens\": [{{\"name\", \
                 \"secret\" or \"sha256\", \"namespaces\", \"access\": \"read\"|\"write\"}}]}}"
            ))
        })?;
        let mut tokens = Self::none();
        for entry in file.tokens {
            tokens = tokens.with(entry)?;
        }
        Ok(tokens)
    }

    /// Tokens from a JSON file (in the format [`Tokens`] shows).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokensError> {
        let path = path.as_ref();
        let json = std::fs::read_to_string(path)
            .map_err(|e| TokensError(format!("cannot read {}: {e}", path.display())))?;
        Self::from_json(&json).map_err(|e| TokensError(format!("{}: {}", path.display(), e.0)))
    }

    /// These tokens and `other`'s; a name or secret both hold is refused.
    pub fn merge(mut self, other: Tokens) -> Result<Self, TokensError> {
        for grant in other.grants {
            self.check_unique(&grant.name, &grant.sha256)?;
            self.grants.push(grant);
        }
        Ok(self)
    }

    /// Whether any token is configured (if not, every request is allowed).
    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }

    fn check_unique(&self, name: &str, digest: &[u8; 32]) -> Result<(), TokensError> {
        for grant in &self.grants {
            if grant.name == name {
                return Err(TokensError(format!("two tokens are named `{name}`")));
            }
            if constant_time_eq(&grant.sha256, digest) {
                return Err(TokensError(format!(
                    "tokens `{}` and `{name}` have the same secret",
                    grant.name
                )));
            }
        }
        Ok(())
    }

    fn with(mut self, entry: Entry) -> Result<Self, TokensError> {
        let name = entry.name;
        let bad = |why: &str| TokensError(format!("token `{name}`: {why}"));
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokensError(format!(
                "token name `{name}` must be non-empty printable ASCII without spaces"
            )));
        }
        let digest = match (entry.secret, entry.sha256) {
            (Some(secret), None) => {
                check_secret(&secret).map_err(|why| bad(&why))?;
                sha256(secret.as_bytes())
            }
            (None, Some(hex)) => parse_hex(&hex.to_ascii_lowercase())
                .ok_or_else(|| bad("\"sha256\" must be 64 hexadecimal digits"))?,
            _ => return Err(bad("give exactly one of \"secret\" and \"sha256\"")),
        };
        if entry.namespaces.is_empty() || entry.namespaces.iter().any(String::is_empty) {
            return Err(bad(
                "\"namespaces\" must list namespaces (or \"*\" for all), none empty",
            ));
        }
        self.check_unique(&name, &digest)?;
        self.grants.push(Arc::new(Grant {
            name,
            sha256: digest,
            namespaces: entry.namespaces,
            access: entry.access,
        }));
        Ok(self)
    }
}

/// The tokens and the open namespaces, as the APIs check them.
pub(crate) struct Auth {
    tokens: Tokens,
    open_reads: Arc<[String]>,
}

impl Auth {
    pub(crate) fn new(tokens: Tokens, open_reads: Vec<String>) -> Self {
        Self {
            tokens,
            open_reads: open_reads.into(),
        }
    }

    /// Who sent a request with this `authorization` header value: a known
    /// token, or anonymous (no header). A header naming no known token is
    /// refused outright.
    pub(crate) fn caller(&self, authorization: Option<&str>) -> Result<Caller, Denied> {
        let open = self.tokens.is_empty();
        let Some(value) = authorization else {
            return Ok(Caller {
                grant: None,
                open,
                open_reads: self.open_reads.clone(),
            });
        };
        if open {
            // Nothing to check against: a token is ignored, as before tokens existed.
            return Ok(Caller {
                grant: None,
                open,
                open_reads: self.open_reads.clone(),
            });
        }
        let given = value.strip_prefix("Bearer ").ok_or(Denied::Unknown)?;
        let digest = sha256(given.as_bytes());
        // Every grant is compared, so the time taken says nothing of which matched.
        let mut found = None;
        for grant in &self.tokens.grants {
            if constant_time_eq(&grant.sha256, &digest) {
                found = Some(grant.clone());
            }
        }
        let grant = found.ok_or(Denied::Unknown)?;
        Ok(Caller {
            grant: Some(grant),
            open,
            open_reads: self.open_reads.clone(),
        })
    }
}

/// Who is calling, as far as rights go.
#[derive(Clone)]
pub(crate) struct Caller {
    grant: Option<Arc<Grant>>,
    /// No tokens are configured: everything is allowed.
    open: bool,
    open_reads: Arc<[String]>,
}

impl Caller {
    /// Whether this caller may `access` `namespace`.
    pub(crate) fn may(&self, access: Access, namespace: &str) -> Result<(), Denied> {
        if self.open {
            return Ok(());
        }
        match &self.grant {
            Some(grant) if grant.covers(namespace) && grant.access >= access => Ok(()),
            // A token's own scope does not shrink what anyone may read.
            _ if access == Access::Read && covers(&self.open_reads, namespace) => Ok(()),
            Some(grant) => Err(Denied::Forbidden {
                token: grant.name.clone(),
                namespace: namespace.to_owned(),
                access,
            }),
            None => Err(Denied::Missing {
                namespace: namespace.to_owned(),
                access,
            }),
        }
    }

    /// Whether this caller may write anywhere: checked before a write's
    /// body is read, so that callers who could not write cost nothing.
    pub(crate) fn may_write_somewhere(&self) -> Result<(), Denied> {
        match &self.grant {
            _ if self.open => Ok(()),
            Some(grant) if grant.access == Access::Write => Ok(()),
            Some(grant) => Err(Denied::ReadOnly {
                token: grant.name.clone(),
            }),
            None => Err(Denied::Anonymous),
        }
    }
}

/// Why a request was refused. The messages name the token (by its name),
/// the namespace and the missing right; never the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Denied {
    /// The token given is not one this registry knows.
    #[error(
        "the token given is not one this registry accepts \
         (send `authorization: Bearer <token>` with a registry token)"
    )]
    Unknown,
    /// No token, and the request needs one.
    #[error(
        "{} namespace {} needs a token with {} access \
         (`authorization: Bearer <token>`)", access.verb(), quoted(namespace), access.noun()
    )]
    Missing {
        /// The namespace.
        namespace: String,
        /// The right needed.
        access: Access,
    },
    /// No token, and writes need one.
    #[error("writes to this registry need `authorization: Bearer <token>` with a write token")]
    Anonymous,
    /// The token does not cover the namespace with the right needed.
    #[error("token `{token}` has no {} access to namespace {}", access.noun(), quoted(namespace))]
    Forbidden {
        /// The token's name.
        token: String,
        /// The namespace.
        namespace: String,
        /// The right needed.
        access: Access,
    },
    /// A read-only token tried to write.
    #[error("token `{token}` is read-only; writes need a token with write access")]
    ReadOnly {
        /// The token's name.
        token: String,
    },
}

impl Denied {
    /// Whether the caller is not who the request needs (no or an unknown
    /// token: 401, `UNAUTHENTICATED`), rather than lacking a right (403,
    /// `PERMISSION_DENIED`).
    pub(crate) fn unauthenticated(&self) -> bool {
        matches!(
            self,
            Denied::Unknown | Denied::Missing { .. } | Denied::Anonymous
        )
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(json: &str, open_reads: &[&str]) -> Auth {
        let tokens = Tokens::from_json(json).unwrap();
        Auth::new(tokens, open_reads.iter().map(|s| (*s).to_owned()).collect())
    }

    const TWO_TENANTS: &str = r#"{"tokens": [
        {"name": "a-writer", "secret": "sa", "namespaces": ["a"], "access": "write"},
        {"name": "b-reader", "sha256": "A0A27C3F1D76F64A0D1C8A6F11ECB4B7C1D2B6C1A7B6A9B0B2C3D4E5F6A7B8C9", "namespaces": ["b"], "access": "read"},
        {"name": "ops", "secret": "so", "namespaces": ["*"], "access": "read"}
    ]}"#;

    #[test]
    fn tokens_reach_only_their_namespaces_with_their_rights() {
        let auth = auth(TWO_TENANTS, &[]);
        let a = auth.caller(Some("Bearer sa")).unwrap();
        assert_eq!(a.may(Access::Write, "a"), Ok(()));
        assert_eq!(a.may(Access::Read, "a"), Ok(()));
        let denied = a.may(Access::Read, "b").unwrap_err();
        assert_eq!(
            denied.to_string(),
            "token `a-writer` has no read access to namespace `b`"
        );
        assert!(!denied.unauthenticated());
        let ops = auth.caller(Some("Bearer so")).unwrap();
        assert_eq!(ops.may(Access::Read, "anything"), Ok(()));
        assert!(ops.may(Access::Write, "a").is_err());
        assert!(matches!(
            ops.may_write_somewhere(),
            Err(Denied::ReadOnly { .. })
        ));
        let anonymous = auth.caller(None).unwrap();
        let denied = anonymous.may(Access::Read, "a").unwrap_err();
        assert!(denied.unauthenticated());
        assert!(denied.to_string().contains("namespace `a`"), "{denied}");
        assert_eq!(
            auth.caller(Some("Bearer nope")).err(),
            Some(Denied::Unknown)
        );
        assert_eq!(auth.caller(Some("sa")).err(), Some(Denied::Unknown));
    }

    #[test]
    fn open_reads_let_anonymous_callers_read_only_the_listed_namespaces() {
        let auth = auth(TWO_TENANTS, &["public"]);
        let anonymous = auth.caller(None).unwrap();
        assert_eq!(anonymous.may(Access::Read, "public"), Ok(()));
        assert!(anonymous.may(Access::Write, "public").is_err());
        assert!(anonymous.may(Access::Read, "a").is_err());
        let a = auth.caller(Some("Bearer sa")).unwrap();
        assert_eq!(a.may(Access::Read, "public"), Ok(()));
    }

    #[test]
    fn without_tokens_everything_is_open() {
        let auth = Auth::new(Tokens::none(), vec![]);
        let anyone = auth.caller(Some("Bearer whatever")).unwrap();
        assert_eq!(anyone.may(Access::Write, "a"), Ok(()));
        assert_eq!(anyone.may_write_somewhere(), Ok(()));
    }

    #[test]
    fn bad_tokens_files_are_refused_with_the_token_named_but_not_its_secret() {
        for (json, says) in [
            (
                r#"{"tokens": [{"name": "x", "namespaces": ["a"], "access": "read"}]}"#,
                "exactly one",
            ),
            (
                r#"{"tokens": [{"name": "x", "sha256": "abc", "namespaces": ["a"], "access": "read"}]}"#,
                "64 hexadecimal",
            ),
            (
                r#"{"tokens": [{"name": "x", "secret": "hush hush", "namespaces": ["a"], "access": "read"}]}"#,
                "without spaces",
            ),
            (
                r#"{"tokens": [{"name": "x", "secret": "s", "namespaces": [], "access": "read"}]}"#,
                "\"namespaces\"",
            ),
            (
                r#"{"tokens": [{"name": "x", "secret": "s", "namespaces": ["a"], "access": "all"}]}"#,
                "not a tokens document",
            ),
            (
                r#"{"tokens": [{"name": "x", "secret": "s1", "namespaces": ["a"], "access": "read"},
                               {"name": "y", "secret": "s1", "namespaces": ["b"], "access": "read"}]}"#,
                "same secret",
            ),
        ] {
            let error = Tokens::from_json(json).unwrap_err().to_string();
            assert!(error.contains(says), "{json}: {error}");
            assert!(!error.contains("hush") && !error.contains("s1"), "{error}");
        }
        let debug = format!("{:?}", Tokens::from_json(TWO_TENANTS).unwrap());
        assert!(
            debug.contains("a-writer") && !debug.contains("sa\""),
            "{debug}"
        );
    }

    #[test]
    fn a_sha256_in_the_file_matches_its_secret() {
        let digest: String = sha256(b"t0ken")
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect();
        let json = format!(
            r#"{{"tokens": [{{"name": "h", "sha256": "{digest}", "namespaces": ["a"], "access": "write"}}]}}"#
        );
        let auth = auth(&json, &[]);
        assert!(auth.caller(Some("Bearer t0ken")).is_ok());
    }
}
