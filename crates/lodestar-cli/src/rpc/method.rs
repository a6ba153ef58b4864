//! METHOD: which of a server's methods a name given on the command line means.
//!
//! Accepted forms, matched exactly (case included):
//!
//! * `pkg.Service/Method` and `pkg.Service.Method` (the full name);
//! * `Service/Method` and `Service.Method` (the service without its package,
//!   or with only the end of it);
//! * `Method`, when one service alone has a method of that name.
//!
//! A name that matches nothing, or more than one method, is an error that
//! lists the candidates, closest first.

use lodestar::registry::limits::printable;

use super::{Failure, FailureKind};

/// How many candidates an error lists at most.
const MAX_CANDIDATES: usize = 8;

/// A method, by its service's full name and its own name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MethodRef {
    /// `pkg.Service`.
    pub(crate) service: String,
    /// `Method`.
    pub(crate) method: String,
}

impl MethodRef {
    /// `pkg.Service/Method`.
    pub(crate) fn full(&self) -> String {
        format!("{}/{}", self.service, self.method)
    }

    /// The request path, `/pkg.Service/Method`.
    pub(crate) fn path(&self) -> String {
        format!("/{}/{}", self.service, self.method)
    }
}

/// The service METHOD names explicitly, if any (`pkg.Service` or
/// `Service`): lets a caller fetch only that service's schema.
pub(crate) fn service_part(spec: &str) -> Option<&str> {
    match spec.split_once('/') {
        Some((service, _)) => Some(service),
        None => spec.rsplit_once('.').map(|(service, _)| service),
    }
}

/// The one method of `methods` (`(service, method)` full names) that
/// `spec` names.
pub(crate) fn resolve(spec: &str, methods: &[(String, String)]) -> Result<MethodRef, Failure> {
    let (service, method) = match spec.split_once('/') {
        Some((service, method)) => (Some(service), method),
        None => match spec.rsplit_once('.') {
            Some((service, method)) => (Some(service), method),
            None => (None, spec),
        },
    };
    if method.is_empty() || service.is_some_and(str::is_empty) || method.contains('/') {
        return Err(Failure::new(
            FailureKind::Method,
            format!(
                "METHOD `{}` is not a method name (expected pkg.Service/Method, \
                 pkg.Service.Method, Service/Method or Method)",
                printable(spec)
            ),
        ));
    }
    let service_matches = |full: &str| match service {
        None => true,
        Some(wanted) => {
            full == wanted
                || full
                    .strip_suffix(wanted)
                    .is_some_and(|package| package.ends_with('.'))
        }
    };
    let matches: Vec<&(String, String)> = methods
        .iter()
        .filter(|(s, m)| m == method && service_matches(s))
        .collect();
    let full = |(s, m): &(String, String)| format!("{s}/{m}");
    match matches.as_slice() {
        [(service, method)] => Ok(MethodRef {
            service: service.clone(),
            method: method.clone(),
        }),
        [] => {
            let names: Vec<String> = methods.iter().map(full).collect();
            // Compared in the form the user wrote: with or without the service.
            let normalised = match service {
                Some(service) => format!("{service}/{method}"),
                None => method.to_owned(),
            };
            let ranked = rank(&normalised, service.is_some(), methods);
            let known = if names.is_empty() {
                "the server lists no methods".to_owned()
            } else {
                format!("closest: {}", ranked.join(", "))
            };
            Err(Failure::new(
                FailureKind::Method,
                format!("unknown method `{}`; {known}", printable(spec)),
            ))
        }
        several => {
            let names: Vec<String> = several.iter().map(|m| full(m)).collect();
            Err(Failure::new(
                FailureKind::Method,
                format!(
                    "method `{}` is ambiguous; it could be: {} (give the service too)",
                    printable(spec),
                    names.join(", ")
                ),
            ))
        }
    }
}

/// The full names of `methods`, closest to `wanted` first, compared as
/// `Service/Method` (suffix of the full name) when `with_service`, else by
/// the method's name alone.
fn rank(wanted: &str, with_service: bool, methods: &[(String, String)]) -> Vec<String> {
    let wanted = wanted.to_lowercase();
    let mut scored: Vec<(usize, String)> = methods
        .iter()
        .map(|(service, method)| {
            let full = format!("{service}/{method}");
            let score = if with_service {
                let short = service.rsplit('.').next().unwrap_or(service);
                super::distance(&wanted, &full.to_lowercase()).min(super::distance(
                    &wanted,
                    &format!("{short}/{method}").to_lowercase(),
                ))
            } else {
                super::distance(&wanted, &method.to_lowercase())
            };
            (score, full)
        })
        .collect();
    scored.sort();
    scored
        .into_iter()
        .take(MAX_CANDIDATES)
        .map(|(_, name)| printable(&name).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn methods() -> Vec<(String, String)> {
        [
            ("routeguide.RouteGuide", "GetFeature"),
            ("routeguide.RouteGuide", "ListFeatures"),
            ("routeguide.RouteGuide", "RecordRoute"),
            ("routeguide.RouteGuide", "RouteChat"),
            ("lodestar.test.Echo", "Unary"),
            ("lodestar.test.Echo", "Fail"),
            ("other.v1.Echo", "Unary"),
            ("grpc.health.v1.Health", "Check"),
        ]
        .into_iter()
        .map(|(s, m)| (s.to_owned(), m.to_owned()))
        .collect()
    }

    fn ok(spec: &str) -> String {
        resolve(spec, &methods()).unwrap().full()
    }

    fn err(spec: &str) -> String {
        let failure = resolve(spec, &methods()).unwrap_err();
        assert_eq!(failure.kind, FailureKind::Method);
        failure.message
    }

    #[test]
    fn every_form_names_the_method() {
        let want = "routeguide.RouteGuide/GetFeature";
        for spec in [
            "routeguide.RouteGuide/GetFeature",
            "routeguide.RouteGuide.GetFeature",
            "RouteGuide/GetFeature",
            "RouteGuide.GetFeature",
            "GetFeature",
        ] {
            assert_eq!(ok(spec), want, "{spec}");
        }
        assert_eq!(ok("test.Echo/Unary"), "lodestar.test.Echo/Unary");
        assert_eq!(ok("v1.Echo.Unary"), "other.v1.Echo/Unary");
        assert_eq!(ok("Fail"), "lodestar.test.Echo/Fail");
    }

    #[test]
    fn a_service_matches_at_a_package_boundary_only() {
        // `Guide` is the end of `RouteGuide`, but not a name in the package path.
        let message = err("Guide/GetFeature");
        assert!(message.contains("unknown method"), "{message}");
        assert!(
            message.contains("closest: routeguide.RouteGuide/GetFeature"),
            "{message}"
        );
    }

    #[test]
    fn an_ambiguous_name_lists_the_methods_it_could_be() {
        let message = err("Unary");
        assert!(message.contains("ambiguous"), "{message}");
        assert!(message.contains("lodestar.test.Echo/Unary"), "{message}");
        assert!(message.contains("other.v1.Echo/Unary"), "{message}");
        assert!(!message.contains("GetFeature"), "{message}");
        let message = err("Echo/Unary");
        assert!(message.contains("ambiguous"), "{message}");
    }

    #[test]
    fn an_unknown_name_lists_the_closest_first() {
        let message = err("GetFeatures");
        let closest = message.split("closest: ").nth(1).unwrap();
        assert!(
            closest.starts_with("routeguide.RouteGuide/GetFeature, "),
            "{message}"
        );
        let message = err("RouteGuide/RouteChats");
        let closest = message.split("closest: ").nth(1).unwrap();
        assert!(
            closest.starts_with("routeguide.RouteGuide/RouteChat"),
            "{message}"
        );
        // Case counts, and the candidates say so.
        let message = err("getfeature");
        assert!(
            message.contains("closest: routeguide.RouteGuide/GetFeature"),
            "{message}"
        );
    }

    #[test]
    fn malformed_names_say_what_is_expected() {
        for spec in ["", "/GetFeature", "RouteGuide/", "a/b/c", "RouteGuide."] {
            let message = err(spec);
            assert!(
                message.contains("expected pkg.Service/Method"),
                "{spec}: {message}"
            );
        }
    }

    #[test]
    fn the_service_part_is_found_in_each_form() {
        assert_eq!(service_part("a.B/C"), Some("a.B"));
        assert_eq!(service_part("a.B.C"), Some("a.B"));
        assert_eq!(service_part("B/C"), Some("B"));
        assert_eq!(service_part("C"), None);
    }
}
