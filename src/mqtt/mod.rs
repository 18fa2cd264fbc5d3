//! Server-side MQTT building blocks shared by the embedded device broker
//! (`downstream::broker`) and the AWS IoT emulator (`emulator::aws::server`): one codec adapter
//! over rumqttc's 3.1.1 and 5 packet types with the topic-filter rules (`wire`), the MQTT 5
//! properties a message carries (`props`), and the byte
//! side of a connection (`stream`: read buffer, framing, batched writes with a timeout).
//!
//! Both servers run one tokio task per connection and never see a protocol version: `wire`
//! decodes client packets into one shape and encodes answers in the protocol the client chose.
//!
//! The client side: `upstream`, the gateway's own lean MQTT 3.1.1 / MQTT 5 client for the
//! upstream telemetry links (a few KiB per connection instead of rumqttc's ~80 KB, message
//! properties over MQTT 5, packet ids it allocates itself), reusing `props` and rumqttc's
//! packet types; and `client_ext`, the only place where the gateway's remaining rumqttc client
//! with state (the downstream session to an external broker) reaches into rumqttc's event
//! loop. Provisioning connections use rumqttc as documented.

pub mod client_ext;
pub mod props;
pub mod stream;
pub mod upstream;
pub mod wire;
