//! A call's final status as JSON, and the exit codes of `lodestar call`.
//!
//! A status other than OK is printed on stderr as one JSON object in the
//! Connect protocol's shape: `{"code":"not_found","message":"…",
//! "details":[{"type":"pkg.Type","value":"<base64>","debug":{…}}]}`. The
//! details come from the `grpc-status-details-bin` trailer (a
//! `google.rpc.Status`); `debug` is the detail as JSON when its type is
//! known (a well-known type, or one the server describes through
//! reflection). The exit code is 64 + the gRPC code, as grpcurl's.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde_json::{Value, json};
use tonic::{Code, Status};

/// Added to a gRPC code to make the exit code of a call that ended with it.
pub(crate) const STATUS_EXIT_OFFSET: u8 = 64;

/// The exit code of a failure on this side (connection, reflection, input).
pub(crate) const LOCAL_FAILURE_EXIT: u8 = 1;

/// The exit-code table of `lodestar call`, as a literal (for `concat!` in
/// `--help`).
macro_rules! exit_code_table {
    () => {
        "Exit codes:
  0       the call ended OK
  1       no call was made, or it failed on this side: unknown service or
          method, connection failure, reflection failure, invalid input
  2       usage error (flags and arguments)
  64+N    the server ended the call with gRPC status code N:
          65 CANCELLED            66 UNKNOWN              67 INVALID_ARGUMENT
          68 DEADLINE_EXCEEDED    69 NOT_FOUND            70 ALREADY_EXISTS
          71 PERMISSION_DENIED    72 RESOURCE_EXHAUSTED   73 FAILED_PRECONDITION
          74 ABORTED              75 OUT_OF_RANGE         76 UNIMPLEMENTED
          77 INTERNAL             78 UNAVAILABLE          79 DATA_LOSS
          80 UNAUTHENTICATED"
    };
}
pub(crate) use exit_code_table;

/// The exit-code table, as `--help` shows it.
#[cfg(test)]
const EXIT_CODES: &str = exit_code_table!();

/// The exit code of a call that ended with `code` (0 for OK).
pub(crate) fn exit_code(code: Code) -> u8 {
    match code {
        Code::Ok => 0,
        // Codes are 1..=16: the sum stays well inside a byte.
        other => STATUS_EXIT_OFFSET.saturating_add(other as u8),
    }
}

/// The Connect protocol's name of `code` (lodestar's one table).
pub(crate) use lodestar::server::connect_code_name as code_name;

/// `google.rpc.Status`, as `grpc-status-details-bin` carries it.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

/// The details a status carries, as `(type name, encoded value)`; empty
/// when it has none or they do not decode.
pub(crate) fn details(status: &Status) -> Vec<(String, Vec<u8>)> {
    if status.details().is_empty() {
        return Vec::new();
    }
    RpcStatus::decode(status.details())
        .map(|s| {
            s.details
                .into_iter()
                .map(|any| {
                    let name = any
                        .type_url
                        .rsplit_once('/')
                        .map_or(any.type_url.as_str(), |(_, name)| name)
                        .to_owned();
                    (name, any.value)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The JSON printed for `status`; details whose type `pool` knows carry
/// it as `debug`.
pub(crate) fn to_json(status: &Status, pool: &DescriptorPool) -> Value {
    let details: Vec<Value> = details(status)
        .into_iter()
        .map(|(name, value)| {
            let mut detail = json!({ "type": name, "value": STANDARD_NO_PAD.encode(&value) });
            let debug = pool
                .get_message_by_name(&name)
                .and_then(|descriptor| DynamicMessage::decode(descriptor, value.as_slice()).ok())
                .and_then(|message| {
                    message
                        .serialize_with_options(
                            serde_json::value::Serializer,
                            &SerializeOptions::new(),
                        )
                        .ok()
                });
            if let Some(debug) = debug {
                detail["debug"] = debug;
            }
            detail
        })
        .collect();
    let mut out = json!({
        "code": code_name(status.code()),
        "message": status.message(),
    });
    if !details.is_empty() {
        out["details"] = Value::Array(details);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_rpc_status_exits_64_plus_its_code() {
        assert_eq!(exit_code(Code::Ok), 0);
        assert_eq!(exit_code(Code::Cancelled), 65);
        assert_eq!(exit_code(Code::NotFound), 69);
        assert_eq!(exit_code(Code::Unavailable), 78);
        assert_eq!(exit_code(Code::Unauthenticated), 80);
        // The table in --help says the same, for every code.
        for number in 1..=16 {
            let code = Code::from_i32(number);
            let grpc_name = code_name(code)
                .to_uppercase()
                .replace("CANCELED", "CANCELLED");
            let row = format!("{} {grpc_name}", exit_code(code));
            assert!(EXIT_CODES.contains(&row), "the table lacks `{row}`");
        }
    }

    #[test]
    fn codes_have_connect_names() {
        assert_eq!(code_name(Code::NotFound), "not_found");
        assert_eq!(code_name(Code::Cancelled), "canceled");
        assert_eq!(code_name(Code::DeadlineExceeded), "deadline_exceeded");
    }

    #[test]
    fn known_details_are_decoded_and_unknown_ones_kept_as_base64() {
        let pool = DescriptorPool::global();
        let duration = prost_types::Duration {
            seconds: 3,
            nanos: 0,
        };
        let details = RpcStatus {
            code: Code::NotFound as i32,
            message: "no such feature".into(),
            details: vec![
                prost_types::Any {
                    type_url: "type.googleapis.com/google.protobuf.Duration".into(),
                    value: duration.encode_to_vec(),
                },
                prost_types::Any {
                    type_url: "type.googleapis.com/acme.Secret".into(),
                    value: vec![1, 2, 3],
                },
            ],
        };
        let status = Status::with_details(
            Code::NotFound,
            "no such feature",
            details.encode_to_vec().into(),
        );
        let out = to_json(&status, &pool);
        assert_eq!(out["code"], "not_found");
        assert_eq!(out["message"], "no such feature");
        assert_eq!(out["details"][0]["type"], "google.protobuf.Duration");
        assert_eq!(out["details"][0]["debug"], "3s");
        assert_eq!(out["details"][1]["type"], "acme.Secret");
        assert_eq!(out["details"][1]["value"], "AQID");
        assert!(out["details"][1].get("debug").is_none());
        // No details: no key.
        let plain = to_json(&Status::not_found("gone"), &pool);
        assert!(plain.get("details").is_none(), "{plain}");
    }
}
