//! A fast path for the PEM the gateway reads once per device (the certificate the cloud
//! issued, the CSR it checks it against): blocks without headers, decoded straight from the
//! text. The `pem` crate parses line by line into owned strings and was about 90,000
//! instructions per device in the daemon (callgrind, 2026-12-07), more than the x509 parse
//! of the certificate itself.
//!
//! Only plain input takes this path: any header line (`Proc-Type: ...`), a block without its
//! matching END line, or base64 that does not decode makes [`plain_blocks`] answer `None`, and
//! the caller parses with the `pem` crate as before, so errors read exactly as they did.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

const BEGIN: &str = "-----BEGIN ";
const DASHES: &str = "-----";

/// `(label, DER)` of every PEM block in `text`, in order, when every block is plain (no
/// headers, base64 that decodes); `None` otherwise, and when there is no block at all.
pub(crate) fn plain_blocks(text: &str) -> Option<Vec<(&str, Vec<u8>)>> {
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        let after = &rest[start + BEGIN.len()..];
        let label_len = after.find(DASHES)?;
        let label = &after[..label_len];
        if label.contains(['\n', '\r']) {
            return None;
        }
        let body = &after[label_len + DASHES.len()..];
        let end_at = body.find("-----END ")?;
        let end = &body[end_at + "-----END ".len()..];
        let end = end.strip_prefix(label)?.strip_prefix(DASHES)?;
        let body = &body[..end_at];
        if body.contains(':') {
            return None;
        }
        // Sized once: a filtered iterator's size hint is 0, and growing by pushes reallocated
        // several times per block.
        let mut compact = Vec::with_capacity(body.len());
        compact.extend(body.bytes().filter(|b| !b.is_ascii_whitespace()));
        blocks.push((label, STANDARD.decode(compact).ok()?));
        rest = end;
    }
    (!blocks.is_empty()).then_some(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_blocks_decode_as_the_pem_crate_does_and_anything_else_is_left_to_it() {
        let cert = pem::encode(&pem::Pem::new("CERTIFICATE", vec![1u8; 700]));
        let csr = pem::encode_config(
            &pem::Pem::new("CERTIFICATE REQUEST", vec![2u8; 300]),
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        );
        let text = format!("leading text\n{cert}{csr}trailing");
        let ours = plain_blocks(&text).unwrap();
        let theirs = pem::parse_many(&text).unwrap();
        assert_eq!(ours.len(), theirs.len());
        for ((label, der), block) in ours.iter().zip(&theirs) {
            assert_eq!(*label, block.tag());
            assert_eq!(der.as_slice(), block.contents());
        }
        let headers = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n";
        for odd in [
            "",
            "no pem here",
            headers,
            "-----BEGIN CERTIFICATE-----\nAAAA\n",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "-----BEGIN CERTIFICATE-----\nA!AA\n-----END CERTIFICATE-----\n",
            "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n",
        ] {
            assert_eq!(plain_blocks(odd), None, "{odd:?}");
        }
    }
}
