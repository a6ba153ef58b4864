//! The server policy of a service, as data: settings per method (such as
//! the faults injected into their calls, [`FaultSettings`]), read from
//! TOML or JSON ([`Policy::from_toml`], [`Policy::from_json`],
//! [`Policy::from_file`]), set with
//! [`ServiceBuilder::policy`](super::ServiceBuilder::policy) and replaced
//! on a running service with
//! [`RunningService::set_policy`](super::RunningService::set_policy). Every
//! way of reading one also [validates](Policy::validate) it: a bad policy is
//! refused with a [`PolicyError`] naming the field, its value and what was
//! expected, and the old policy stays in force.
//!
//! ```
//! use lodestar::server::policy::{Policy, PolicyError};
//!
//! let policy = Policy::from_toml(r#"
//!     [[methods]]
//!     names = ["helloworld.Greeter/SayHello"]
//!
//!     [[methods]]
//!     names = ["helloworld.Greeter/*"]    # the service's other methods
//! "#)?;
//! assert_eq!(
//!     policy.method("/helloworld.Greeter/SayHello").map(|m| m.names[0].as_str()),
//!     Some("helloworld.Greeter/SayHello"),
//! );
//! assert!(policy.method("/helloworld.Greeter/Other").is_some());
//! assert!(policy.method("/grpc.health.v1.Health/Check").is_none());
//!
//! let error = Policy::from_toml("[[methods]]\nnames = [\"Greeter.SayHello\"]").unwrap_err();
//! assert!(error.to_string().starts_with("policy field `methods[0].names[0]`"));
//! # Ok::<(), PolicyError>(())
//! ```
//!
//! Every default, written out (an empty document gives the same policy):
//!
//! ```
//! # use lodestar::server::policy::Policy;
//! let defaults = Policy::from_toml(r#"
//!     methods = []    # no settings of particular methods
//! "#)?;
//! assert_eq!(defaults, Policy::default());
//! # Ok::<(), lodestar::server::policy::PolicyError>(())
//! ```

use serde::{Deserialize, Serialize};

pub use super::admission::{
    Adaptive, Concurrency, MAX_BURST, MAX_CONCURRENCY, MAX_KEY_LEN, MAX_KEYS, MAX_RATE,
    MAX_WINDOW_MS, RateLimit,
};
pub use crate::fault::FaultSettings;
use crate::policy_data::{self, MethodNames};
pub use crate::policy_data::{MAX_POLICY_FILE, PolicyError};

/// The whole server policy of one service.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Policy {
    /// Settings of particular methods. A call takes the first entry naming
    /// its method (`package.Service/Method`), else the first naming its
    /// service (`package.Service/*`), else the first named `"*"`, else
    /// none. Default: none. At most [`MAX_METHOD_POLICIES`].
    pub methods: Vec<MethodPolicy>,
}

/// Settings of some methods (see [`Policy::methods`]).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct MethodPolicy {
    /// The methods: `package.Service/Method`, `package.Service/*` for the
    /// methods of a service no other entry names, or `"*"` for every
    /// other method. At least one; at most [`MAX_METHOD_NAMES`], each at
    /// most [`MAX_METHOD_NAME`] bytes.
    pub names: Vec<String>,
    /// Faults injected into their calls ([`fault`](crate::fault)).
    /// Default: none.
    pub fault: Option<FaultSettings>,
    /// A token bucket for the calls these methods take together (or per
    /// caller). Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// A limit on these methods' calls in flight together, fixed or
    /// adaptive. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
}

/// The most entries [`Policy::methods`] may have, and names one
/// [`MethodPolicy`] may list: as for the client's policy.
pub use crate::client::policy::{MAX_METHOD_NAMES, MAX_METHOD_POLICIES};

/// The longest name a [`MethodPolicy`] may list: 512 bytes.
pub const MAX_METHOD_NAME: usize = 512;

impl Policy {
    crate::policy_data::readers!();

    /// Checks every field; the first found wrong is named in the error,
    /// with its value and what was expected.
    pub fn validate(&self) -> Result<(), PolicyError> {
        validate_methods(&self.methods)
    }

    /// The settings of the method at `path` (`/package.Service/Method`, as
    /// in a call's URI; the leading `/` may be left out): see
    /// [`methods`](Self::methods) for which entry applies.
    pub fn method(&self, path: &str) -> Option<&MethodPolicy> {
        let path = path.strip_prefix('/').unwrap_or(path);
        let service = path.rsplit_once('/').map(|(service, _)| service);
        let names = |wanted: &dyn Fn(&str) -> bool| {
            self.methods
                .iter()
                .find(|m| m.names.iter().any(|n| wanted(n)))
        };
        names(&|n| n == path)
            .or_else(|| {
                service.and_then(|service| names(&|n| n.strip_suffix("/*") == Some(service)))
            })
            .or_else(|| names(&|n| n == "*"))
    }
}

fn validate_methods(methods: &[MethodPolicy]) -> Result<(), PolicyError> {
    policy_data::validate_method_names(
        methods.iter().map(|m| m.names.as_slice()),
        &MethodNames {
            max_entries: MAX_METHOD_POLICIES,
            max_names: MAX_METHOD_NAMES,
            well_formed,
            expected: &format!(
                "`package.Service/Method`, `package.Service/*` or \"*\" (letters, digits, `_`, \
                 and `.` in the service; at most {MAX_METHOD_NAME} bytes)"
            ),
            empty: "at least one name: `package.Service/Method`, `package.Service/*` or \"*\"",
        },
    )?;
    for (i, entry) in methods.iter().enumerate() {
        if let Some(fault) = &entry.fault {
            fault.validate(&format!("methods[{i}].fault"))?;
        }
        if let Some(limit) = &entry.rate_limit {
            super::admission::validate_rate_limit(&format!("methods[{i}].rate_limit"), limit)?;
        }
        if let Some(limit) = &entry.concurrency {
            super::admission::validate_concurrency(&format!("methods[{i}].concurrency"), limit)?;
        }
    }
    Ok(())
}

/// `*`, or `service/method` or `service/*`, the service made of dotted
/// identifiers and the method one identifier.
fn well_formed(name: &str) -> bool {
    if name == "*" {
        return true;
    }
    let identifier =
        |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    name.len() <= MAX_METHOD_NAME
        && name.split_once('/').is_some_and(|(service, method)| {
            service.split('.').all(identifier) && (method == "*" || identifier(method))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_method_takes_its_own_entry_then_its_services_then_the_default() {
        let policy = Policy::from_toml(
            r#"
            [[methods]]
            names = ["*"]
            [[methods]]
            names = ["a.S/*"]
            [[methods]]
            names = ["a.S/Get", "b.T/Put"]
            "#,
        )
        .unwrap();
        let entry = |path| policy.method(path).map(|m| m.names[0].as_str());
        assert_eq!(entry("/a.S/Get"), Some("a.S/Get"));
        assert_eq!(entry("b.T/Put"), Some("a.S/Get"));
        assert_eq!(entry("/a.S/List"), Some("a.S/*"));
        assert_eq!(entry("/b.T/List"), Some("*"));
        assert_eq!(Policy::default().method("/a.S/Get"), None);
    }

    #[test]
    fn names_are_checked_and_listed_once() {
        let error = |toml: &str| Policy::from_toml(toml).unwrap_err().to_string();
        for bad in [
            "Get",
            "/a.S/Get",
            "a.S/Get/x",
            "a..S/Get",
            "a.S/",
            "a.S/G-t",
        ] {
            let message = error(&format!("[[methods]]\nnames = [\"a.S/Ok\", \"{bad}\"]"));
            assert!(
                message.starts_with("policy field `methods[0].names[1]` is `"),
                "{bad}: {message}"
            );
        }
        assert_eq!(
            error("[[methods]]\nnames = [\"a.S/*\"]\n[[methods]]\nnames = [\"a.S/*\"]"),
            "policy field `methods[1].names[0]` is `a.S/*`: expected a name no earlier entry lists"
        );
        assert!(
            error("[[methods]]\nnames = []").starts_with("policy field `methods[0].names` is []")
        );
        assert!(error("[[methods]]\nnamez = []").contains("unknown field"));
    }
}
