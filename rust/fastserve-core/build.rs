//! Generates the gRPC service and messages from `protos/grpc_predict_v2.proto` (and the Triton
//! `model_config.proto` it imports) with the protoc binary vendored as a build dependency, so
//! building needs nothing installed by hand. The descriptor set written next to the code is what
//! `config.pbtxt` files are parsed against. `docs/openapi.yaml`, the one description of the REST
//! API, becomes the JSON served at `/v2/openapi.json`.

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
    openapi_json()
}

/// Converts `docs/openapi.yaml` to `OUT_DIR/openapi.json` (aliases resolved), so the server
/// serves what the document says without parsing YAML at run time.
fn openapi_json() -> Result<(), Box<dyn std::error::Error>> {
    let yaml_path = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../docs/openapi.yaml");
    println!("cargo:rerun-if-changed={}", yaml_path.display());
    let yaml = std::fs::read_to_string(&yaml_path).map_err(|e| format!("{}: {e}", yaml_path.display()))?;
    let document: serde_json::Value =
        serde_norway::from_str(&yaml).map_err(|e| format!("{}: not valid YAML: {e}", yaml_path.display()))?;
    let json = PathBuf::from(std::env::var("OUT_DIR")?).join("openapi.json");
    std::fs::write(json, serde_json::to_vec(&document)?)?;
    Ok(())
}
