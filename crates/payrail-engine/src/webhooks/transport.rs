//! The HTTP side of a webhook delivery: one POST, bounded in time and in what is read back, no
//! redirects, no proxies, and the private-address guard (SSRF).
//!
//! The guard checks the addresses a connection is actually made to: IP-literal hosts before the
//! request, host names inside the client's DNS resolver ([`GuardedResolver`]), which refuses the
//! whole name if any address it resolves to is special (loopback, private, link-local, …). The
//! connection then uses exactly the checked addresses, so there is no window between checking a
//! name and connecting in which DNS could answer differently (rebinding).

use payrail_domain::webhook::blocked_address_reason;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Most bytes of an answer's body read (and kept in the delivery log).
pub const RESPONSE_BODY_MAX_BYTES: usize = 4096;

/// Why an attempt did not count as delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Stable class: `http_status`, `redirect_not_followed`, `timeout`, `connect_failed`,
    /// `dns_failed`, `blocked_address`, `invalid_url`, `request_failed`.
    pub class: &'static str,
    pub message: String,
    /// Retrying cannot help (the URL cannot be sent to at all).
    pub permanent: bool,
}

/// What came of one POST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub status_code: Option<u16>,
    /// The first [`RESPONSE_BODY_MAX_BYTES`] of the answer, lossily decoded.
    pub body: Option<String>,
    /// `None`: a 2xx answer, delivered.
    pub failure: Option<Failure>,
}

impl Sent {
    fn failed(class: &'static str, message: String, permanent: bool) -> Sent {
        Sent {
            status_code: None,
            body: None,
            failure: Some(Failure {
                class,
                message,
                permanent,
            }),
        }
    }
}

/// A resolved name with a refused address.
#[derive(Debug)]
struct BlockedAddress {
    host: String,
    ip: IpAddr,
    reason: &'static str,
}

impl std::fmt::Display for BlockedAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} resolves to {}, {}; {HINT}",
            self.host, self.ip, self.reason
        )
    }
}

impl std::error::Error for BlockedAddress {}

const HINT: &str = "webhooks are not sent to such addresses unless webhook_allow_private_targets is set (local development only)";

/// Resolves with the system resolver and refuses names with a special address.
struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if let Some((ip, reason)) = addrs
                .iter()
                .find_map(|a| blocked_address_reason(a.ip()).map(|r| (a.ip(), r)))
            {
                return Err(Box::new(BlockedAddress { host, ip, reason }) as _);
            }
            let addrs: Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

pub struct Transport {
    client: Option<reqwest::Client>,
    allow_private: bool,
    timeout: Duration,
}

impl Transport {
    pub fn new(timeout_ms: u64, allow_private: bool) -> Transport {
        let timeout = Duration::from_millis(timeout_ms);
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would connect on our behalf to addresses the guard never sees.
            .no_proxy()
            .connect_timeout(timeout)
            .timeout(timeout)
            .pool_max_idle_per_host(4)
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("payrail-webhooks/", env!("CARGO_PKG_VERSION")));
        if !allow_private {
            builder = builder.dns_resolver(Arc::new(GuardedResolver));
        }
        let client = match builder.build() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(error = %e, "webhooks: cannot build the HTTP client; deliveries will fail");
                None
            }
        };
        Transport {
            client,
            allow_private,
            timeout,
        }
    }

    /// POSTs `body` to `url` with `headers`. Never follows redirects; reads at most
    /// [`RESPONSE_BODY_MAX_BYTES`] of the answer; gives up after the timeout.
    pub async fn post(&self, url: &str, headers: &[(&'static str, String)], body: &str) -> Sent {
        let parsed = match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => u,
            _ => {
                return Sent::failed(
                    "invalid_url",
                    "the notify URL is not an absolute http(s) URL".into(),
                    true,
                )
            }
        };
        if !self.allow_private {
            let host = parsed.host_str().unwrap_or("");
            let literal = host.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = literal.parse::<IpAddr>() {
                if let Some(reason) = blocked_address_reason(ip) {
                    return Sent::failed(
                        "blocked_address",
                        format!("{ip} is {reason}; {HINT}"),
                        false,
                    );
                }
            }
        }
        let Some(client) = &self.client else {
            return Sent::failed(
                "request_failed",
                "the HTTP client is unavailable".into(),
                false,
            );
        };
        let mut req = client
            .post(parsed)
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let exchange = async {
            let mut resp = req.body(body.to_string()).send().await?;
            let status = resp.status().as_u16();
            let mut buf: Vec<u8> = Vec::new();
            // The status decides; the body is only for the log, so a failure reading it after a
            // 2xx does not undo the delivery.
            while buf.len() < RESPONSE_BODY_MAX_BYTES {
                match resp.chunk().await {
                    Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
                    Ok(None) | Err(_) => break,
                }
            }
            buf.truncate(RESPONSE_BODY_MAX_BYTES);
            Ok::<_, reqwest::Error>((status, buf))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => Sent::failed(
                "timeout",
                format!("no answer within {} ms", self.timeout.as_millis()),
                false,
            ),
            Ok(Err(e)) => classify(&e),
            Ok(Ok((status, buf))) => {
                let body = (!buf.is_empty()).then(|| String::from_utf8_lossy(&buf).into_owned());
                let failure = match status {
                    200..=299 => None,
                    300..=399 => Some(Failure {
                        class: "redirect_not_followed",
                        message: format!("HTTP {status}: redirects are not followed; use the final URL as notify_url"),
                        permanent: false,
                    }),
                    _ => Some(Failure {
                        class: "http_status",
                        message: format!("HTTP {status}"),
                        permanent: false,
                    }),
                };
                Sent {
                    status_code: Some(status),
                    body,
                    failure,
                }
            }
        }
    }
}

/// Maps a client error to a failure class, with the causes joined into one message.
fn classify(e: &reqwest::Error) -> Sent {
    let mut causes: Vec<String> = Vec::new();
    let mut blocked: Option<String> = None;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(b) = err.downcast_ref::<BlockedAddress>() {
            blocked = Some(b.to_string());
        }
        let text = err.to_string();
        if !causes.iter().any(|c| c.contains(&text)) {
            causes.push(text);
        }
        source = err.source();
    }
    if let Some(message) = blocked {
        return Sent::failed("blocked_address", message, false);
    }
    let message = causes.join(": ");
    let class = if e.is_timeout() {
        "timeout"
    } else if message.contains("dns error") {
        "dns_failed"
    } else if e.is_connect() {
        "connect_failed"
    } else {
        "request_failed"
    };
    Sent::failed(class, message, false)
}
