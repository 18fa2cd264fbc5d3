//! Server-side MQTT building blocks shared by the embedded device broker
//! (`downstream::broker`) and the AWS IoT emulator (`emulator::aws::server`): one codec adapter
//! over rumqttc's 3.1.1 and 5 packet types with the topic-filter rules (`wire`), and the byte
//! side of a connection (`stream`: read buffer, framing, batched writes with a timeout).
//!
//! Both servers run one tokio task per connection and never see a protocol version: `wire`
//! decodes client packets into one shape and encodes answers in the protocol the client chose.

pub mod stream;
pub mod wire;
