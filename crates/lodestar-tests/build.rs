//! Generates the test service.

fn main() -> std::io::Result<()> {
    lodestar_build::compile_protos(&["proto/lodestar/test/echo.proto"], &["proto"])
}
