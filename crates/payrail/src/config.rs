//! Configuration: defaults, then an optional TOML file, then `PAYRAIL_*` environment variables,
//! then command-line flags; validated once at start. A bad value stops the process with a
//! message naming the setting.

use anyhow::{bail, Context, Result};
use payrail_domain::Secret;
use payrail_engine::EngineConfig;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Settings as they may appear in the file (all optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub data_dir: Option<String>,
    pub database_url: Option<String>,
    pub roles: Option<String>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    pub channel_timeout_ms: Option<u64>,
    pub sync_first_delay_ms: Option<i64>,
    pub sync_max_delay_ms: Option<i64>,
    pub sync_lease_ms: Option<i64>,
    pub worker_poll_ms: Option<u64>,
    pub channel_concurrency_max: Option<usize>,
    pub public_url: Option<String>,
    pub channel_queue_ms: Option<u64>,
    pub shutdown_grace_ms: Option<u64>,
    pub demo_merchant: Option<bool>,
    pub webhook_timeout_ms: Option<u64>,
    pub webhook_allow_private_targets: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub api: bool,
    pub worker: bool,
    pub log_level: String,
    pub log_format: LogFormat,
    pub engine: EngineConfig,
    pub shutdown_grace_ms: u64,
    pub demo_merchant: bool,
    pub master_key: Option<Secret<String>>,
    pub operator_token: Option<Secret<String>>,
    /// Print the listening address on stdout (off for the in-process bench).
    pub announce: bool,
}

/// Every environment variable the server reads; any other `PAYRAIL_*` draws a warning.
pub const ENV_VARS: &[&str] = &[
    "PAYRAIL_CONFIG",
    "PAYRAIL_LISTEN",
    "PAYRAIL_DATA_DIR",
    "PAYRAIL_DATABASE_URL",
    "PAYRAIL_CHANNEL_CONCURRENCY_MAX",
    "PAYRAIL_PUBLIC_URL",
    "PAYRAIL_CHANNEL_QUEUE_MS",
    "PAYRAIL_ROLES",
    "PAYRAIL_LOG",
    "PAYRAIL_LOG_FORMAT",
    "PAYRAIL_CHANNEL_TIMEOUT_MS",
    "PAYRAIL_SYNC_FIRST_DELAY_MS",
    "PAYRAIL_SYNC_MAX_DELAY_MS",
    "PAYRAIL_SYNC_LEASE_MS",
    "PAYRAIL_WORKER_POLL_MS",
    "PAYRAIL_SHUTDOWN_GRACE_MS",
    "PAYRAIL_DEMO_MERCHANT",
    "PAYRAIL_WEBHOOK_TIMEOUT_MS",
    "PAYRAIL_WEBHOOK_ALLOW_PRIVATE_TARGETS",
    "PAYRAIL_MASTER_KEY",
    "PAYRAIL_OPERATOR_TOKEN",
    // Read by `payrail demo`, not the server.
    "PAYRAIL_DEMO_SECRET",
];

/// Command-line overrides.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub listen: Option<String>,
    pub data_dir: Option<String>,
    pub database_url: Option<String>,
    pub roles: Option<String>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn parse_num<T: std::str::FromStr>(name: &str, v: Option<String>) -> Result<Option<T>> {
    v.map(|s| {
        s.parse::<T>()
            .map_err(|_| anyhow::anyhow!("{name}={s:?} is not a valid number"))
    })
    .transpose()
}

fn parse_bool(name: &str, v: Option<String>) -> Result<Option<bool>> {
    v.map(|s| match s.as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => bail!("{name}={s:?} must be true or false"),
    })
    .transpose()
}

impl Config {
    pub fn load(o: &Overrides) -> Result<Config> {
        let path = o
            .config
            .clone()
            .or_else(|| env("PAYRAIL_CONFIG").map(PathBuf::from));
        let file = match &path {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let listen = o
            .listen
            .clone()
            .or_else(|| env("PAYRAIL_LISTEN"))
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:8080".into());
        let listen: SocketAddr = listen.parse().with_context(|| {
            format!("listen address {listen:?} is not IP:PORT (for example 127.0.0.1:8080)")
        })?;
        let data_dir = PathBuf::from(
            o.data_dir
                .clone()
                .or_else(|| env("PAYRAIL_DATA_DIR"))
                .or(file.data_dir)
                .unwrap_or_else(|| "./payrail-data".into()),
        );
        let database_url = o
            .database_url
            .clone()
            .or_else(|| env("PAYRAIL_DATABASE_URL"))
            .or(file.database_url)
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("payrail.db").display()));
        if !(database_url.starts_with("sqlite://")
            || database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://"))
        {
            bail!(
                "database URL must start with sqlite:// or postgres:// (got {})",
                payrail_store::redact_url(&database_url)
            );
        }
        let roles = o
            .roles
            .clone()
            .or_else(|| env("PAYRAIL_ROLES"))
            .or(file.roles)
            .unwrap_or_else(|| "api,worker".into());
        let (mut api, mut worker) = (false, false);
        for r in roles.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            match r {
                "api" => api = true,
                "worker" => worker = true,
                other => bail!("unknown role {other:?} in roles; use api, worker or api,worker"),
            }
        }
        if !api && !worker {
            bail!("roles must name at least one of api, worker");
        }
        let log_format = match env("PAYRAIL_LOG_FORMAT").or(file.log_format).as_deref() {
            Some("json") => LogFormat::Json,
            Some("text") => LogFormat::Text,
            None => {
                use std::io::IsTerminal;
                if std::io::stderr().is_terminal() {
                    LogFormat::Text
                } else {
                    LogFormat::Json
                }
            }
            Some(other) => bail!("log format {other:?} must be json or text"),
        };
        let mut engine = EngineConfig::default();
        if let Some(v) = parse_num(
            "PAYRAIL_CHANNEL_TIMEOUT_MS",
            env("PAYRAIL_CHANNEL_TIMEOUT_MS"),
        )?
        .or(file.channel_timeout_ms)
        {
            engine.channel_timeout_ms = v;
        }
        if let Some(v) = parse_num(
            "PAYRAIL_SYNC_FIRST_DELAY_MS",
            env("PAYRAIL_SYNC_FIRST_DELAY_MS"),
        )?
        .or(file.sync_first_delay_ms)
        {
            engine.sync_first_delay_ms = v;
        }
        if let Some(v) = parse_num(
            "PAYRAIL_SYNC_MAX_DELAY_MS",
            env("PAYRAIL_SYNC_MAX_DELAY_MS"),
        )?
        .or(file.sync_max_delay_ms)
        {
            engine.sync_max_delay_ms = v;
        }
        if let Some(v) =
            parse_num("PAYRAIL_SYNC_LEASE_MS", env("PAYRAIL_SYNC_LEASE_MS"))?.or(file.sync_lease_ms)
        {
            engine.sync_lease_ms = v;
        }
        if let Some(v) = parse_num("PAYRAIL_WORKER_POLL_MS", env("PAYRAIL_WORKER_POLL_MS"))?
            .or(file.worker_poll_ms)
        {
            engine.worker_poll_ms = v;
        }
        if let Some(v) = parse_num(
            "PAYRAIL_CHANNEL_CONCURRENCY_MAX",
            env("PAYRAIL_CHANNEL_CONCURRENCY_MAX"),
        )?
        .or(file.channel_concurrency_max)
        {
            engine.channel_concurrency_max = v;
        }
        if let Some(v) = parse_num("PAYRAIL_CHANNEL_QUEUE_MS", env("PAYRAIL_CHANNEL_QUEUE_MS"))?
            .or(file.channel_queue_ms)
        {
            engine.channel_queue_ms = v;
        }
        let public_url = env("PAYRAIL_PUBLIC_URL")
            .or(file.public_url.clone())
            .unwrap_or_else(|| format!("http://{listen}"));
        let public_url = public_url.trim_end_matches('/').to_string();
        if !(public_url.starts_with("http://") || public_url.starts_with("https://"))
            || public_url.len() > 200
            || public_url
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            bail!("public_url must be an http:// or https:// URL of at most 200 characters (where channels reach this server)");
        }
        engine.public_url = public_url;
        if !(1..=100_000).contains(&engine.channel_concurrency_max) {
            bail!("channel_concurrency_max must be between 1 and 100000");
        }
        if engine.channel_queue_ms > 60_000 {
            bail!("channel_queue_ms must be at most 60000");
        }
        if !(50..=120_000).contains(&engine.channel_timeout_ms) {
            bail!("channel_timeout_ms must be between 50 and 120000");
        }
        if !(10..=3_600_000).contains(&engine.sync_first_delay_ms)
            || engine.sync_max_delay_ms < engine.sync_first_delay_ms
        {
            bail!("sync_first_delay_ms must be 10..3600000 and not above sync_max_delay_ms");
        }
        // A lease must outlast the job it covers (one channel call), or two workers could run it.
        let lease_min_ms = i64::try_from(engine.channel_timeout_ms)
            .unwrap_or(i64::MAX)
            .saturating_mul(2);
        if engine.sync_lease_ms < lease_min_ms || engine.sync_lease_ms > 3_600_000 {
            bail!("sync_lease_ms must be at least twice channel_timeout_ms ({lease_min_ms}) and at most 3600000");
        }
        if let Some(v) = parse_num(
            "PAYRAIL_WEBHOOK_TIMEOUT_MS",
            env("PAYRAIL_WEBHOOK_TIMEOUT_MS"),
        )?
        .or(file.webhook_timeout_ms)
        {
            engine.webhook_timeout_ms = v;
        }
        if !(100..=30_000).contains(&engine.webhook_timeout_ms) {
            bail!("webhook_timeout_ms must be between 100 and 30000");
        }
        if let Some(v) = parse_bool(
            "PAYRAIL_WEBHOOK_ALLOW_PRIVATE_TARGETS",
            env("PAYRAIL_WEBHOOK_ALLOW_PRIVATE_TARGETS"),
        )?
        .or(file.webhook_allow_private_targets)
        {
            engine.webhook_allow_private_targets = v;
        }
        if !(10..=60_000).contains(&engine.worker_poll_ms) {
            bail!("worker_poll_ms must be between 10 and 60000");
        }
        let shutdown_grace_ms = parse_num(
            "PAYRAIL_SHUTDOWN_GRACE_MS",
            env("PAYRAIL_SHUTDOWN_GRACE_MS"),
        )?
        .or(file.shutdown_grace_ms)
        .unwrap_or(10_000);
        let demo_merchant = parse_bool("PAYRAIL_DEMO_MERCHANT", env("PAYRAIL_DEMO_MERCHANT"))?
            .or(file.demo_merchant)
            .unwrap_or(database_url.starts_with("sqlite://"));
        for (k, _) in std::env::vars() {
            if k.starts_with("PAYRAIL_")
                && !k.starts_with("PAYRAIL_TEST_")
                && !ENV_VARS.contains(&k.as_str())
            {
                eprintln!("warning: unknown environment variable {k} is ignored");
            }
        }
        Ok(Config {
            listen,
            data_dir,
            database_url,
            api,
            worker,
            log_level: env("PAYRAIL_LOG")
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
            log_format,
            engine,
            shutdown_grace_ms,
            demo_merchant,
            master_key: env("PAYRAIL_MASTER_KEY").map(Secret::new),
            operator_token: env("PAYRAIL_OPERATOR_TOKEN").map(Secret::new),
            announce: true,
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_rejects_unknown_keys() {
        let e = toml::from_str::<FileConfig>("listn = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
        let ok: FileConfig =
            toml::from_str("listen = \"127.0.0.1:9\"\nchannel_timeout_ms = 500").unwrap();
        assert_eq!(ok.channel_timeout_ms, Some(500));
        let hooks: FileConfig =
            toml::from_str("webhook_timeout_ms = 3000\nwebhook_allow_private_targets = true")
                .unwrap();
        assert_eq!(hooks.webhook_timeout_ms, Some(3000));
        assert_eq!(hooks.webhook_allow_private_targets, Some(true));
    }
}
