//! WeChat Pay API v3 signatures: `WECHATPAY2-SHA256-RSA2048` requests, signed responses and
//! notifications, AES-256-GCM notification resources.

use crate::common::{RsaSigner, RsaVerifier};

/// The signed message of a request: five lines, each ending in `\n`.
pub fn request_message(
    method: &str,
    path_and_query: &str,
    timestamp: i64,
    nonce: &str,
    body: &str,
) -> String {
    format!("{method}\n{path_and_query}\n{timestamp}\n{nonce}\n{body}\n")
}

/// The `Authorization` header value of a request.
#[allow(clippy::too_many_arguments)] // the five signed lines plus the three header fields
pub fn authorization(
    signer: &RsaSigner,
    mchid: &str,
    serial_no: &str,
    method: &str,
    path_and_query: &str,
    timestamp: i64,
    nonce: &str,
    body: &str,
) -> String {
    let signature =
        signer.sign_b64(request_message(method, path_and_query, timestamp, nonce, body).as_bytes());
    format!(
        "WECHATPAY2-SHA256-RSA2048 mchid=\"{mchid}\",nonce_str=\"{nonce}\",signature=\"{signature}\",timestamp=\"{timestamp}\",serial_no=\"{serial_no}\""
    )
}

/// The signed message of a response or notification: timestamp, nonce, raw body, each ending
/// in `\n`.
pub fn response_message(timestamp: &str, nonce: &str, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(body.len() + 64);
    m.extend_from_slice(timestamp.as_bytes());
    m.push(b'\n');
    m.extend_from_slice(nonce.as_bytes());
    m.push(b'\n');
    m.extend_from_slice(body);
    m.push(b'\n');
    m
}

/// The verification of a signed response or notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    Ok,
    Probe,
    BadSignature,
    WrongSerial,
    Missing,
}

pub struct SignedHeaders<'a> {
    pub timestamp: Option<&'a str>,
    pub nonce: Option<&'a str>,
    pub signature: Option<&'a str>,
    pub serial: Option<&'a str>,
}

pub fn verify(
    verifier: &RsaVerifier,
    expected_serial: &str,
    h: &SignedHeaders<'_>,
    body: &[u8],
) -> Verified {
    let (Some(ts), Some(nonce), Some(sig)) = (h.timestamp, h.nonce, h.signature) else {
        return Verified::Missing;
    };
    // WeChat's probes carry a signature that can never verify; say so, so the caller can
    // refuse them quietly.
    if sig.starts_with("WECHATPAY/SIGNTEST/") {
        return Verified::Probe;
    }
    if h.serial != Some(expected_serial) {
        return Verified::WrongSerial;
    }
    if verifier.verify_b64(&response_message(ts, nonce, body), sig) {
        Verified::Ok
    } else {
        Verified::BadSignature
    }
}
