"""Loads the grpc.testing stubs for the Python interop client and server.

The modules grpc_tools.protoc generates for proto/grpc/testing/*.proto import
each other as `grpc.testing.<name>_pb2`, which lives under grpcio's own `grpc`
package. The generated directory's `grpc/` is added to `grpc.__path__`, so that
its `grpc/testing/` (which has no __init__.py) becomes a namespace subpackage
of grpcio's `grpc`.
"""

import atexit
import importlib
import os
import shutil
import sys
import tempfile

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
CRATE_DIR = os.path.dirname(HERE)
PROTO_DIR = os.path.join(CRATE_DIR, "proto")
TESTDATA_DIR = os.path.join(CRATE_DIR, "testdata")
PROTOS = [
    "grpc/testing/empty.proto",
    "grpc/testing/messages.proto",
    "grpc/testing/test.proto",
]


def _generate():
    """Generates the stubs into a temporary directory removed at exit."""
    from grpc_tools import protoc

    gen_dir = tempfile.mkdtemp(prefix="lodestar-interop-py-")
    atexit.register(shutil.rmtree, gen_dir, True)
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            "-I" + PROTO_DIR,
            "--python_out=" + gen_dir,
            "--grpc_python_out=" + gen_dir,
        ]
        + [os.path.join(PROTO_DIR, p) for p in PROTOS]
    )
    if rc != 0:
        sys.exit("grpc_tools.protoc failed with exit code %d" % rc)
    return gen_dir


def load(gen_dir=None):
    """Returns (empty_pb2, messages_pb2, test_pb2_grpc) from gen_dir.

    Without gen_dir, generates the stubs first (needs grpcio-tools).
    """
    if gen_dir is None:
        gen_dir = _generate()
    gen_grpc = os.path.join(os.path.abspath(gen_dir), "grpc")
    if not os.path.isfile(os.path.join(gen_grpc, "testing", "test_pb2_grpc.py")):
        sys.exit("no generated stubs in %s (grpc/testing/test_pb2_grpc.py)" % gen_dir)
    if gen_grpc not in grpc.__path__:
        grpc.__path__.append(gen_grpc)
    testing = importlib.import_module("grpc.testing")

    # If a regular grpc.testing package is installed (grpcio-testing), it was
    # imported instead of the namespace one: make it see the stubs too.
    gen_testing = os.path.join(gen_grpc, "testing")
    if gen_testing not in list(testing.__path__):
        testing.__path__.append(gen_testing)
    from grpc.testing import empty_pb2, messages_pb2, test_pb2_grpc

    return empty_pb2, messages_pb2, test_pb2_grpc


def parse_bool(value):
    """A flag value as interop binaries take them: true/false, 1/0, yes/no."""
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError("not a boolean: %r" % value)
