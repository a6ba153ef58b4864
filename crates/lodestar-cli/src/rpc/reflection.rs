//! The schema of a server, asked through gRPC server reflection.
//!
//! Reflection is one bidi method, `ServerReflectionInfo`, in two packages:
//! `grpc.reflection.v1` and the older `grpc.reflection.v1alpha`, whose
//! messages are the same on the wire. v1 is tried first; a server that
//! answers `UNIMPLEMENTED` is asked through v1alpha from then on.
//!
//! Each round opens one stream, sends its requests and reads one answer per
//! request: the services, then the files declaring some symbols, then any
//! file those import that has not arrived yet (by name), until nothing is
//! missing. A classic failure of reflection clients is a schema that does
//! not resolve because an import (a well-known type, say) was never
//! fetched; here every import is either fetched or already in the pool of
//! well-known types that prost-reflect carries.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use http::uri::PathAndQuery;
use lodestar::MessageLimits;
use lodestar::registry::limits::printable;
use prost::Message as _;
use prost_reflect::DescriptorPool;
use prost_types::FileDescriptorProto;
use tonic::Code;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

use super::target::Connection;
use super::{Failure, FailureKind, status_failure};

/// The most files a schema may have (a bound on what a server can make us hold).
const MAX_FILES: usize = 4096;

/// The most rounds of imports (the depth of the import graph).
const MAX_ROUNDS: usize = 64;

/// The most services a server may list.
const MAX_SERVICES: usize = 4096;

/// Which reflection package the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V1Alpha,
}

impl Version {
    fn path(self) -> &'static str {
        match self {
            Version::V1 => "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            Version::V1Alpha => "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        }
    }
}

/// A reflection client for one connection, with the files received so far.
#[derive(Debug)]
pub(crate) struct Reflection {
    connection: Connection,
    /// The channel reflection goes through.
    channel: lodestar::client::Channel,
    /// The largest message accepted from the server.
    max_message: usize,
    /// Each round's bound.
    timeout: Duration,
    /// `None` until the server has answered one version.
    version: Option<Version>,
    /// Every file received, by name.
    files: BTreeMap<String, FileDescriptorProto>,
}

impl Reflection {
    /// A client over `connection`, each round bounded by `timeout`, taking
    /// answers of up to `max_message` bytes (at least 4 MiB, gRPC's usual
    /// limit: a schema's files may be larger than the messages a call is
    /// allowed).
    pub(crate) fn new(connection: Connection, max_message: usize, timeout: Duration) -> Self {
        let max_message = max_message.max(MessageLimits::default().max_decoding_message_size);
        let channel = connection.channel(MessageLimits {
            max_decoding_message_size: max_message,
            max_encoding_message_size: MessageLimits::default().max_encoding_message_size,
        });
        Self {
            connection,
            channel,
            max_message,
            timeout,
            version: None,
            files: BTreeMap::new(),
        }
    }

    /// The full names of the services the server serves.
    pub(crate) async fn services(&mut self) -> Result<Vec<String>, Failure> {
        let request = MessageRequest::ListServices(String::new());
        let answers = self.round(vec![request]).await?;
        let mut services = Vec::new();
        for answer in answers {
            match answer {
                MessageResponse::ListServicesResponse(list) => {
                    services.extend(list.service.into_iter().map(|s| s.name));
                }
                MessageResponse::ErrorResponse(e) => {
                    return Err(self.failure(format!(
                        "listing services: {} ({})",
                        printable(&e.error_message),
                        super::status::code_name(Code::from_i32(e.error_code))
                    )));
                }
                _ => return Err(self.failure("listing services: an answer of another kind")),
            }
        }
        if services.len() > MAX_SERVICES {
            return Err(self.failure(format!(
                "the server lists {} services, more than the {MAX_SERVICES} accepted",
                services.len()
            )));
        }
        services.sort();
        services.dedup();
        Ok(services)
    }

    /// A pool holding the well-known types and the files declaring
    /// `symbols` (full names), with every file they import.
    pub(crate) async fn pool(&mut self, symbols: &[String]) -> Result<DescriptorPool, Failure> {
        let wanted: Vec<MessageRequest> = symbols
            .iter()
            .map(|s| MessageRequest::FileContainingSymbol(s.clone()))
            .collect();
        if !wanted.is_empty() {
            let answers = self.round(wanted).await?;
            for (symbol, answer) in symbols.iter().zip(answers) {
                self.take_files(
                    answer,
                    &format!("the file declaring `{}`", printable(symbol)),
                )?;
            }
        }
        self.fetch_imports().await?;
        self.build()
    }

    /// Adds to the files those declaring `symbols`, where the server has
    /// them; the others are left out (for types the server may not describe,
    /// such as an error's details). Returns the new pool.
    pub(crate) async fn pool_with(
        &mut self,
        symbols: &[String],
    ) -> Result<DescriptorPool, Failure> {
        let wanted: Vec<MessageRequest> = symbols
            .iter()
            .map(|s| MessageRequest::FileContainingSymbol(s.clone()))
            .collect();
        if !wanted.is_empty() {
            for answer in self.round(wanted).await? {
                if let MessageResponse::FileDescriptorResponse(files) = answer {
                    self.add_files(files.file_descriptor_proto)?;
                }
            }
        }
        self.fetch_imports().await?;
        self.build()
    }

    /// Asks, round after round, for every imported file not received yet
    /// and not among the well-known types.
    async fn fetch_imports(&mut self) -> Result<(), Failure> {
        let known = DescriptorPool::global();
        for _ in 0..MAX_ROUNDS {
            let mut missing = BTreeMap::new();
            for file in self.files.values() {
                for import in &file.dependency {
                    if !self.files.contains_key(import) && known.get_file_by_name(import).is_none()
                    {
                        missing
                            .entry(import.clone())
                            .or_insert_with(|| file.name().to_owned());
                    }
                }
            }
            if missing.is_empty() {
                return Ok(());
            }
            let requests = missing
                .keys()
                .map(|name| MessageRequest::FileByFilename(name.clone()))
                .collect();
            let answers = self.round(requests).await?;
            for ((import, importer), answer) in missing.iter().zip(answers) {
                self.take_files(
                    answer,
                    &format!(
                        "`{}`, which `{}` imports",
                        printable(import),
                        printable(importer)
                    ),
                )?;
                if !self.files.contains_key(import) {
                    return Err(self.failure(format!(
                        "the server did not send `{}`, which `{}` imports",
                        printable(import),
                        printable(importer)
                    )));
                }
            }
        }
        Err(self.failure(format!("the imports are more than {MAX_ROUNDS} files deep")))
    }

    /// The pool of the well-known types and every file received.
    fn build(&self) -> Result<DescriptorPool, Failure> {
        let mut pool = DescriptorPool::global();
        pool.add_file_descriptor_protos(self.files.values().cloned())
            .map_err(|e| self.failure(format!("the server's descriptors do not resolve: {e}")))?;
        Ok(pool)
    }

    /// Keeps the files of a `FileDescriptorResponse`; any other answer is
    /// an error about `what`.
    fn take_files(&mut self, answer: MessageResponse, what: &str) -> Result<(), Failure> {
        match answer {
            MessageResponse::FileDescriptorResponse(files) => {
                self.add_files(files.file_descriptor_proto)
            }
            MessageResponse::ErrorResponse(e) => Err(self.failure(format!(
                "asking for {what}: {} ({})",
                printable(&e.error_message),
                super::status::code_name(Code::from_i32(e.error_code))
            ))),
            _ => Err(self.failure(format!("asking for {what}: an answer of another kind"))),
        }
    }

    fn add_files(&mut self, encoded: Vec<Vec<u8>>) -> Result<(), Failure> {
        for bytes in encoded {
            let file = FileDescriptorProto::decode(bytes.as_slice())
                .map_err(|e| self.failure(format!("a file descriptor does not decode: {e}")))?;
            if self.files.len() >= MAX_FILES && !self.files.contains_key(file.name()) {
                return Err(self.failure(format!("the schema has more than {MAX_FILES} files")));
            }
            self.files.insert(file.name().to_owned(), file);
        }
        Ok(())
    }

    /// Sends `requests` on one stream and returns the server's answers, one
    /// per request, in order.
    async fn round(
        &mut self,
        requests: Vec<MessageRequest>,
    ) -> Result<Vec<MessageResponse>, Failure> {
        let versions: &[Version] = match self.version {
            Some(version) => &[version][..],
            None => &[Version::V1, Version::V1Alpha],
        };
        let mut last = None;
        for &version in versions {
            let exchange = self.exchange(version, &requests);
            let result = tokio::time::timeout(self.timeout, exchange)
                .await
                .map_err(|_| {
                    Failure::new(
                        FailureKind::Transport,
                        format!(
                            "server reflection on {} did not answer within {}",
                            self.connection.description,
                            lodestar::config::format_duration(self.timeout)
                        ),
                    )
                })?;
            match result {
                Ok(answers) => {
                    self.version = Some(version);
                    return Ok(answers);
                }
                Err(status) if status.code() == Code::Unimplemented && self.version.is_none() => {
                    last = Some(status);
                }
                Err(status) => {
                    return Err(status_failure(
                        FailureKind::Reflection,
                        &format!("server reflection on {}", self.connection.description),
                        &status,
                    ));
                }
            }
        }
        Err(self.failure(format!(
            "the server does not serve reflection (grpc.reflection.v1 nor v1alpha){}",
            last.map(|s| format!(": {}", printable(s.message())))
                .unwrap_or_default()
        )))
    }

    /// One stream of `version`'s reflection method.
    async fn exchange(
        &self,
        version: Version,
        requests: &[MessageRequest],
    ) -> Result<Vec<MessageResponse>, tonic::Status> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone())
            .max_decoding_message_size(self.max_message);
        grpc.ready().await?;
        let outgoing: Vec<ServerReflectionRequest> = requests
            .iter()
            .map(|r| ServerReflectionRequest {
                host: String::new(),
                message_request: Some(r.clone()),
            })
            .collect();
        let codec =
            tonic_prost::ProstCodec::<ServerReflectionRequest, ServerReflectionResponse>::default();
        let response = grpc
            .streaming(
                tonic::Request::new(tokio_stream::iter(outgoing)),
                PathAndQuery::from_static(version.path()),
                codec,
            )
            .await?;
        let mut stream = response.into_inner();
        let mut answers = Vec::with_capacity(requests.len());
        while answers.len() < requests.len() {
            match stream.message().await? {
                Some(answer) => match answer.message_response {
                    Some(message) => answers.push(message),
                    None => {
                        return Err(tonic::Status::internal(
                            "a reflection answer with no content",
                        ));
                    }
                },
                None => {
                    return Err(tonic::Status::internal(format!(
                        "the reflection stream ended after {} of {} answers",
                        answers.len(),
                        requests.len()
                    )));
                }
            }
        }
        Ok(answers)
    }

    fn failure(&self, message: impl AsRef<str>) -> Failure {
        Failure::new(
            FailureKind::Reflection,
            format!(
                "server reflection on {}: {}",
                self.connection.description,
                message.as_ref()
            ),
        )
    }
}

/// The services of `pool` among `services`, with their methods, as
/// `(service, method)` full names: what METHOD is resolved against.
pub(crate) fn methods(pool: &DescriptorPool, services: &[String]) -> Vec<(String, String)> {
    let wanted: BTreeSet<&str> = services.iter().map(String::as_str).collect();
    pool.services()
        .filter(|s| wanted.contains(s.full_name()))
        .flat_map(|s| {
            let service = s.full_name().to_owned();
            s.methods()
                .map(move |m| (service.clone(), m.name().to_owned()))
                .collect::<Vec<_>>()
        })
        .collect()
}
