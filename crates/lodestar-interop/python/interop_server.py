#!/usr/bin/env python3
"""gRPC interop test server on grpcio, for testing lodestar's client.

Serves grpc.testing.TestService as the public gRPC interop test descriptions
specify it. UnimplementedCall is left unimplemented and UnimplementedService
is not registered, so that both answer UNIMPLEMENTED.

grpcio servers cannot tell whether a received message was compressed, so
`expect_compressed` is not checked: the client_compressed_* cases need a
server that can.

After binding, prints `python interop server listening on HOST:PORT` and
serves until SIGTERM or SIGINT.
"""

import argparse
import os
import signal
import sys
import threading
import time
from concurrent import futures

sys.dont_write_bytecode = True

import grpc  # noqa: E402

import stubs  # noqa: E402

ECHO_INITIAL = "x-grpc-test-echo-initial"
ECHO_TRAILING = "x-grpc-test-echo-trailing-bin"
CODES = {code.value[0]: code for code in grpc.StatusCode}

empty_pb2 = None
messages_pb2 = None
test_pb2_grpc = None


def zeros(size):
    return messages_pb2.Payload(type=messages_pb2.COMPRESSABLE, body=b"\x00" * size)


class Echo:
    """Echo Metadata, and the per-call state of a streaming response."""

    def __init__(self, context):
        self.context = context
        metadata = context.invocation_metadata() or ()
        self.initial = tuple((k, v) for k, v in metadata if k == ECHO_INITIAL)
        trailing = tuple((k, v) for k, v in metadata if k == ECHO_TRAILING)
        if trailing:
            context.set_trailing_metadata(trailing)
        self.initial_sent = False

    def send_initial(self, compress):
        """Sends the initial metadata, once; compress is fixed from then on."""
        if self.initial_sent:
            return
        self.initial_sent = True
        # Compression is announced in the initial metadata.
        self.context.set_compression(
            grpc.Compression.Gzip if compress else grpc.Compression.NoCompression
        )
        if self.initial:
            self.context.send_initial_metadata(self.initial)


def maybe_echo_status(message, context):
    """Echo Status: ends the call with the requested status, if any."""
    if message.HasField("response_status") and message.response_status.code != 0:
        status = message.response_status
        context.abort(CODES.get(status.code, grpc.StatusCode.UNKNOWN), status.message)


def respond(parameters, echo):
    """The responses ResponseParameters ask for, with interval_us and per-message compression.

    Compression is on for the call if any of the first request's parameters ask
    for it; then each message that must not be compressed is sent uncompressed.
    """
    if parameters:
        echo.send_initial(any(p.HasField("compressed") and p.compressed.value for p in parameters))
    for p in parameters:
        if p.interval_us > 0:
            time.sleep(p.interval_us / 1e6)
        if not (p.HasField("compressed") and p.compressed.value):
            echo.context.disable_next_message_compression()
        yield messages_pb2.StreamingOutputCallResponse(payload=zeros(p.size))


class TestService(object):
    def EmptyCall(self, request, context):
        return empty_pb2.Empty()

    def UnaryCall(self, request, context):
        echo = Echo(context)
        maybe_echo_status(request, context)
        compress = request.HasField("response_compressed") and request.response_compressed.value
        echo.send_initial(compress)
        return messages_pb2.SimpleResponse(payload=zeros(request.response_size))

    def CacheableUnaryCall(self, request, context):
        return self.UnaryCall(request, context)

    def StreamingOutputCall(self, request, context):
        echo = Echo(context)
        for response in respond(request.response_parameters, echo):
            yield response
        maybe_echo_status(request, context)
        echo.send_initial(False)

    def StreamingInputCall(self, request_iterator, context):
        total = sum(len(request.payload.body) for request in request_iterator)
        return messages_pb2.StreamingInputCallResponse(aggregated_payload_size=total)

    def FullDuplexCall(self, request_iterator, context):
        echo = Echo(context)
        for request in request_iterator:
            maybe_echo_status(request, context)
            for response in respond(request.response_parameters, echo):
                yield response
        echo.send_initial(False)

    def HalfDuplexCall(self, request_iterator, context):
        echo = Echo(context)
        requests = list(request_iterator)
        for request in requests:
            for response in respond(request.response_parameters, echo):
                yield response
        echo.send_initial(False)


def test_service_handler(servicer):
    """grpc.testing.TestService without UnimplementedCall, which grpcio then
    answers UNIMPLEMENTED as for any unknown method."""
    m, e = messages_pb2, empty_pb2

    def handler(kind, method, request, response):
        return kind(
            method,
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )

    unary, server_streaming = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
    client_streaming, bidi = grpc.stream_unary_rpc_method_handler, grpc.stream_stream_rpc_method_handler
    methods = {
        "EmptyCall": handler(unary, servicer.EmptyCall, e.Empty, e.Empty),
        "UnaryCall": handler(unary, servicer.UnaryCall, m.SimpleRequest, m.SimpleResponse),
        "CacheableUnaryCall": handler(
            unary, servicer.CacheableUnaryCall, m.SimpleRequest, m.SimpleResponse
        ),
        "StreamingOutputCall": handler(
            server_streaming,
            servicer.StreamingOutputCall,
            m.StreamingOutputCallRequest,
            m.StreamingOutputCallResponse,
        ),
        "StreamingInputCall": handler(
            client_streaming,
            servicer.StreamingInputCall,
            m.StreamingInputCallRequest,
            m.StreamingInputCallResponse,
        ),
        "FullDuplexCall": handler(
            bidi, servicer.FullDuplexCall, m.StreamingOutputCallRequest, m.StreamingOutputCallResponse
        ),
        "HalfDuplexCall": handler(
            bidi, servicer.HalfDuplexCall, m.StreamingOutputCallRequest, m.StreamingOutputCallResponse
        ),
    }
    return grpc.method_handlers_generic_handler("grpc.testing.TestService", methods)


def main():
    global empty_pb2, messages_pb2, test_pb2_grpc
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080, help="0: any free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--use_tls", type=stubs.parse_bool, nargs="?", const=True, default=False
    )
    parser.add_argument("--tls_cert_file", default=os.path.join(stubs.TESTDATA_DIR, "server1.pem"))
    parser.add_argument("--tls_key_file", default=os.path.join(stubs.TESTDATA_DIR, "server1.key"))
    parser.add_argument(
        "--gen_dir", default=None, help="where the generated *_pb2 modules are (default: generate)"
    )
    args = parser.parse_args()
    empty_pb2, messages_pb2, test_pb2_grpc = stubs.load(args.gen_dir)

    # Streaming calls hold a thread each for as long as they last.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    server.add_generic_rpc_handlers((test_service_handler(TestService()),))

    host = "[%s]" % args.host if ":" in args.host else args.host
    address = "%s:%d" % (host, args.port)
    if args.use_tls:
        with open(args.tls_key_file, "rb") as f:
            key = f.read()
        with open(args.tls_cert_file, "rb") as f:
            cert = f.read()
        port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        print("python interop server: cannot bind %s" % address, file=sys.stderr)
        return 1
    server.start()
    print("python interop server listening on %s:%d" % (host, port), flush=True)

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1):
        pass
    server.stop(grace=1).wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
