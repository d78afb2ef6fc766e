//! Generates the gRPC service and messages from `protos/grpc_predict_v2.proto` (and the Triton
//! `model_config.proto` it imports) with the protoc binary vendored as a build dependency, so
//! building needs nothing installed by hand. The descriptor set written next to the code is what
//! `config.pbtxt` files are parsed against.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: a build script compiled for one checkout may run for another.
    let protos = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../protos");
    let proto = protos.join("grpc_predict_v2.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    println!("cargo:rerun-if-changed={}", protos.join("model_config.proto").display());
    let descriptors = PathBuf::from(std::env::var("OUT_DIR")?).join("descriptors.bin");
    println!("cargo:rerun-if-changed=build.rs");
    // The code generator runs the protoc named by PROTOC.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_client(false)
        // Tensor payloads stay `Bytes`: decoded by slicing the message buffer, answered without a copy.
        .bytes(".inference")
        .file_descriptor_set_path(descriptors)
        .compile_protos(&[proto], &[protos])?;
    Ok(())
}
