//! Generated KServe V2 gRPC messages and client.

#![allow(clippy::all, clippy::pedantic)]

tonic::include_proto!("inference");
