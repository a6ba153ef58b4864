//! Transcoding between protobuf and JSON (`application/grpc+json`) with
//! the descriptors `lodestar-build` embeds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use lodestar_core::sync::MutexExt;
use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, MethodDescriptor,
};
use tonic::Status;

/// One direction of transcoding, for the messages of one type.
#[derive(Debug, Clone)]
pub(crate) enum Transcode {
    ProtoToJson(MessageDescriptor),
    /// JSON to protobuf. `peer_is_at_fault` chooses the status when the
    /// JSON does not parse: INVALID_ARGUMENT for a request (the caller sent
    /// it), INTERNAL for a response.
    JsonToProto {
        descriptor: MessageDescriptor,
        peer_is_at_fault: bool,
    },
}

impl Transcode {
    pub(crate) fn apply(&self, bytes: &[u8]) -> Result<Vec<u8>, Status> {
        match self {
            Transcode::ProtoToJson(descriptor) => {
                let message = DynamicMessage::decode(descriptor.clone(), bytes).map_err(|e| {
                    Status::internal(format!(
                        "a {} message does not decode: {e}",
                        descriptor.full_name()
                    ))
                })?;
                serde_json::to_vec(&message).map_err(|e| {
                    Status::internal(format!(
                        "encoding a {} as JSON: {e}",
                        descriptor.full_name()
                    ))
                })
            }
            Transcode::JsonToProto {
                descriptor,
                peer_is_at_fault,
            } => {
                // Unknown fields are ignored, as protobuf ignores them, so that
                // either side can add fields before the other knows them.
                let options = DeserializeOptions::new().deny_unknown_fields(false);
                let mut deserializer = serde_json::Deserializer::from_slice(bytes);
                let message = DynamicMessage::deserialize_with_options(
                    descriptor.clone(),
                    &mut deserializer,
                    &options,
                )
                .and_then(|m| deserializer.end().map(|()| m))
                .map_err(|e| {
                    let message = format!("invalid JSON for {}: {e}", descriptor.full_name());
                    if *peer_is_at_fault {
                        Status::invalid_argument(message)
                    } else {
                        Status::internal(message)
                    }
                })?;
                Ok(message.encode_to_vec())
            }
        }
    }
}

/// The protobuf descriptors a server or client knows, to find a method's
/// message types by the request path.
#[derive(Debug, Clone)]
pub(crate) struct Descriptors(Arc<DescriptorPool>);

impl Descriptors {
    /// A pool of the given encoded `FileDescriptorSet`s.
    pub(crate) fn from_sets(sets: &[&[u8]]) -> Result<Self, String> {
        let mut pool = DescriptorPool::new();
        for set in sets {
            pool.decode_file_descriptor_set(*set)
                .map_err(|e| e.to_string())?;
        }
        Ok(Self(Arc::new(pool)))
    }

    /// The pool of one embedded set, decoded once per process (or why it
    /// does not decode).
    pub(crate) fn of_static(set: &'static [u8]) -> Result<Self, String> {
        type Cache = Mutex<HashMap<usize, Result<Descriptors, String>>>;
        static CACHE: OnceLock<Cache> = OnceLock::new();
        let mut cache = CACHE.get_or_init(Mutex::default).lock_unpoisoned();
        cache
            .entry(set.as_ptr() as usize)
            .or_insert_with(|| Self::from_sets(&[set]))
            .clone()
    }

    /// Every method of the services named `services`, as its path
    /// (`/package.Service/Method`) and whether its client and its server
    /// stream.
    pub(crate) fn methods<'a>(
        &'a self,
        services: &'a [&str],
    ) -> impl Iterator<Item = (String, bool, bool)> + 'a {
        self.0
            .services()
            .filter(|service| services.contains(&service.full_name()))
            .flat_map(|service| {
                service
                    .methods()
                    .map(|m| {
                        let path = format!("/{}/{}", service.full_name(), m.name());
                        (path, m.is_client_streaming(), m.is_server_streaming())
                    })
                    .collect::<Vec<_>>()
            })
    }

    /// The pool itself.
    pub(crate) fn pool(&self) -> &DescriptorPool {
        &self.0
    }

    /// The method a request path (`/package.Service/Method`) names.
    pub(crate) fn method(&self, path: &str) -> Option<MethodDescriptor> {
        let (service, method) = path.strip_prefix('/')?.split_once('/')?;
        self.0
            .get_service_by_name(service)?
            .methods()
            .find(|m| m.name() == method)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcodes_both_ways_and_names_the_type_on_bad_json() {
        let set = prost_types::FileDescriptorSet {
            file: vec![prost_types::FileDescriptorProto {
                name: Some("t.proto".into()),
                package: Some("t".into()),
                syntax: Some("proto3".into()),
                message_type: vec![prost_types::DescriptorProto {
                    name: Some("Point".into()),
                    field: vec![prost_types::FieldDescriptorProto {
                        name: Some("latitude_e7".into()),
                        json_name: Some("latitudeE7".into()),
                        number: Some(1),
                        r#type: Some(prost_types::field_descriptor_proto::Type::Int32 as i32),
                        label: Some(prost_types::field_descriptor_proto::Label::Optional as i32),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let pool = Descriptors::from_sets(&[&set.encode_to_vec()]).unwrap();
        let point = pool.0.get_message_by_name("t.Point").unwrap();
        let from_json = |peer_is_at_fault| Transcode::JsonToProto {
            descriptor: point.clone(),
            peer_is_at_fault,
        };
        // A field this side does not know (yet) is ignored.
        let proto = from_json(true)
            .apply(br#"{"latitudeE7": 42, "addedLater": true}"#)
            .unwrap();
        assert_eq!(proto, vec![0x08, 42]);
        let json = Transcode::ProtoToJson(point.clone()).apply(&proto).unwrap();
        assert_eq!(json, br#"{"latitudeE7":42}"#);
        let status = from_json(true)
            .apply(br#"{"latitudeE7": "north"}"#)
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("t.Point"), "{}", status.message());
        let status = from_json(false).apply(b"{").unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::Internal,
            "a bad response is not the caller's fault"
        );
    }
}
