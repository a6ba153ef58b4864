//! Compiles `proto/fuzz.proto` (the message the JSON targets transcode)
//! into a descriptor set the targets embed.

use prost::Message as _;

fn main() {
    println!("cargo:rerun-if-changed=proto/fuzz.proto");
    let set = match protox::compile(["fuzz.proto"], ["proto"]) {
        Ok(set) => set,
        Err(e) => {
            eprintln!("proto/fuzz.proto: {e}");
            std::process::exit(1);
        }
    };
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    if let Err(e) = std::fs::write(out.join("fuzz.bin"), set.encode_to_vec()) {
        eprintln!("writing the descriptor set: {e}");
        std::process::exit(1);
    }
}
