//! Generates the interop test service.

fn main() -> std::io::Result<()> {
    lodestar_build::compile_protos(&["proto/grpc/testing/test.proto"], &["proto"])
}
