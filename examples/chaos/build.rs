//! Generates the Chaos messages, server and client.

fn main() -> std::io::Result<()> {
    lodestar_build::compile_protos(&["proto/chaos.proto"], &["proto"])
}
