//! `lodestar list TARGET [SERVICE]`: the services a server serves, or the
//! methods of one, through server reflection.

use std::error::Error;
use std::process::ExitCode;
use std::time::Duration;

use lodestar::MessageLimits;
use lodestar::registry::limits::printable;
use prost_reflect::MethodDescriptor;
use serde_json::json;

use super::reflection::Reflection;
use super::target::TargetArgs;
use super::{Failure, FailureKind};
use crate::table::{Align, Table};

/// Each reflection round may take this long beyond --connect-timeout.
const REFLECTION_SLACK: Duration = Duration::from_secs(20);

/// Options of `lodestar list`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    lodestar list route-guide                          the services of an instance of route-guide\n  \
    lodestar list 127.0.0.1:10000 RouteGuide           its methods: kind, input and output types\n  \
    lodestar list route-guide RouteGuide --output json for scripts")]
pub(crate) struct ListArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// List the methods of this service (pkg.Service, or Service when
    /// unambiguous). Default: list the services.
    service: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ListOutput::Table)]
    output: ListOutput,
}

/// How `list` prints.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ListOutput {
    /// Columns, for people.
    Table,
    /// One JSON document, for scripts.
    Json,
}

/// The name of a method's call kind.
pub(crate) fn kind(method: &MethodDescriptor) -> &'static str {
    match (method.is_client_streaming(), method.is_server_streaming()) {
        (false, false) => "unary",
        (false, true) => "server_streaming",
        (true, false) => "client_streaming",
        (true, true) => "bidi_streaming",
    }
}

/// Runs `lodestar list`.
pub(crate) async fn run(args: ListArgs) -> Result<ExitCode, Box<dyn Error>> {
    let waiting = super::waiting(format!(
        "finding {} and reading its schema",
        printable(&args.target.target)
    ));
    let connection = args.target.connect().await?;
    let mut reflection = Reflection::new(
        connection,
        MessageLimits::default().max_decoding_message_size,
        args.target.connect_timeout() + REFLECTION_SLACK,
    );
    let services = reflection.services().await?;
    let Some(wanted) = &args.service else {
        drop(waiting);
        match args.output {
            ListOutput::Json => println!("{}", json!({ "services": services })),
            ListOutput::Table => {
                for service in &services {
                    println!("{}", printable(service));
                }
            }
        }
        return Ok(ExitCode::SUCCESS);
    };
    let service = pick_service(wanted, &services)?;
    let pool = reflection.pool(std::slice::from_ref(&service)).await?;
    drop(waiting);
    let descriptor = pool.get_service_by_name(&service).ok_or_else(|| {
        Failure::new(
            FailureKind::Reflection,
            format!(
                "the server lists `{}` but does not describe it",
                printable(&service)
            ),
        )
    })?;
    let methods: Vec<MethodDescriptor> = descriptor.methods().collect();
    match args.output {
        ListOutput::Json => {
            let methods: Vec<_> = methods
                .iter()
                .map(|m| {
                    json!({
                        "method": m.name(),
                        "path": format!("{}/{}", service, m.name()),
                        "kind": kind(m),
                        "input": m.input().full_name(),
                        "output": m.output().full_name(),
                    })
                })
                .collect();
            println!("{}", json!({ "service": service, "methods": methods }));
        }
        ListOutput::Table => {
            let mut table = Table::new(&[
                ("METHOD", Align::Left),
                ("KIND", Align::Left),
                ("INPUT", Align::Left),
                ("OUTPUT", Align::Left),
            ]);
            for m in &methods {
                // Names come from the server: printed safely.
                table.row(vec![
                    printable(&format!("{service}/{}", m.name())).into_owned(),
                    kind(m).to_owned(),
                    printable(m.input().full_name()).into_owned(),
                    printable(m.output().full_name()).into_owned(),
                ]);
            }
            table.print();
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The one service of `services` that `wanted` names: its full name, or
/// its end after a package boundary.
fn pick_service(wanted: &str, services: &[String]) -> Result<String, Failure> {
    if services.iter().any(|s| s == wanted) {
        return Ok(wanted.to_owned());
    }
    let matches: Vec<&String> = services
        .iter()
        .filter(|s| s.strip_suffix(wanted).is_some_and(|p| p.ends_with('.')))
        .collect();
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(Failure::new(
            FailureKind::Method,
            format!(
                "unknown service `{}`; the server serves: {}",
                printable(wanted),
                super::closest(wanted, services.iter().map(String::as_str), 10)
                    .iter()
                    .map(|s| printable(s).into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
        several => Err(Failure::new(
            FailureKind::Method,
            format!(
                "service `{}` is ambiguous; it could be: {}",
                printable(wanted),
                several
                    .iter()
                    .map(|s| printable(s).into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_is_named_in_full_or_by_its_end() {
        let services: Vec<String> = ["routeguide.RouteGuide", "a.Echo", "b.Echo"]
            .map(str::to_owned)
            .to_vec();
        assert_eq!(
            pick_service("RouteGuide", &services).unwrap(),
            "routeguide.RouteGuide"
        );
        assert_eq!(pick_service("a.Echo", &services).unwrap(), "a.Echo");
        let ambiguous = pick_service("Echo", &services).unwrap_err().message;
        assert!(ambiguous.contains("a.Echo, b.Echo"), "{ambiguous}");
        let unknown = pick_service("RouteGuid", &services).unwrap_err().message;
        assert!(
            unknown.contains("the server serves: routeguide.RouteGuide"),
            "{unknown}"
        );
        assert!(pick_service("Guide", &services).is_err());
    }
}
