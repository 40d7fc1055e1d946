//! Compiles the gRPC protocol with protox (pure Rust), so building needs no protoc.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["ocr/v1/ocr.proto"], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Served by gRPC reflection.
    std::fs::write(out.join("ocr_descriptor.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure()
        // The image is handed on as it came off the wire, not copied out.
        .bytes(".ocr.v1.SubmitRequest.image")
        .compile_fds(descriptors)?;
    Ok(())
}
