//! Generates the gRPC client (and, for the transport floor, the server) for `inference.GRPCInferenceService` from the project's proto, with
//! the vendored protoc, so building the load generator needs nothing installed by hand.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../protos");
    let proto = protos.join("grpc_predict_v2.proto");
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // The transport floor's tonic mode serves ModelInfer only; the other methods answer UNIMPLEMENTED.
        .generate_default_stubs(true)
        // Tensor payloads as `Bytes`: the prepared request is cloned per call without copying.
        .bytes(".inference")
        .compile_protos(&[proto], &[protos])?;
    Ok(())
}
