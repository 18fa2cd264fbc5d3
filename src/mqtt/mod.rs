//! Server-side MQTT building blocks shared by the embedded device broker
//! (`downstream::broker`) and the AWS IoT emulator (`emulator::aws::server`): one codec adapter
//! over rumqttc's 3.1.1 and 5 packet types, and topic-filter rules.
//!
//! Both servers run one tokio task per connection and never see a protocol version: `wire`
//! decodes client packets into one shape and encodes answers in the protocol the client chose.

pub mod wire;
