#!/usr/bin/env python3
"""Writes the seed corpora (fuzz/corpus/<target>/): a handful of valid and
edge-case inputs per target. Run from anywhere; it rewrites the seeds it
names and leaves other files alone."""

import gzip
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")


def write(target, name, data):
    path = os.path.join(ROOT, target)
    os.makedirs(path, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(path, name), "wb") as f:
        f.write(data)


def frame(payload, flag=0):
    return bytes([flag]) + struct.pack(">I", len(payload)) + payload


def gz(data):
    return gzip.compress(data, mtime=0)


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(number, value):
    """A protobuf field: bytes are length-delimited, ints are varints."""
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return varint(number << 3 | 2) + varint(len(value)) + value
    return varint(number << 3) + varint(value)


# frames: [mode, limit (2 bytes), chunk size - 1, body...]
def frames_input(mode, limit, chunk, body):
    return bytes([mode]) + struct.pack(">H", limit) + bytes([chunk - 1]) + body


json_msg = b'{"i32": 5, "text": "hi", "numbers": [1, "2"]}'
write("frames", "plain-two-messages", frames_input(0, 100, 3, frame(b"hello") + frame(b"")))
write("frames", "plain-oversized", frames_input(0, 4, 2, frame(b"ok") + frame(b"too long")))
write("frames", "plain-partial-tail", frames_input(0, 100, 5, frame(b"ok") + b"\x00\x00\x00"))
write("frames", "json", frames_input(1, 1000, 7, frame(json_msg) + frame(b"{}")))
write("frames", "json-gzip", frames_input(1 | 4, 1000, 16, frame(gz(json_msg), 1) + frame(json_msg)))
write("frames", "json-gzip-bomb", frames_input(1 | 4, 1000, 64, frame(gz(b" " * 100000), 1)))
write("frames", "json-compressed-without-encoding", frames_input(1, 1000, 9, frame(gz(json_msg), 1)))
write("frames", "json-bad-flag", frames_input(1 | 4, 1000, 9, frame(b"{}", 2)))
write("frames", "json-invalid", frames_input(1, 1000, 1, frame(b'{"i32": "x"}')))
write("frames", "compress-default", frames_input(2 | 4, 5000, 100, frame(b"\0" * 1000) + frame(b"x", 1)))
write("frames", "compress-plan", frames_input(2 | 8 | 0x40 | 0x20 | 0x10, 5000, 3, frame(b"a") + frame(b"b") + frame(b"c")))

# gunzip: [limit (3 bytes), compressed message...]
def gunzip_input(limit, data):
    return struct.pack(">I", limit)[1:] + data


write("gunzip", "hello", gunzip_input(100, gz(b"hello")))
write("gunzip", "empty", gunzip_input(0, gz(b"")))
write("gunzip", "bomb", gunzip_input(1000, gz(b"\0" * 1_000_000)))
write("gunzip", "exactly-the-limit", gunzip_input(5, gz(b"12345")))
write("gunzip", "two-members", gunzip_input(100, gz(b"one") + gz(b"two")))
write("gunzip", "truncated", gunzip_input(100, gz(b"hello world")[:-6]))
write("gunzip", "not-gzip", gunzip_input(100, b"plain text"))

# json: [direction (0: JSON to protobuf, 1: back), message...]
for name, text in {
    "scalars": '{"f64": 1.5, "f32": "NaN", "i32": -1, "i64": "9007199254740993", "u64": "18446744073709551615", '
    '"s32": -7, "fx64": "1", "sfx32": -2, "flag": true, "text": "caf\\u00e9", "data": "aGVsbG8=", "color": "RED", "maybe": 0}',
    "collections": '{"numbers": [1, "2", -3], "words": ["a", ""], "counts": {"a": 1, "": -1}, '
    '"children": {"-5": {"text": "x"}}, "colors": ["GREEN", 1], "byFlag": {"true": "yes"}}',
    "nested": '{"child": {"child": {"list": [{"i32": 1}, {}]}}, "nested": {"name": "n"}}',
    "well-known": '{"any": {"@type": "type.googleapis.com/fuzz.Everything", "i32": 1}, "duration": "1.5s", '
    '"time": "1970-01-01T00:00:00Z", "object": {"a": [1, null, true, {"b": "c"}]}, "value": 3, '
    '"values": [1, "x"], "mask": "text,child.i32", "wrapped": "5", "wrappedBytes": "AA==", "empty": {}}',
    "any-unknown-type": '{"any": {"@type": "type.googleapis.com/no.Such", "x": 1}}',
    "proto-names-and-nulls": '{"wrapped_bytes": null, "by_flag": {}, "name": null, "id": 7}',
    "deep": '{"child": ' * 60 + "{}" + "}" * 60,
    "not-an-object": "[1, 2]",
    "trailing": "{} {}",
}.items():
    write("json", name, b"\x00" + text.encode())
write("json", "proto-scalars", b"\x01" + field(3, 5) + field(14, "hi") + field(16, 2) + field(18, struct.pack("<B", 1)))
write("json", "proto-nested", b"\x01" + field(22, field(22, field(3, 1))) + field(26, field(24, "n")))
write("json", "proto-map", b"\x01" + field(20, field(1, "k") + field(2, 3)) + field(21, field(1, 5) + field(2, b"")))
write("json", "proto-any", b"\x01" + field(27, field(1, "type.googleapis.com/fuzz.Everything") + field(2, field(3, 9))))
write("json", "proto-timestamp-out-of-range", b"\x01" + field(29, field(1, 2**62)))
write("json", "proto-unknown-field", b"\x01" + field(1000, "ignored"))

# urls: the URL itself
for name, url in {
    "memory": "memory://",
    "lodestar": "lodestar://127.0.0.1:7070",
    "lodestar-many-token": "lodestar://a:1, b:2?token=s3cret",
    "lodestar-unknown-parameter": "lodestar://h:1?password=hunter2",
    "lodestar-bad-token": "lodestar://h:1?token=a b",
    "etcd": "etcd://10.0.0.1:2379,10.0.0.2:2379?prefix=/x/&user=app&password=p%40ss",
    "etcd-half-credentials": "etcd://a:1?user=u",
    "etcd-ipv6": "etcd://[::1]:2379",
    "nats": "nats://127.0.0.1:4222",
    "nats-credentials": "nats://user:pa%40ss@h1:4222,u2:p2@h2:4222",
    "nats-comma-in-password": "nats://user:pa,ss@h1:4222",
    "http": "http://127.0.0.1:0?advertise=host:1",
    "http-bad-bind": "http://nowhere/",
    "no-scheme": "127.0.0.1:7070",
}.items():
    write("urls", name, url)

# broker_http: [body limit / 4, the bytes of the connection...]
post = (
    "POST /v1/broker/fuzz-1 HTTP/1.1\r\nhost: h\r\nlodestar-topic: orders.created\r\n"
    "lodestar-h-content-type: application/json\r\ncontent-length: 8\r\n\r\n{\"id\":7}"
)
write("broker_http", "post", b"\x10" + post.encode())
write("broker_http", "post-pipelined", b"\x10" + (post + post).encode())
write("broker_http", "post-chunked", b"\x10" + (
    "POST /v1/broker/fuzz-1 HTTP/1.1\r\nlodestar-topic: orders.created\r\ntransfer-encoding: chunked\r\n\r\n"
    "3\r\nabc\r\n0\r\n\r\n").encode())
write("broker_http", "post-too-large", b"\x01" + post.replace("8\r\n\r\n{\"id\":7}", "9\r\n\r\n123456789").encode())
write("broker_http", "wrong-topic", b"\x10" + post.replace("orders.created", "orders.deleted").encode())
write("broker_http", "bad-topic", b"\x10" + post.replace("orders.created", "a..b").encode())
write("broker_http", "unknown-subscription", b"\x10" + post.replace("fuzz-1", "other").encode())
write("broker_http", "get", b"\x10GET /v1/broker/fuzz-1 HTTP/1.1\r\n\r\n")
write("broker_http", "not-utf8-header", b"\x10" + post.encode().replace(b"application/json", b"\xff\xfe"))

# registry_http: requests separated by 0xFF; `[!]METHOD PATH\nbody`
reg = '!POST /v1/instances\n{"service": "orders", "address": "10.0.0.1:80", "ttl_ms": 10000, "id": "i1", "metadata": {"a": "b"}}'
for name, requests in {
    "register-and-read": [reg, "GET /v1/services/orders/instances", "GET /v1/services?namespace=default", "GET /v1/status"],
    "register-persistent": ['!POST /v1/instances\n{"service": "db", "address": "h:1", "persistent": true, "check": {"kind": "tcp", "target": "h:1", "interval_ms": 0}}'],
    "heartbeat-deregister": [reg, "!PUT /v1/services/orders/instances/i1/heartbeat", "!DELETE /v1/services/orders/instances/i1?namespace=default&group=default"],
    "enable-protect": [reg, '!PUT /v1/services/orders/instances/i1/enabled\n{"enabled": false}', '!PUT /v1/services/orders/protection\n{"threshold": 0.5}'],
    "unauthorized": [reg[1:]],
    "huge-ttl": ['!POST /v1/instances\n{"service": "s", "address": "h:1", "ttl_ms": 18446744073709551615}'],
    "bad-json": ["!POST /v1/instances\n{\"service\": 1", "GET /v1/services?unknown=1", "GET /nowhere"],
}.items():
    write("registry_http", name, b"\xff".join(r.encode() for r in requests))

# registry_grpc: records [method, flags, length (2 bytes), payload]
METHODS = ["Register", "Heartbeat", "KeepAlive", "Deregister", "GetInstances", "ListServices", "Watch",
           "SetEnabled", "SetProtection", "Status"]


def call(method, payload, flags=1):
    return bytes([METHODS.index(method), flags]) + struct.pack(">H", len(payload)) + payload


key = field(1, "default") + field(2, "default") + field(3, "orders")
instance = field(1, "i1") + field(2, key) + field(4, "10.0.0.1:80") + field(6, field(1, "a") + field(2, "b")) + field(7, 100)
ref = field(1, key) + field(2, "i1")
register = field(1, instance) + field(2, 10000)
write("registry_grpc", "register-and-read", call("Register", register) + call("GetInstances", field(1, key)) + call("ListServices", field(1, "default")) + call("Status", b""))
write("registry_grpc", "heartbeat-deregister", call("Register", register) + call("Heartbeat", ref) + call("Deregister", ref))
write("registry_grpc", "enable-protect", call("Register", register) + call("SetEnabled", field(1, ref) + field(2, 0)) + call("SetProtection", field(1, key) + b"\x11" + struct.pack("<d", 0.5)))
write("registry_grpc", "persistent-with-check", call("Register", field(1, instance) + field(3, 1) + field(4, field(1, 1) + field(2, "h:1"))))
write("registry_grpc", "watch", call("Register", register) + call("Watch", field(1, key) + field(2, 1)))
write("registry_grpc", "keepalive", call("KeepAlive", ref))
write("registry_grpc", "unauthorized", call("Register", register, flags=0))
write("registry_grpc", "huge-ttl", call("Register", field(1, instance) + field(2, 2**32 - 1)))
write("registry_grpc", "raw-body", call("Register", frame(register) + frame(b"", 1), flags=3))
write("registry_grpc", "invalid-protobuf", call("Register", b"\x0a\xff\xff\xff\xff\x0f"))
