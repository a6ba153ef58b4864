//! Generates the Greeter messages, server and client.

fn main() -> std::io::Result<()> {
    lodestar_build::compile_protos(&["proto/helloworld.proto"], &["proto"])
}
