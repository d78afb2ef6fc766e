//! Generates the gRPC service and messages from `protos/grpc_predict_v2.proto` with the protoc
//! binary vendored as a build dependency, so building needs nothing installed by hand.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../protos");
    let proto = protos.join("grpc_predict_v2.proto");
    // The code generator runs the protoc named by PROTOC.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_client(false)
        // Tensor payloads stay `Bytes`: decoded by slicing the message buffer, answered without a copy.
        .bytes(".inference")
        .compile_protos(&[proto], &[protos])?;
    Ok(())
}
