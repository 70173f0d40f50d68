//! Compiles the .proto files with protox (pure Rust), so neither this machine nor CI needs a
//! system `protoc`. The same descriptor sets feed codegen and server reflection.

use std::{env, error::Error, fs, path::PathBuf};

use prost::Message;

const INSIGHT: &str = "spotifai/insight/v1/insight.proto";
const MONITOR: &str = "spotifai/monitor/v1/monitor.proto";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=spotifai");
    let out = PathBuf::from(env::var("OUT_DIR")?);

    // One descriptor set per service, so each server's reflection lists only its own API.
    for (file, name) in [(INSIGHT, "insight"), (MONITOR, "monitor")] {
        let fds = protox::compile([file], ["."])?;
        fs::write(
            out.join(format!("{name}_descriptor.bin")),
            fds.encode_to_vec(),
        )?;
    }

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(protox::compile([INSIGHT], ["."])?)?;
    // The monitor's calls are small messages, most of them on long-lived streams: its codec
    // keeps a small encode buffer per call instead of tonic's 8 KiB (see `codec.rs`).
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::codec::SmallMessageCodec")
        .compile_fds(protox::compile([MONITOR], ["."])?)?;
    Ok(())
}
