//! Generates the RouteGuide messages, server and client.

fn main() -> std::io::Result<()> {
    lodestar_build::compile_protos(&["proto/route_guide.proto"], &["proto"])
}
