//! Authentication: each end proves it knows the per-VM secret, and the secret never crosses the
//! wire.
//!
//! The agent opens with a hello carrying a fresh random nonce. Both ends hash the conversation's
//! opening (the agent's hello body, then the client's hello body) into a transcript. The client
//! answers with its own nonce and `HMAC-SHA-256(secret, CLIENT_LABEL ‖ transcript ‖ client
//! nonce)`; the agent checks it in constant time and answers with `HMAC-SHA-256(secret,
//! AGENT_LABEL ‖ transcript ‖ client nonce)`, which the client checks before it believes
//! anything the agent says. So:
//! - a proof is bound to one connection (the agent's nonce) and to everything both hellos said
//!   (versions, limits, the security mode: no downgrade goes unnoticed);
//! - the agent's proof is fresh for the client (the client's nonce): an impostor on a reused
//!   CID cannot replay one it saw;
//! - the labels differ, so neither proof can be reflected as the other.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::limits::{MAC_LEN, MAX_SECRET, MIN_SECRET, NONCE_LEN};

type HmacSha256 = Hmac<Sha256>;

/// NOTE: part of the protocol: changing either label changes every proof.
const CLIENT_LABEL: &[u8] = b"ferry/2 client proof\0";
const AGENT_LABEL: &[u8] = b"ferry/2 agent proof\0";

/// A per-VM secret, keyed once: the raw bytes are not kept.
#[derive(Clone)]
pub struct Secret {
    key: HmacSha256,
}

impl core::fmt::Debug for Secret {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Why bytes cannot be a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretError {
    /// Fewer than [`MIN_SECRET`] bytes.
    TooShort,
    /// More than [`MAX_SECRET`] bytes.
    TooLong,
}

impl SecretError {
    /// A short description for people.
    pub const fn as_str(self) -> &'static str {
        match self {
            SecretError::TooShort => "the secret is shorter than 16 bytes",
            SecretError::TooLong => "the secret is longer than 4096 bytes",
        }
    }
}

impl core::fmt::Display for SecretError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Secret {
    /// Keys a secret: exactly the bytes given (a secret file's whole content, newline included
    /// if it has one: both ends read the same file).
    pub fn new(bytes: &[u8]) -> Result<Secret, SecretError> {
        if bytes.len() < MIN_SECRET {
            return Err(SecretError::TooShort);
        }
        if bytes.len() > MAX_SECRET {
            return Err(SecretError::TooLong);
        }
        // HMAC takes keys of any length; the bound above is ours.
        let key = HmacSha256::new_from_slice(bytes).map_err(|_| SecretError::TooLong)?;
        Ok(Secret { key })
    }

    fn mac(&self, label: &[u8], transcript: &[u8; 32], nonce: &[u8; NONCE_LEN]) -> HmacSha256 {
        let mut mac = self.key.clone();
        mac.update(label);
        mac.update(transcript);
        mac.update(nonce);
        mac
    }

    /// The client's proof.
    pub(crate) fn client_proof(
        &self,
        transcript: &[u8; 32],
        nonce: &[u8; NONCE_LEN],
    ) -> [u8; MAC_LEN] {
        self.mac(CLIENT_LABEL, transcript, nonce)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `proof` is the client's proof; constant-time in its content.
    pub(crate) fn verify_client_proof(
        &self,
        transcript: &[u8; 32],
        nonce: &[u8; NONCE_LEN],
        proof: &[u8],
    ) -> bool {
        // `verify_slice` compares in constant time (subtle) and refuses any other length.
        self.mac(CLIENT_LABEL, transcript, nonce)
            .verify_slice(proof)
            .is_ok()
    }

    /// The agent's proof.
    pub(crate) fn agent_proof(
        &self,
        transcript: &[u8; 32],
        nonce: &[u8; NONCE_LEN],
    ) -> [u8; MAC_LEN] {
        self.mac(AGENT_LABEL, transcript, nonce)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `proof` is the agent's proof; constant-time in its content.
    pub(crate) fn verify_agent_proof(
        &self,
        transcript: &[u8; 32],
        nonce: &[u8; NONCE_LEN],
        proof: &[u8; MAC_LEN],
    ) -> bool {
        self.mac(AGENT_LABEL, transcript, nonce)
            .verify_slice(proof)
            .is_ok()
    }
}

/// The running hash of the conversation's opening: the agent's hello body, then the client's.
#[derive(Clone, Debug, Default)]
pub(crate) struct Transcript(Sha256);

impl Transcript {
    pub(crate) fn update(&mut self, frame_body: &[u8]) {
        // Length-prefixed, so the boundary between the two hellos is part of what is hashed.
        self.0.update((frame_body.len() as u32).to_le_bytes());
        self.0.update(frame_body);
    }

    pub(crate) fn digest(&self) -> [u8; 32] {
        self.0.clone().finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_lengths_at_their_edges() {
        assert_eq!(Secret::new(&[7; 15]).err(), Some(SecretError::TooShort));
        assert!(Secret::new(&[7; 16]).is_ok());
        assert!(Secret::new(&[7; 4096]).is_ok());
        assert_eq!(Secret::new(&[7; 4097]).err(), Some(SecretError::TooLong));
        assert_eq!(Secret::new(b"").err(), Some(SecretError::TooShort));
    }

    /// The proof is RFC 2104 HMAC-SHA-256 over the documented input: pinned by a vector
    /// computed independently (Python: `hmac.new(key, label + transcript + nonce, sha256)`).
    #[test]
    fn proofs_are_pinned() {
        let secret = Secret::new(b"0123456789abcdef").unwrap();
        let transcript = [1u8; 32];
        let nonce = [2u8; 32];
        let client = secret.client_proof(&transcript, &nonce);
        let agent = secret.agent_proof(&transcript, &nonce);
        assert_eq!(hex(&client), CLIENT_VECTOR);
        assert_eq!(hex(&agent), AGENT_VECTOR);
        assert!(secret.verify_client_proof(&transcript, &nonce, &client));
        assert!(
            !secret.verify_client_proof(&transcript, &nonce, &agent),
            "no reflection"
        );
        assert!(!secret.verify_client_proof(&transcript, &nonce, &client[..31]));
        assert!(!secret.verify_client_proof(&transcript, &nonce, &[]));
        assert!(!secret.verify_client_proof(&[0; 32], &nonce, &client));
        assert!(!secret.verify_client_proof(&transcript, &[0; 32], &client));
        assert!(secret.verify_agent_proof(&transcript, &nonce, &agent));
        assert!(!secret.verify_agent_proof(&transcript, &nonce, &client));
        let other = Secret::new(b"0123456789abcdeF").unwrap();
        assert!(!other.verify_client_proof(&transcript, &nonce, &client));
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    const CLIENT_VECTOR: &str = "d559de43eff2271f7dd08a6c9d76e40fa4dd68ad01b51c19fdc71071fe91fdf0";
    const AGENT_VECTOR: &str = "41bf3a290c7fbd22903e7b531a42cc3b7b854185f45929aca464e921c8e39c5b";
}
