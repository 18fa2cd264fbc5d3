//! Keys, CSRs, certificates and secrets: the only module that knows rcgen, openssl and
//! x509-parser.

mod key_type;
mod secret;

pub use key_type::{KeyType, UnknownKeyType};
pub use secret::Secret;
