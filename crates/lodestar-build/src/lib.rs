//! Build-time code generation for lodestar services.
//!
//! Call it from `build.rs`. It parses `.proto` files with a pure-Rust
//! compiler ([protox]), so no `protoc` has to be installed, and writes Rust
//! code into `OUT_DIR` for each protobuf package:
//!
//! * the messages, as [prost] types;
//! * for each service, a server trait to implement and a `…Server` wrapper
//!   (tonic-compatible, so any gRPC client can call it);
//! * for each service, a `…Client` with a `by_name` constructor that calls
//!   the service through lodestar's discovery and load balancing;
//! * `FILE_DESCRIPTOR_SET`, the encoded descriptors, which lodestar serves
//!   through gRPC server reflection automatically.
//!
//! The generated code refers to `::lodestar` only, so a crate needs no other
//! dependency to use it. Well-known types (`google.protobuf.*`) and imports
//! work as with `protoc`.
//!
//! # REST routes: `google.api.http`
//!
//! `google/api/annotations.proto` and `google/api/http.proto` come with
//! lodestar-build (written from the published field list, with upstream's
//! field numbers), so a `.proto` can annotate its methods with no download
//! and no include path of its own:
//!
//! ```proto
//! import "google/api/annotations.proto";
//!
//! service RouteGuide {
//!   rpc GetFeature(Point) returns (Feature) {
//!     option (google.api.http) = { get: "/v1/features/{latitude}/{longitude}" };
//!   }
//! }
//! ```
//!
//! A lodestar service then serves the method as that REST route too, on its
//! own port (`docs/web.md`, "REST"). A copy of these files in one of the
//! `includes` is used instead of the built-in one.
//!
//! # Example
//!
//! `build.rs`:
//!
//! ```no_run
//! fn main() -> std::io::Result<()> {
//!     lodestar_build::compile_protos(&["proto/route_guide.proto"], &["proto"])
//! }
//! ```
//!
//! `src/lib.rs`:
//!
//! ```ignore
//! pub mod routeguide {
//!     lodestar::include_proto!("routeguide");
//! }
//! ```
//!
//! # Retries and idempotency
//!
//! A method marked `option idempotency_level = NO_SIDE_EFFECTS;` (or
//! `IDEMPOTENT`) in its `.proto` may be sent again by the lodestar client
//! when the instance it went to dies before answering. Other methods are only
//! retried when lodestar knows that no server saw them.
//!
//! [protox]: https://docs.rs/protox
//! [prost]: https://docs.rs/prost

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use prost_build::{Method, Service};
use prost_types::method_options::IdempotencyLevel;

/// Compiles `protos`, searching imports in `includes`, with default settings.
///
/// Shorthand for `configure().compile(protos, includes)`.
pub fn compile_protos(
    protos: &[impl AsRef<Path>],
    includes: &[impl AsRef<Path>],
) -> io::Result<()> {
    configure().compile(protos, includes)
}

/// Starts a [`Builder`] with default settings: clients and servers both
/// generated, output to `OUT_DIR`.
pub fn configure() -> Builder {
    Builder {
        build_client: true,
        build_server: true,
        out_dir: None,
        type_attributes: Vec::new(),
        emit_rerun_if_changed: true,
    }
}

/// Settings for code generation. See [`configure`].
#[derive(Debug, Clone)]
pub struct Builder {
    build_client: bool,
    build_server: bool,
    out_dir: Option<PathBuf>,
    type_attributes: Vec<(String, String)>,
    emit_rerun_if_changed: bool,
}

impl Builder {
    /// Whether to generate clients (default: true).
    pub fn build_client(mut self, enable: bool) -> Self {
        self.build_client = enable;
        self
    }

    /// Whether to generate server traits (default: true).
    pub fn build_server(mut self, enable: bool) -> Self {
        self.build_server = enable;
        self
    }

    /// Where to write the generated files (default: `OUT_DIR`).
    pub fn out_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.out_dir = Some(dir.into());
        self
    }

    /// Adds an attribute to the generated types that match `path`, as
    /// [`prost_build::Config::type_attribute`] does; e.g.
    /// `.type_attribute(".", "#[derive(serde::Serialize)]")`.
    pub fn type_attribute(mut self, path: impl Into<String>, attribute: impl Into<String>) -> Self {
        self.type_attributes.push((path.into(), attribute.into()));
        self
    }

    /// Whether to print `cargo:rerun-if-changed` for every input (default: true).
    pub fn emit_rerun_if_changed(mut self, enable: bool) -> Self {
        self.emit_rerun_if_changed = enable;
        self
    }

    /// Compiles `protos`, resolving imports against `includes`.
    ///
    /// Errors name the file and position of a syntax or import error.
    pub fn compile(
        self,
        protos: &[impl AsRef<Path>],
        includes: &[impl AsRef<Path>],
    ) -> io::Result<()> {
        let out_dir = match &self.out_dir {
            Some(dir) => dir.clone(),
            None => std::env::var_os("OUT_DIR")
                .map(PathBuf::from)
                .ok_or_else(|| {
                    io::Error::other(
                        "OUT_DIR is not set: call lodestar-build from build.rs or set out_dir()",
                    )
                })?,
        };
        let mut compiler = protox::Compiler::with_file_resolver(resolver(includes));
        compiler.include_imports(true).include_source_info(true);
        compiler
            .open_files(protos.iter().map(AsRef::as_ref))
            .map_err(|e| io::Error::other(format!("{e:?}")))?;
        if self.emit_rerun_if_changed {
            for file in compiler.files() {
                if let Some(path) = file.path() {
                    println!("cargo:rerun-if-changed={}", path.display());
                }
            }
        }
        // One file per set of inputs, so that several compile calls in one
        // build script each keep their own descriptors.
        let descriptor_path = out_dir.join(format!(
            "lodestar_descriptor_{:016x}.bin",
            inputs_hash(protos, includes)
        ));
        std::fs::write(&descriptor_path, compiler.encode_file_descriptor_set())?;
        let fds = compiler.file_descriptor_set();

        let mut config = prost_build::Config::new();
        config
            .out_dir(&out_dir)
            .prost_path("::lodestar::codegen::prost")
            .prost_types_path("::lodestar::codegen::prost_types");
        for (path, attribute) in &self.type_attributes {
            config.type_attribute(path, attribute);
        }
        if self.build_client || self.build_server {
            let tonic = tonic_prost_build::configure()
                .build_client(self.build_client)
                .build_server(self.build_server)
                .build_transport(false)
                .codec_path("::lodestar::codegen::ProstCodec")
                .service_generator();
            config.service_generator(Box::new(Generator {
                tonic,
                build_client: self.build_client,
                build_server: self.build_server,
                descriptor_path,
                packages_with_services: BTreeSet::new(),
            }));
        }
        config.compile_fds(fds)
    }
}

/// The files `google.api.http` annotations import, built in.
const GOOGLE_API: [(&str, &str); 2] = [
    (
        "google/api/annotations.proto",
        include_str!("../proto/google/api/annotations.proto"),
    ),
    (
        "google/api/http.proto",
        include_str!("../proto/google/api/http.proto"),
    ),
];

/// Finds imports in `includes` first, then among the well-known types,
/// then among the built-in `google/api` files.
fn resolver(includes: &[impl AsRef<Path>]) -> protox::file::ChainFileResolver {
    use protox::file::{ChainFileResolver, GoogleFileResolver, IncludeFileResolver};
    let mut resolver = ChainFileResolver::new();
    for include in includes {
        resolver.add(IncludeFileResolver::new(include.as_ref().to_owned()));
    }
    resolver.add(GoogleFileResolver::new());
    resolver.add(GoogleApiResolver);
    resolver
}

/// Serves [`GOOGLE_API`] by name.
struct GoogleApiResolver;

impl protox::file::FileResolver for GoogleApiResolver {
    fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
        match GOOGLE_API.iter().find(|(path, _)| *path == name) {
            Some((path, source)) => protox::file::File::from_source(path, source),
            None => Err(protox::Error::file_not_found(name)),
        }
    }
}

/// Wraps tonic's generator: its output, re-rooted under `::lodestar::codegen`,
/// followed by lodestar's additions.
struct Generator {
    tonic: Box<dyn prost_build::ServiceGenerator>,
    build_client: bool,
    build_server: bool,
    descriptor_path: PathBuf,
    packages_with_services: BTreeSet<String>,
}

impl prost_build::ServiceGenerator for Generator {
    fn generate(&mut self, service: Service, buf: &mut String) {
        let mut tonic_code = String::new();
        self.packages_with_services.insert(service.package.clone());
        let lodestar_code = lodestar_items(&service, self.build_client, self.build_server);
        let method_infos = self.build_client.then(|| method_infos(&service));
        self.tonic.generate(service, &mut tonic_code);
        let mut code = reroot_tonic_paths(&tonic_code);
        if let Some(infos) = method_infos {
            code = add_method_infos(&code, &infos);
        }
        buf.push_str(&code);
        buf.push_str(&lodestar_code);
    }

    fn finalize(&mut self, buf: &mut String) {
        self.tonic.finalize(buf);
    }

    fn finalize_package(&mut self, package: &str, buf: &mut String) {
        self.tonic.finalize_package(package, buf);
        if self.packages_with_services.contains(package) {
            let _ = write!(
                buf,
                "\n/// The encoded `FileDescriptorSet` of the protos this package was built from\n\
                 /// (with their imports); lodestar serves it through server reflection.\n\
                 pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!({:?});\n",
                self.descriptor_path.display().to_string()
            );
        }
    }
}

/// A stable hash of the input paths (the same on every build).
fn inputs_hash(protos: &[impl AsRef<Path>], includes: &[impl AsRef<Path>]) -> u64 {
    use std::hash::{Hash, Hasher};
    // DefaultHasher::new() uses fixed keys, so this is stable across runs.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for path in protos
        .iter()
        .map(AsRef::as_ref)
        .chain([Path::new("--")])
        .chain(includes.iter().map(AsRef::as_ref))
    {
        path.hash(&mut hasher);
    }
    hasher.finish()
}

fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, ch) in name.chars().enumerate() {
        if ch.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(ch.to_ascii_lowercase());
        } else {
            out.push(ch);
        }
    }
    out
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        method.options.idempotency_level(),
        IdempotencyLevel::NoSideEffects | IdempotencyLevel::Idempotent
    )
}

/// lodestar's additions for one service: the `by_name` client constructor and
/// the server's `ServiceDefinition`.
fn lodestar_items(service: &Service, client: bool, server: bool) -> String {
    let full_name = if service.package.is_empty() {
        service.proto_name.clone()
    } else {
        format!("{}.{}", service.package, service.proto_name)
    };
    let module = snake_case(&service.name);
    let name = &service.name;
    let mut out = String::new();
    if client {
        let _ = write!(
            out,
            r#"
impl {module}_client::{name}Client<::lodestar::client::Channel> {{
    /// A client for `{full_name}` that calls the instances of the service
    /// registered as `service`, found through `client`'s registry and
    /// balanced by its selector. Connections are made lazily.
    pub fn by_name(client: &::lodestar::Client, service: &str) -> Self {{
        let limits = client.message_limits();
        // The channel enforces the send limit itself, with the status code
        // gRPC specifies (RESOURCE_EXHAUSTED), and decompresses responses
        // itself; tonic's own send check is off.
        Self::new(client.channel(service))
            .max_decoding_message_size(limits.max_decoding_message_size)
            .max_encoding_message_size(usize::MAX)
    }}
}}
"#
        );
    }
    if server {
        let _ = write!(
            out,
            r#"
impl<T: {module}_server::{name}> ::lodestar::server::ServiceDefinition for {module}_server::{name}Server<T> {{
    fn file_descriptor_set() -> &'static [u8] {{
        FILE_DESCRIPTOR_SET
    }}

    fn with_message_limits(self, limits: &::lodestar::MessageLimits) -> Self {{
        // The server enforces the send limit itself, with the status code
        // gRPC specifies (RESOURCE_EXHAUSTED); tonic's own check is off.
        self.accept_compressed(::lodestar::codegen::tonic::codec::CompressionEncoding::Gzip)
            .max_decoding_message_size(limits.max_decoding_message_size)
            .max_encoding_message_size(usize::MAX)
    }}
}}
"#
        );
    }
    out
}

/// For each method of `service`: how tonic's client names the method in a
/// request's extensions, and the statement lodestar adds after that one.
fn method_infos(service: &Service) -> Vec<(String, String)> {
    let full_name = if service.package.is_empty() {
        service.proto_name.clone()
    } else {
        format!("{}.{}", service.package, service.proto_name)
    };
    service
        .methods
        .iter()
        .map(|method| {
            // As `GrpcMethod::new(..)`'s arguments read without whitespace.
            let anchor = format!("{full_name:?},{:?}", method.proto_name);
            // Only a single request message can be kept and sent again.
            let idempotent = !method.client_streaming && is_idempotent(method);
            let info = format!(
                "req.extensions_mut().insert(::lodestar::client::MethodInfo::new(super::FILE_DESCRIPTOR_SET).idempotent({idempotent}));"
            );
            (anchor, info)
        })
        .collect()
}

/// Adds to each client method in `code` the [`MethodInfo`] of its method
/// (descriptors, idempotency), so that it travels with each call through
/// any layers a user wraps the channel in. A method tonic wrote differently
/// than expected becomes a compile error naming it.
fn add_method_infos(code: &str, infos: &[(String, String)]) -> String {
    let mut code = code.to_owned();
    for (anchor, info) in infos {
        // After the statement that names the method (however it is wrapped).
        let end = find_grpc_method(&code, anchor)
            .and_then(|at| code[at..].find(';').map(|semicolon| at + semicolon + 1));
        if let Some(end) = end {
            code.insert_str(end, &format!("\n{info}"));
        } else {
            code.push_str(&format!(
                "\ncompile_error!({:?});\n",
                format!("lodestar-build: tonic's client code no longer names the method `GrpcMethod::new({anchor})`")
            ));
        }
    }
    code
}

/// Where tonic's client names the method `arguments` (its service and
/// method names as string literals, `"pkg.Svc","Method"`) with
/// `GrpcMethod::new(..)`, however the call is wrapped across lines.
fn find_grpc_method(code: &str, arguments: &str) -> Option<usize> {
    const CALL: &str = "GrpcMethod::new(";
    let mut from = 0;
    while let Some(found) = code[from..].find(CALL) {
        let at = from + found;
        let start = at + CALL.len();
        let end = start + code[start..].find(')')?;
        let written: String = code[start..end]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        if written.trim_end_matches(',') == arguments {
            return Some(at);
        }
        from = end;
    }
    None
}

/// Rewrites `tonic::` paths in tonic's output to `::lodestar::codegen::tonic::`,
/// so that user crates need no direct dependency on tonic.
fn reroot_tonic_paths(code: &str) -> String {
    const FROM: &str = "tonic::";
    const TO: &str = "::lodestar::codegen::tonic::";
    let mut out = String::with_capacity(code.len() + code.len() / 8);
    let mut rest = code;
    while let Some(at) = rest.find(FROM) {
        let before = &rest[..at];
        let prev = before.chars().next_back();
        let part_of_path = prev.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
        out.push_str(before);
        out.push_str(if part_of_path { FROM } else { TO });
        rest = &rest[at + FROM.len()..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reroots_only_whole_paths() {
        let code = "use tonic::codegen::*; x: tonic::Status, y: ::lodestar::codegen::tonic::Code, my_tonic::A";
        assert_eq!(
            reroot_tonic_paths(code),
            "use ::lodestar::codegen::tonic::codegen::*; x: ::lodestar::codegen::tonic::Status, \
             y: ::lodestar::codegen::tonic::Code, my_tonic::A"
        );
    }

    #[test]
    fn each_client_method_gets_its_method_info() {
        let code = r#"
            let mut req = request.into_request();
            req.extensions_mut().insert(GrpcMethod::new("pkg.Svc", "Get"));
            self.inner.unary(req, path, codec).await
            req.extensions_mut()
                .insert(
                    GrpcMethod::new(
                        "pkg.Svc",
                        "Put",
                    ),
                );
        "#;
        let infos = vec![
            ("\"pkg.Svc\",\"Get\"".to_owned(), "GET;".to_owned()),
            ("\"pkg.Svc\",\"Put\"".to_owned(), "PUT;".to_owned()),
        ];
        let out = add_method_infos(code, &infos);
        assert!(out.contains("\"Get\"));\nGET;"), "{out}");
        assert!(out.contains("),\n                );\nPUT;"), "{out}");
        assert!(!out.contains("compile_error!"));
        let missing = vec![("\"pkg.Svc\",\"Gone\"".to_owned(), String::new())];
        assert!(add_method_infos(code, &missing).contains("compile_error!"));
    }

    #[test]
    fn google_api_annotations_need_no_include_path_of_their_own() {
        let dir = std::env::temp_dir().join(format!("lodestar-build-http-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("a.proto"),
            r#"syntax = "proto3";
            package a;
            import "google/api/annotations.proto";
            message M { string id = 1; }
            service S {
              rpc Get(M) returns (M) {
                option (google.api.http) = { get: "/v1/{id}" additional_bindings { post: "/v1" body: "*" } };
              }
            }"#,
        )
        .unwrap();
        let mut compiler = protox::Compiler::with_file_resolver(resolver(&[&dir]));
        compiler.include_imports(true);
        compiler.open_files([dir.join("a.proto")]).unwrap();
        let pool = compiler.descriptor_pool();
        let _ = std::fs::remove_dir_all(&dir);
        let http = pool.get_extension_by_name("google.api.http").unwrap();
        // Upstream's number, so every tool reads the option alike.
        assert_eq!(http.number(), 72295728);
        let method = pool
            .get_service_by_name("a.S")
            .unwrap()
            .methods()
            .next()
            .unwrap();
        let options = method.options();
        let rule = options.get_extension(&http);
        let rule = rule.as_message().unwrap();
        assert_eq!(
            rule.get_field_by_name("get").unwrap().as_str(),
            Some("/v1/{id}")
        );
        let bindings = rule.get_field_by_name("additional_bindings").unwrap();
        let binding = bindings.as_list().unwrap()[0].as_message().unwrap().clone();
        assert_eq!(
            binding.get_field_by_name("body").unwrap().as_str(),
            Some("*")
        );
        // The imports are in the set, for servers to read the option.
        let names: Vec<String> = compiler
            .file_descriptor_set()
            .file
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        assert!(
            names.contains(&"google/api/http.proto".to_owned()),
            "{names:?}"
        );
    }

    #[test]
    fn snake_cases_service_names() {
        assert_eq!(snake_case("RouteGuide"), "route_guide");
        assert_eq!(snake_case("Greeter"), "greeter");
    }
}
