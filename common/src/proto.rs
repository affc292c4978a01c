//! Code generated from `proto/hobotnica/v1`. Conversions to domain types live
//! in the controller's and agent's gRPC edges, not here.

#![allow(clippy::all, clippy::pedantic, missing_docs, rust_2018_idioms)]

tonic::include_proto!("hobotnica.v1");

/// The protocol version this build speaks; see `ProtocolVersion` in agent.proto.
pub const PROTOCOL_VERSION: u32 = ProtocolVersion::Current as u32;

/// gRPC metadata key naming the calling agent.
pub const AGENT_ID_METADATA: &str = "x-hobotnica-agent-id";
