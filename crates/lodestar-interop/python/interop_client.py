#!/usr/bin/env python3
"""gRPC interop test client on grpcio, for testing lodestar's server.

Runs the interop test cases (as the public gRPC interop test descriptions
specify them) against a grpc.testing.TestService server. Prints
`PASS <case>` or `FAIL <case>: <reason>` per case and exits 1 if any failed.
Every call has a deadline, so no case can hang.
"""

import argparse
import os
import queue
import sys
import threading

sys.dont_write_bytecode = True

import grpc  # noqa: E402

import stubs  # noqa: E402

# Deadline of every call but the ones a case sets itself, in seconds.
TIMEOUT = 20.0

ECHO_INITIAL = "x-grpc-test-echo-initial"
ECHO_TRAILING = "x-grpc-test-echo-trailing-bin"
INITIAL_VALUE = "test_initial_metadata_value"
TRAILING_VALUE = b"\xab\xab\xab"

CASES = [
    "empty_unary",
    "large_unary",
    "client_compressed_unary",
    "server_compressed_unary",
    "client_streaming",
    "server_streaming",
    "server_compressed_streaming",
    "ping_pong",
    "empty_stream",
    "timeout_on_sleeping_server",
    "cancel_after_begin",
    "cancel_after_first_response",
    "custom_metadata",
    "status_code_and_message",
    "special_status_message",
    "unimplemented_method",
    "unimplemented_service",
]

empty_pb2 = None
messages_pb2 = None
test_pb2_grpc = None
# Whether a case did not finish: its thread may hold the process up at exit.
stuck = False


class CaseFailed(Exception):
    pass


def ensure(condition, message):
    if not condition:
        raise CaseFailed(message)


def expect_rpc_error(code, call, what):
    """Runs call(), which must fail with status code; returns the error."""
    try:
        result = call()
    except grpc.RpcError as error:
        ensure(
            error.code() is code,
            "%s: expected %s, got %s %r" % (what, code.name, error.code(), error.details()),
        )
        return error
    raise CaseFailed("%s: expected %s, the call succeeded with %s" % (what, code.name, describe(result)))


def describe(result):
    """A short description of a call's result, for failure messages."""
    if isinstance(result, list):
        return "%d messages" % len(result)
    if hasattr(result, "ByteSize"):
        return "a %s of %d bytes" % (type(result).__name__, result.ByteSize())
    return type(result).__name__


class Pipe:
    """A request iterator fed one message at a time, for bidirectional cases."""

    _END = object()

    def __init__(self):
        self._queue = queue.Queue()

    def add(self, message):
        self._queue.put(message)

    def close(self):
        self._queue.put(self._END)

    def __iter__(self):
        return self

    def __next__(self):
        message = self._queue.get()
        if message is self._END:
            raise StopIteration
        return message

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def zeros(size):
    return messages_pb2.Payload(type=messages_pb2.COMPRESSABLE, body=b"\x00" * size)


def payload_len(message):
    return len(message.payload.body)


def large_request(**fields):
    return messages_pb2.SimpleRequest(
        response_type=messages_pb2.COMPRESSABLE,
        response_size=314159,
        payload=zeros(271828),
        **fields
    )


def check_large_response(response, what):
    ensure(response.payload.type == messages_pb2.COMPRESSABLE, "%s: wrong payload type" % what)
    ensure(
        response.payload.body == b"\x00" * 314159,
        "%s: response payload is %d bytes, expected 314159 zeros" % (what, payload_len(response)),
    )


def streaming_request(sizes, payload_size=None, compressed=None, **fields):
    parameters = []
    for i, size in enumerate(sizes):
        p = messages_pb2.ResponseParameters(size=size)
        if compressed is not None:
            p.compressed.value = compressed[i]
        parameters.append(p)
    request = messages_pb2.StreamingOutputCallRequest(
        response_type=messages_pb2.COMPRESSABLE, response_parameters=parameters, **fields
    )
    if payload_size is not None:
        request.payload.CopyFrom(zeros(payload_size))
    return request


# ------------------------------------------------------------------ cases --


def empty_unary(stub, channel):
    response = stub.EmptyCall(empty_pb2.Empty(), timeout=TIMEOUT)
    ensure(isinstance(response, empty_pb2.Empty), "the response is not an Empty")
    ensure(response.ByteSize() == 0, "the response is not empty")


def large_unary(stub, channel):
    check_large_response(stub.UnaryCall(large_request(), timeout=TIMEOUT), "UnaryCall")


def client_compressed_unary(stub, channel):
    # The probe: an uncompressed message the server is told to expect compressed.
    probe = large_request(expect_compressed=messages_pb2.BoolValue(value=True))
    expect_rpc_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.UnaryCall(probe, timeout=TIMEOUT, compression=grpc.Compression.NoCompression),
        "the uncompressed probe",
    )
    for expect, compression in (
        (True, grpc.Compression.Gzip),
        (False, grpc.Compression.NoCompression),
    ):
        request = large_request(expect_compressed=messages_pb2.BoolValue(value=expect))
        response = stub.UnaryCall(request, timeout=TIMEOUT, compression=compression)
        check_large_response(response, "expect_compressed=%s" % expect)


def server_compressed_unary(stub, channel):
    # grpcio does not tell whether a received message was compressed: check
    # that both calls succeed with the right payload.
    for compressed in (True, False):
        request = large_request(response_compressed=messages_pb2.BoolValue(value=compressed))
        check_large_response(
            stub.UnaryCall(request, timeout=TIMEOUT), "response_compressed=%s" % compressed
        )


def client_streaming(stub, channel):
    requests = (
        messages_pb2.StreamingInputCallRequest(payload=zeros(size))
        for size in (27182, 8, 1828, 45904)
    )
    response = stub.StreamingInputCall(requests, timeout=TIMEOUT)
    ensure(
        response.aggregated_payload_size == 74922,
        "aggregated_payload_size is %d, expected 74922" % response.aggregated_payload_size,
    )


def _server_streaming(stub, sizes, compressed):
    request = streaming_request(sizes, compressed=compressed)
    received = []
    for response in stub.StreamingOutputCall(request, timeout=TIMEOUT):
        ensure(response.payload.type == messages_pb2.COMPRESSABLE, "wrong payload type")
        ensure(response.payload.body.count(0) == payload_len(response), "payload not zeros")
        received.append(payload_len(response))
    ensure(received == list(sizes), "received sizes %r, expected %r" % (received, list(sizes)))


def server_streaming(stub, channel):
    _server_streaming(stub, (31415, 9, 2653, 58979), None)


def server_compressed_streaming(stub, channel):
    # As for server_compressed_unary, only the sizes can be checked.
    _server_streaming(stub, (31415, 92653), (True, False))


def ping_pong(stub, channel):
    with Pipe() as pipe:
        responses = stub.FullDuplexCall(pipe, timeout=TIMEOUT)
        for request_size, response_size in ((27182, 31415), (8, 9), (1828, 2653), (45904, 58979)):
            pipe.add(streaming_request([response_size], payload_size=request_size))
            response = next(responses, None)
            ensure(response is not None, "the response stream ended early")
            ensure(
                response.payload.body == b"\x00" * response_size,
                "response is %d bytes, expected %d zeros" % (payload_len(response), response_size),
            )
        pipe.close()
        rest = list(responses)
        ensure(rest == [], "expected the end of the stream, got %d more responses" % len(rest))
        ensure(responses.code() is grpc.StatusCode.OK, "ended with %s" % responses.code())


def empty_stream(stub, channel):
    responses = list(stub.FullDuplexCall(iter(()), timeout=TIMEOUT))
    ensure(responses == [], "expected no responses, got %d" % len(responses))


def timeout_on_sleeping_server(stub, channel):
    with Pipe() as pipe:
        responses = stub.FullDuplexCall(pipe, timeout=0.001)
        pipe.add(messages_pb2.StreamingOutputCallRequest(payload=zeros(27182)))
        expect_rpc_error(
            grpc.StatusCode.DEADLINE_EXCEEDED, lambda: next(responses), "FullDuplexCall"
        )


def cancel_after_begin(stub, channel):
    with Pipe() as pipe:
        future = stub.StreamingInputCall.future(pipe, timeout=TIMEOUT)
        future.cancel()
        ensure(future.cancelled(), "the call is not cancelled")
        ensure(
            future.code() is grpc.StatusCode.CANCELLED,
            "expected CANCELLED, got %s" % future.code(),
        )


def cancel_after_first_response(stub, channel):
    with Pipe() as pipe:
        responses = stub.FullDuplexCall(pipe, timeout=TIMEOUT)
        pipe.add(streaming_request([31415], payload_size=27182))
        first = next(responses)
        ensure(payload_len(first) == 31415, "first response is %d bytes" % payload_len(first))
        responses.cancel()
        expect_rpc_error(grpc.StatusCode.CANCELLED, lambda: next(responses), "after cancel")


def _check_metadata(initial, trailing, what):
    initial = [v for k, v in (initial or ()) if k == ECHO_INITIAL]
    ensure(initial == [INITIAL_VALUE], "%s: initial metadata %s=%r" % (what, ECHO_INITIAL, initial))
    trailing = [v for k, v in (trailing or ()) if k == ECHO_TRAILING]
    ensure(
        trailing == [TRAILING_VALUE],
        "%s: trailing metadata %s=%r" % (what, ECHO_TRAILING, trailing),
    )


def custom_metadata(stub, channel):
    metadata = ((ECHO_INITIAL, INITIAL_VALUE), (ECHO_TRAILING, TRAILING_VALUE))
    response, call = stub.UnaryCall.with_call(large_request(), metadata=metadata, timeout=TIMEOUT)
    check_large_response(response, "UnaryCall")
    _check_metadata(call.initial_metadata(), call.trailing_metadata(), "UnaryCall")

    request = streaming_request([314159], payload_size=271828)
    responses = stub.FullDuplexCall(iter([request]), metadata=metadata, timeout=TIMEOUT)
    sizes = [payload_len(r) for r in responses]
    ensure(sizes == [314159], "FullDuplexCall: response sizes %r, expected [314159]" % sizes)
    _check_metadata(responses.initial_metadata(), responses.trailing_metadata(), "FullDuplexCall")


def _status_code_and_message(stub, message):
    status = messages_pb2.EchoStatus(code=2, message=message)
    error = expect_rpc_error(
        grpc.StatusCode.UNKNOWN,
        lambda: stub.UnaryCall(
            messages_pb2.SimpleRequest(response_status=status), timeout=TIMEOUT
        ),
        "UnaryCall",
    )
    ensure(error.details() == message, "UnaryCall: message %r, expected %r" % (error.details(), message))

    request = messages_pb2.StreamingOutputCallRequest(response_status=status)
    error = expect_rpc_error(
        grpc.StatusCode.UNKNOWN,
        lambda: list(stub.FullDuplexCall(iter([request]), timeout=TIMEOUT)),
        "FullDuplexCall",
    )
    ensure(
        error.details() == message,
        "FullDuplexCall: message %r, expected %r" % (error.details(), message),
    )


def status_code_and_message(stub, channel):
    _status_code_and_message(stub, "test status message")


def special_status_message(stub, channel):
    _status_code_and_message(
        stub, "\t\ntest with whitespace\r\nand Unicode BMP \u263a and non-BMP \U0001f608\t\n"
    )


def unimplemented_method(stub, channel):
    expect_rpc_error(
        grpc.StatusCode.UNIMPLEMENTED,
        lambda: stub.UnimplementedCall(empty_pb2.Empty(), timeout=TIMEOUT),
        "TestService.UnimplementedCall",
    )


def unimplemented_service(stub, channel):
    unimplemented = test_pb2_grpc.UnimplementedServiceStub(channel)
    expect_rpc_error(
        grpc.StatusCode.UNIMPLEMENTED,
        lambda: unimplemented.UnimplementedCall(empty_pb2.Empty(), timeout=TIMEOUT),
        "UnimplementedService.UnimplementedCall",
    )


# ------------------------------------------------------------------- main --


def make_channel(args):
    target = "%s:%d" % (args.server_host, args.server_port)
    if ":" in args.server_host and not args.server_host.startswith("["):
        target = "[%s]:%d" % (args.server_host, args.server_port)
    if not args.use_tls:
        return grpc.insecure_channel(target)
    root = None
    if args.use_test_ca:
        with open(args.ca_file, "rb") as f:
            root = f.read()
    options = []
    if args.server_host_override:
        options.append(("grpc.ssl_target_name_override", args.server_host_override))
    credentials = grpc.ssl_channel_credentials(root_certificates=root)
    return grpc.secure_channel(target, credentials, options=options)


def run_case(case, stub, channel):
    """Runs one case with a watchdog, so that even a stuck iterator cannot hang."""
    global stuck
    outcome = {}

    def body():
        try:
            globals()[case](stub, channel)
            outcome["error"] = None
        except CaseFailed as e:
            outcome["error"] = str(e)
        except grpc.RpcError as e:
            outcome["error"] = "RPC failed: %s %r" % (e.code(), e.details())
        except Exception as e:  # noqa: BLE001 -- any failure is the case's
            outcome["error"] = "%s: %s" % (type(e).__name__, e)

    thread = threading.Thread(target=body, name=case, daemon=True)
    thread.start()
    thread.join(TIMEOUT * 3)
    if thread.is_alive():
        stuck = True
        return "did not finish within %ds" % (TIMEOUT * 3)
    return outcome["error"]


def main():
    global empty_pb2, messages_pb2, test_pb2_grpc
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server_host", default="localhost")
    parser.add_argument("--server_port", type=int, default=8080)
    parser.add_argument("--test_case", default="large_unary", help="comma-separated list, or all")
    flag = dict(type=stubs.parse_bool, nargs="?", const=True, default=False)
    parser.add_argument("--use_tls", **flag)
    parser.add_argument("--use_test_ca", **flag)
    parser.add_argument("--ca_file", default=os.path.join(stubs.TESTDATA_DIR, "ca.pem"))
    parser.add_argument("--server_host_override", default=None)
    parser.add_argument(
        "--gen_dir", default=None, help="where the generated *_pb2 modules are (default: generate)"
    )
    args = parser.parse_args()
    empty_pb2, messages_pb2, test_pb2_grpc = stubs.load(args.gen_dir)

    if args.test_case == "all":
        cases = list(CASES)
    else:
        cases = [c.strip() for c in args.test_case.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        print("unknown test case(s) %s; known: %s" % (", ".join(unknown), ", ".join(CASES)))
        return 2

    failed = 0
    with make_channel(args) as channel:
        stub = test_pb2_grpc.TestServiceStub(channel)
        for case in cases:
            error = run_case(case, stub, channel)
            if error is None:
                print("PASS %s" % case, flush=True)
            else:
                failed += 1
                print("FAIL %s: %s" % (case, error), flush=True)
    print("%d passed, %d failed" % (len(cases) - failed, failed), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    code = main()
    if stuck:
        # A case that timed out may leave a thread stuck in grpcio.
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)
