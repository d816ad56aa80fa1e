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

#[cfg(test)]
mod tests {
    use super::*;
    use payrail_domain::Secret;

    const KEY: &str =
        include_str!("../../../payrail-emulator/testdata/test-only-keys/merchant-private.pem");
    const PUB: &str =
        include_str!("../../../payrail-emulator/testdata/test-only-keys/merchant-public.pem");

    /// Pinned vector, computed independently with OpenSSL 3.0:
    ///
    /// ```text
    /// printf 'GET\n/v3/pay/transactions/out-trade-no/att_01KAQ7Y9XH0000000000000000?mchid=1900000109\n1795312800\n5K8264ILTKCH16CQ2502SI8ZNMTM67VS\n\n' > wx.txt
    /// openssl dgst -sha256 -sign merchant-private.pem wx.txt | base64 -w0
    /// ```
    #[test]
    fn request_signature_matches_openssl() {
        let signer = RsaSigner::from_secret("k", &Secret::new(KEY.into())).unwrap();
        let header = authorization(
            &signer,
            "1900000109",
            "SERIAL",
            "GET",
            "/v3/pay/transactions/out-trade-no/att_01KAQ7Y9XH0000000000000000?mchid=1900000109",
            1_795_312_800,
            "5K8264ILTKCH16CQ2502SI8ZNMTM67VS",
            "",
        );
        let want = "kg+ZlNAcrINdK9LzWlEJOOmUUdgjh9xZpj8SuYFu8Rr8oa5aDD8TrUcoAMZJ+mrqcBqCPbTV8AnyTCGCA4zwos6UdnRT4aui+0kyt85j5eC/ZkTVhPNJeqO+a7d7GfJ6G5k+ZTUXjzyiaLpY+U8vyrmE39uZOq+vFPjtwaXjx8U6SjO9qQQ/b44cZCHLGGvCMYblAVeGBP/nutUyIvAiX4AkmJ9FIKHQTObMwhNH+x3ggO+4k6qvv38s57szEKvppEpWJgZz9oysI0Iq4ZA7F1NA1hJv8Y5l/QFqkLaW2xf266yJWN74bZErVe9oMxpl61FqJlvvvDGrWWJp7rbp2w==";
        assert!(
            header.starts_with("WECHATPAY2-SHA256-RSA2048 mchid=\"1900000109\","),
            "{header}"
        );
        assert!(
            header.contains(&format!("signature=\"{want}\"")),
            "{header}"
        );
        assert!(
            header.contains("timestamp=\"1795312800\"") && header.contains("serial_no=\"SERIAL\"")
        );
    }

    #[test]
    fn verification_checks_serial_signature_and_spots_probes() {
        let signer = RsaSigner::from_secret("k", &Secret::new(KEY.into())).unwrap();
        let verifier = RsaVerifier::parse("p", PUB).unwrap();
        let body = br#"{"a":1}"#;
        let sig = signer.sign_b64(&response_message("1795312800", "N", body));
        let h = |sig: &str, serial: &str| -> Verified {
            let sig = sig.to_string();
            let serial = serial.to_string();
            verify(
                &verifier,
                "S1",
                &SignedHeaders {
                    timestamp: Some("1795312800"),
                    nonce: Some("N"),
                    signature: Some(&sig),
                    serial: Some(&serial),
                },
                body,
            )
        };
        assert_eq!(h(&sig, "S1"), Verified::Ok);
        assert_eq!(h(&sig, "S2"), Verified::WrongSerial);
        assert_eq!(h("WECHATPAY/SIGNTEST/abc", "S1"), Verified::Probe);
        let other = signer.sign_b64(b"something else");
        assert_eq!(h(&other, "S1"), Verified::BadSignature);
        assert_eq!(
            verify(
                &verifier,
                "S1",
                &SignedHeaders {
                    timestamp: None,
                    nonce: Some("N"),
                    signature: Some(&sig),
                    serial: Some("S1")
                },
                body
            ),
            Verified::Missing
        );
    }
}
