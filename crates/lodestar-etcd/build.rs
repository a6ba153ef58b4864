//! Generates the etcd v3 client from the protos in `proto/etcd`.

fn main() -> std::io::Result<()> {
    lodestar_build::configure()
        .build_server(false)
        .compile(&["proto/etcd/rpc.proto"], &["proto"])
}
