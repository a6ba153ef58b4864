//! Generates the test service.

fn main() -> std::io::Result<()> {
    lodestar_build::compile_protos(&["proto/lodestar/test/echo.proto"], &["proto"])?;
    // Its own set: a service the REST tests expect a server to refuse.
    lodestar_build::compile_protos(&["proto/lodestar/test/bad_route.proto"], &["proto"])
}
