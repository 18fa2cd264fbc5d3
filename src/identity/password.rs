//! Password hashes for local applications (`[[downstream.users]]`): Argon2id in the PHC
//! string format (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`), as `fleetgw passwd` prints
//! them. Only the hash is ever stored; verifying costs what the hash's parameters say, by
//! design, so it runs off the async runtime's worker threads.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use super::IdentityError;

/// Hashes `password` with Argon2id (the crate's recommended parameters) and a random salt.
pub fn hash_password(password: &[u8]) -> Result<String, IdentityError> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| IdentityError::signing("password salt", e))?;
    Argon2::default()
        .hash_password(password, &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| IdentityError::signing("password hash", e))
}

/// Checks that `phc` is a PHC string of a hash this build can verify (for config checks).
pub fn check_password_hash(phc: &str) -> Result<(), IdentityError> {
    let hash = PasswordHash::new(phc).map_err(|e| IdentityError::malformed("password hash", e))?;
    match hash.algorithm.as_str() {
        "argon2id" | "argon2i" | "argon2d" => Ok(()),
        other => Err(IdentityError::malformed(
            "password hash",
            format!("{other} is not supported; make one with `fleetgw passwd`"),
        )),
    }
}

/// True when `password` matches the PHC string `phc` (false for a malformed hash too).
pub fn verify_password(phc: &str, password: &[u8]) -> bool {
    match PasswordHash::new(phc) {
        Ok(hash) => Argon2::default().verify_password(password, &hash).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_only() {
        let phc = hash_password(b"correct horse").unwrap();
        assert!(phc.starts_with("$argon2id$"), "{phc}");
        check_password_hash(&phc).unwrap();
        assert!(verify_password(&phc, b"correct horse"));
        assert!(!verify_password(&phc, b"correct horse "));
        assert!(!verify_password(&phc, b""));
        // Two hashes of one password differ (random salt).
        assert_ne!(phc, hash_password(b"correct horse").unwrap());
    }

    #[test]
    fn malformed_or_foreign_hashes_are_refused() {
        assert!(check_password_hash("plaintext").is_err());
        assert!(check_password_hash("$pbkdf2-sha256$i=1000$c2FsdA$aGFzaA").is_err());
        assert!(!verify_password("plaintext", b"plaintext"));
    }
}
