//! `lodestar new NAME`: a new service crate from templates compiled into
//! the binary, so it needs no network, no git and no `protoc`.

use std::error::Error;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Options of `lodestar new`.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
The crate has a .proto with one method of each call kind, its handlers, a main that reads
lodestar.toml (registry, bind address, …) and shuts down gracefully, and a test that starts
it on a free port and calls every method. Output depends only on the arguments: running
the same command twice writes the same bytes.

Examples:
  lodestar new greeter
  lodestar new orders --dir services/orders --lodestar-path ../lodestar")]
pub(crate) struct Args {
    /// The crate's name, which is also the service's name in the registry:
    /// lowercase letters, digits, `-` and `_`, starting with a letter.
    name: String,
    /// The directory to create. Default: ./NAME.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Overwrites the generated files in a directory that is not empty
    /// (other files are left alone).
    #[arg(long)]
    force: bool,
    /// Depends on this version of the lodestar crates (crates.io).
    #[arg(long, value_name = "VERSION", default_value = env!("CARGO_PKG_VERSION"), conflicts_with = "lodestar_path")]
    lodestar_version: String,
    /// Depends on the lodestar crates in this checkout of the lodestar
    /// repository instead (for developing lodestar itself).
    #[arg(long, value_name = "DIR")]
    lodestar_path: Option<PathBuf>,
}

/// Where the generated crate's lodestar dependencies come from.
enum Source {
    Version(String),
    /// The canonical path of a lodestar checkout.
    Path(PathBuf),
}

/// The names one crate name gives the generated code.
struct Names {
    /// The crate (and registered service) name, as given: `demo-svc`.
    name: String,
    /// The crate's Rust name: `demo_svc`.
    krate: String,
    /// The protobuf package: `demo_svc.v1`.
    package: String,
    /// The protobuf service: `DemoSvc`.
    service: String,
    /// tonic's module-name form of the service: `demo_svc`.
    service_snake: String,
}

/// A crate name `lodestar new` refuses, and why.
#[derive(Debug)]
struct InvalidName {
    name: String,
    reason: &'static str,
}

impl fmt::Display for InvalidName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid crate name {:?}: {} (expected lowercase letters, digits, `-` and `_`, \
             starting with a letter, e.g. `orders` or `demo-svc`)",
            self.name, self.reason
        )
    }
}

impl Error for InvalidName {}

/// The longest crate name: enough for any service, short enough that the
/// generated code stays as rustfmt lays it out.
const MAX_NAME: usize = 40;

/// Names that would break the generated code or cargo.
const RESERVED: &[&str] = &[
    "test", "build", "main", "lib", "proto", "service", "lodestar", "core", "std", "alloc", "self",
    "super", "crate", "tokio",
];

impl Names {
    fn new(name: &str) -> Result<Self, InvalidName> {
        let invalid = |reason| InvalidName {
            name: name.chars().take(80).collect(),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("it is empty"));
        }
        if name.len() > MAX_NAME {
            return Err(invalid("it is longer than 40 characters"));
        }
        if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
            return Err(invalid("it must start with a lowercase letter"));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
        {
            return Err(invalid(if c.is_ascii_uppercase() {
                "it has an uppercase letter"
            } else {
                "it has a character other than a-z, 0-9, `-` and `_`"
            }));
        }
        if name.ends_with(['-', '_']) || name.contains("--") || name.contains("__") {
            return Err(invalid("`-` and `_` must separate words"));
        }
        let krate = name.replace('-', "_");
        if RESERVED.contains(&krate.as_str()) {
            return Err(invalid(
                "it is reserved by Rust, cargo or the generated code",
            ));
        }
        let service: String = krate
            .split('_')
            .map(|word| {
                let mut chars = word.chars();
                chars.next().map_or_else(String::new, |first| {
                    first.to_ascii_uppercase().to_string() + chars.as_str()
                })
            })
            .collect();
        // tonic names a service's modules by putting `_` before each capital.
        let mut service_snake = String::new();
        for (i, c) in service.chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
                service_snake.push('_');
            }
            service_snake.push(c.to_ascii_lowercase());
        }
        Ok(Self {
            name: name.to_owned(),
            package: format!("{krate}.v1"),
            krate,
            service,
            service_snake,
        })
    }
}

/// One file of the generated crate: its path and its template.
const FILES: &[(&str, &str)] = &[
    (
        "Cargo.toml",
        include_str!("../templates/service/Cargo.toml.tmpl"),
    ),
    (
        "build.rs",
        include_str!("../templates/service/build.rs.tmpl"),
    ),
    (
        "proto/{{crate}}.proto",
        include_str!("../templates/service/proto.tmpl"),
    ),
    (
        "src/lib.rs",
        include_str!("../templates/service/lib.rs.tmpl"),
    ),
    (
        "src/service.rs",
        include_str!("../templates/service/service.rs.tmpl"),
    ),
    (
        "src/main.rs",
        include_str!("../templates/service/main.rs.tmpl"),
    ),
    (
        "tests/smoke.rs",
        include_str!("../templates/service/smoke.rs.tmpl"),
    ),
    (
        "lodestar.toml",
        include_str!("../templates/service/lodestar.toml.tmpl"),
    ),
    (
        "README.md",
        include_str!("../templates/service/README.md.tmpl"),
    ),
    (
        ".gitignore",
        include_str!("../templates/service/gitignore.tmpl"),
    ),
];

/// The generated crate: each file's relative path and contents.
fn render(names: &Names, source: &Source) -> Vec<(String, String)> {
    let dependency = |krate: &str, dir: &str| match source {
        Source::Version(version) => format!("{krate} = \"{version}\""),
        Source::Path(root) => format!(
            "{krate} = {{ path = {} }}",
            toml_string(&root.join("crates").join(dir).to_string_lossy())
        ),
    };
    let config = project_config(names);
    let substitute = |text: &str| {
        text.replace("{{dep_lodestar}}", &dependency("lodestar", "lodestar"))
            .replace(
                "{{dep_lodestar_registry}}",
                &dependency("lodestar-registry", "lodestar-registry"),
            )
            .replace(
                "{{dep_lodestar_build}}",
                &dependency("lodestar-build", "lodestar-build"),
            )
            .replace("{{config}}", &config)
            .replace("{{name}}", &names.name)
            .replace("{{crate}}", &names.krate)
            .replace("{{package}}", &names.package)
            .replace("{{Service}}", &names.service)
            .replace("{{service_snake}}", &names.service_snake)
    };
    FILES
        .iter()
        .map(|(path, template)| (substitute(path), substitute(template)))
        .collect()
}

/// The keys a new service sets in its `lodestar.toml`: (table, key, value).
fn project_keys(names: &Names) -> [(&'static str, &'static str, String); 4] {
    [
        ("service", "name", toml_string(&names.name)),
        ("service", "version", toml_string("0.1.0")),
        ("service", "bind", toml_string("127.0.0.1:50051")),
        // `lodestar registry` on its default port.
        (
            "registry",
            "url",
            toml_string(lodestar_registry::DEFAULT_URL),
        ),
    ]
}

/// lodestar's complete default `lodestar.toml` with the project's keys set
/// and every other key commented out (still documented, easy to turn on).
fn project_config(names: &Names) -> String {
    let keys = project_keys(names);
    let mut table = "";
    let mut out = String::new();
    for line in lodestar::config::default_toml().lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = name;
            out.push_str(line);
        } else if let Some((key, _)) = line.split_once(" = ").filter(|_| !line.starts_with('#')) {
            match keys.iter().find(|(t, k, _)| *t == table && *k == key) {
                Some((_, _, value)) => out.push_str(&format!("{key} = {value}")),
                None => out.push_str(&format!("# {line}")),
            }
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out.trim_end().to_owned()
}

/// `text` as a TOML basic string.
fn toml_string(text: &str) -> String {
    let mut out = String::from('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The checkout `path` points at, checked to hold the lodestar crates.
fn lodestar_checkout(path: &Path) -> Result<PathBuf, Box<dyn Error>> {
    let root = path
        .canonicalize()
        .map_err(|e| format!("--lodestar-path {}: {e}", path.display()))?;
    for krate in ["lodestar", "lodestar-registry", "lodestar-build"] {
        if !root.join("crates").join(krate).join("Cargo.toml").is_file() {
            return Err(format!(
                "--lodestar-path {}: no crates/{krate}/Cargo.toml there \
                 (expected the root of a lodestar checkout)",
                root.display()
            )
            .into());
        }
    }
    Ok(root)
}

pub(crate) fn run(args: Args) -> Result<ExitCode, Box<dyn Error>> {
    let names = match Names::new(&args.name) {
        Ok(names) => names,
        Err(e) => {
            eprintln!("lodestar new: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let source = match &args.lodestar_path {
        Some(path) => Source::Path(lodestar_checkout(path)?),
        None => Source::Version(args.lodestar_version.clone()),
    };
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&names.name));
    if !args.force && dir.exists() {
        let mut entries =
            std::fs::read_dir(&dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        if entries.next().is_some() {
            eprintln!(
                "lodestar new: {} exists and is not empty; choose another --dir, or pass \
                 --force to overwrite the generated files in it",
                dir.display()
            );
            return Ok(ExitCode::from(1));
        }
    }
    let files = render(&names, &source);
    for (path, contents) in &files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&path, contents)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    println!(
        "Created {} ({} files): the service {}.{} with one method of each call kind.",
        dir.display(),
        files.len(),
        names.package,
        names.service
    );
    println!("\nNext:");
    println!("  cd {}", dir.display());
    println!("  cargo test                 # starts it on a free port and calls every method");
    println!("  lodestar registry &        # the registry lodestar.toml points at");
    println!("  cargo run                  # serves on 127.0.0.1:50051");
    println!(
        "  lodestar call 127.0.0.1:50051 {}.{}/Hello -d '{{\"name\": \"Ada\"}}'",
        names.package, names.service
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_follow_the_crate_name() {
        let names = Names::new("demo-svc").unwrap();
        assert_eq!(names.krate, "demo_svc");
        assert_eq!(names.package, "demo_svc.v1");
        assert_eq!(names.service, "DemoSvc");
        assert_eq!(names.service_snake, "demo_svc");
        let names = Names::new("orders2_api").unwrap();
        assert_eq!(names.service, "Orders2Api");
        assert_eq!(names.service_snake, "orders2_api");
        let names = Names::new("shop-2nd").unwrap();
        assert_eq!(names.service, "Shop2nd");
        assert_eq!(names.service_snake, "shop2nd");
    }

    #[test]
    fn bad_names_are_refused_with_the_reason() {
        for (name, reason) in [
            ("", "empty"),
            ("Demo", "start with a lowercase"),
            ("demoSvc", "uppercase"),
            ("9lives", "start with a lowercase"),
            ("demo svc", "other than"),
            ("demo/svc", "other than"),
            ("demo-", "separate words"),
            ("a--b", "separate words"),
            ("test", "reserved"),
            ("lodestar", "reserved"),
        ] {
            let error = Names::new(name).err().unwrap().to_string();
            assert!(error.contains(reason), "{name:?}: {error}");
        }
    }

    #[test]
    fn every_placeholder_is_filled() {
        let names = Names::new("demo-svc").unwrap();
        for source in [
            Source::Version("0.1.0".into()),
            Source::Path(PathBuf::from("/src/lode\"star")),
        ] {
            for (path, contents) in render(&names, &source) {
                assert!(!path.contains("{{"), "{path}");
                assert!(!contents.contains("{{"), "{path}:\n{contents}");
            }
        }
        assert_eq!(toml_string("/a\"b\\c"), r#""/a\"b\\c""#);
    }

    #[test]
    fn the_project_config_sets_its_keys_and_reads_back() {
        let names = Names::new("demo-svc").unwrap();
        let text = project_config(&names);
        let config = lodestar::config::Config::from_toml(&text).unwrap();
        assert_eq!(config.service.name, "demo-svc");
        assert_eq!(config.service.version, "0.1.0");
        assert_eq!(config.service.bind.to_string(), "127.0.0.1:50051");
        assert_eq!(config.registry.url, lodestar_registry::DEFAULT_URL);
        // Every other key is there, commented out.
        assert!(text.contains("\n# heartbeat_interval = "), "{text}");
        let set = text
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(" = "))
            .count();
        assert_eq!(set, project_keys(&names).len(), "{text}");
    }
}
