//! Agents' messages: any bytes decode as each message an agent sends, or
//! fail to; a registration is refused or bounded and printable.
#![no_main]

use hobotnica_common::proto::{
    AgentMessage, CompleteJobRequest, LogChunk, RegisterRequest, RenewLeaseRequest,
};
use hobotnica_controller::fuzzing::{Registration, validate_registration};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let _ = AgentMessage::decode(data);
    let _ = CompleteJobRequest::decode(data);
    let _ = LogChunk::decode(data);
    let _ = RenewLeaseRequest::decode(data);
    let Ok(request) = RegisterRequest::decode(data) else {
        return;
    };
    // As the gRPC edge hands it to the core.
    let registration = Registration {
        name: request.name,
        labels: request.labels.into_iter().collect(),
        concurrency: request.concurrency,
        version: request.version,
        protocol_version: hobotnica_common::proto::PROTOCOL_VERSION,
    };
    if validate_registration(&registration).is_ok() {
        assert!(registration.version.len() <= 64);
        assert!(registration.labels.len() <= 64);
        for value in registration.labels.values() {
            assert!(value.chars().count() <= 256 && !value.chars().any(char::is_control));
        }
    }
});
