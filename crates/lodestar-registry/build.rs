//! Generates the registry API.

fn main() -> std::io::Result<()> {
    lodestar_build::compile_protos(&["proto/lodestar/registry/v1/registry.proto"], &["proto"])
}
