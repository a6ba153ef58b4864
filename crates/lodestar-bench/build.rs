//! Generates the benchmark service twice: for lodestar (with lodestar-build)
//! and for raw tonic (with tonic-prost-build, transport on), from the same
//! proto, so both sides move the same bytes.

fn main() -> std::io::Result<()> {
    lodestar_build::compile_protos(&["proto/bench.proto"], &["proto"])?;
    let fds = protox::compile(["proto/bench.proto"], ["proto"])
        .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    let out = std::path::PathBuf::from(
        std::env::var_os("OUT_DIR").ok_or_else(|| std::io::Error::other("OUT_DIR is not set"))?,
    )
    .join("raw");
    std::fs::create_dir_all(&out)?;
    tonic_prost_build::configure()
        .build_transport(true)
        .out_dir(&out)
        .compile_fds(fds)
}
