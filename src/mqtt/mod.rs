//! Server-side MQTT building blocks shared by the embedded device broker
//! (`downstream::broker`) and the AWS IoT emulator (`emulator::aws::server`): one codec adapter
//! over rumqttc's 3.1.1 and 5 packet types with the topic-filter rules (`wire`), the MQTT 5
//! properties a message carries (`props`), and the byte
//! side of a connection (`stream`: read buffer, framing, batched writes with a timeout).
//!
//! Both servers run one tokio task per connection and never see a protocol version: `wire`
//! decodes client packets into one shape and encodes answers in the protocol the client chose.
//!
//! The client side has one module: `client_ext`, the only place where the gateway's rumqttc
//! clients (the downstream session, the upstream telemetry links) reach into rumqttc's event
//! loop.

pub mod client_ext;
pub mod props;
pub mod stream;
pub mod wire;
