//! The KServe V2 / Triton gRPC messages and service, generated from `protos/grpc_predict_v2.proto`
//! (Triton's `ModelConfig` included): shared by the gRPC front end and the model configuration
//! answers of both protocols.

#![allow(clippy::all, clippy::unwrap_used, clippy::expect_used, missing_docs)]

tonic::include_proto!("inference");
