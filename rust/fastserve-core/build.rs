//! Generates the gRPC service and messages from `protos/grpc_predict_v2.proto` with the protoc
//! binary vendored as a build dependency, so building needs nothing installed by hand.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: a build script compiled for one checkout may run for another.
    let protos = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../protos");
    let proto = protos.join("grpc_predict_v2.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    println!("cargo:rerun-if-changed=build.rs");
    // The code generator runs the protoc named by PROTOC.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_client(false)
        // Tensor payloads stay `Bytes`: decoded by slicing the message buffer, answered without a copy.
        .bytes(".inference")
        .compile_protos(&[proto], &[protos])?;
    Ok(())
}
