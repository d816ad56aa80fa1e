//! `payrail serve` and `payrail migrate`: configuration, bootstrap, the HTTP server, workers
//! and graceful shutdown.

use crate::config::{Config, LogFormat, Overrides};
use anyhow::{Context, Result};
use payrail_channels::{sandbox::Sandbox, Registry};
use payrail_domain::input::MerchantName;
use payrail_domain::{Clock, Secret, SystemClock};
use payrail_engine::crypto::MasterKey;
use payrail_engine::{Engine, EngineConfig};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A configuration problem (exit code 2).
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

pub fn load_config(o: &Overrides) -> Result<Config> {
    Config::load(o).map_err(|e| anyhow::Error::new(ConfigError(format!("{e:#}"))))
}

pub fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Reads the master key from the environment, or from `master.key` in the data folder,
/// generating that file on first start.
fn master_key(config: &Config) -> Result<MasterKey> {
    if let Some(k) = &config.master_key {
        return MasterKey::parse(k)
            .map_err(|e| anyhow::Error::new(ConfigError(format!("PAYRAIL_MASTER_KEY: {e}"))));
    }
    let path = config.data_dir.join("master.key");
    if !path.exists() {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create data folder {}", config.data_dir.display()))?;
        write_private(&path, MasterKey::generate_hex().expose())?;
        tracing::warn!(
            path = %path.display(),
            "generated a new master key in the data folder; set PAYRAIL_MASTER_KEY (and keep it out of the database backups) for production"
        );
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    MasterKey::parse(&Secret::new(text)).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Writes a file readable by the owner only.
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

pub fn registry(clock: Arc<dyn Clock>) -> Registry {
    let mut r = Registry::new();
    r.register(Arc::new(Sandbox::new(clock)));
    r
}

pub async fn build_engine(config: &Config) -> Result<Arc<Engine>> {
    let key = master_key(config)?;
    let store = payrail_store::open(&config.database_url)
        .await
        .with_context(|| {
            format!(
                "cannot open database {}",
                payrail_store::redact_url(&config.database_url)
            )
        })?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let engine = Arc::new(Engine::new(
        store,
        registry(clock.clone()),
        clock,
        key,
        config.engine.clone(),
    ));
    engine.check_master_key().await.map_err(|e| {
        anyhow::Error::new(ConfigError(match e {
            payrail_engine::EngineError::Internal(msg) => msg,
            other => other.to_string(),
        }))
    })?;
    let accounts = engine
        .reload_channel_accounts()
        .await
        .context("cannot load the channel accounts")?;
    tracing::info!(accounts, "channel accounts loaded");
    engine
        .reload_fee_plans()
        .await
        .context("cannot load the fee plans")?;
    Ok(engine)
}

pub async fn migrate(o: Overrides) -> Result<()> {
    let config = load_config(&o)?;
    init_logging(&config.log_level, config.log_format);
    payrail_store::open(&config.database_url)
        .await
        .with_context(|| {
            format!(
                "cannot migrate {}",
                payrail_store::redact_url(&config.database_url)
            )
        })?;
    println!(
        "database {} is up to date",
        payrail_store::redact_url(&config.database_url)
    );
    Ok(())
}

/// Name of the setting that records the demo merchant, so it is made once.
const DEMO_SETTING: &str = "demo_merchant_id";
pub const DEMO_CREDENTIALS_FILE: &str = "demo-credentials.json";

/// First start: the operator token and the demo merchant, each shown once.
async fn bootstrap(engine: &Engine, config: &Config, base_url: &str) -> Result<()> {
    match engine
        .ensure_operator_token(config.operator_token.as_ref())
        .await
    {
        Ok(Some(token)) if config.operator_token.is_none() && config.announce => {
            println!(
                "\n  Operator token (shown once; keep it safe):\n    {}\n",
                token.expose()
            );
        }
        Ok(_) => {}
        Err(e) => return Err(anyhow::Error::new(ConfigError(e.to_string()))),
    }
    if !config.demo_merchant || engine.store.get_setting(DEMO_SETTING).await?.is_some() {
        return Ok(());
    }
    let merchant = engine
        .create_merchant(MerchantName::parse("Demo Shop").map_err(|e| anyhow::anyhow!("{e}"))?)
        .await?;
    let won = engine
        .store
        .put_setting_if_absent(DEMO_SETTING, &merchant.id.to_string())
        .await?;
    if won != merchant.id.to_string() {
        return Ok(()); // another process made it first
    }
    let creds = engine
        .create_app(
            merchant.id,
            MerchantName::parse("Demo app").map_err(|e| anyhow::anyhow!("{e}"))?,
        )
        .await?;
    let file = serde_json::json!({
        "url": base_url,
        "merchant_id": merchant.id,
        "app_id": creds.app.id,
        "key_id": creds.app.key_id,
        "secret": creds.secret.expose(),
    });
    let path = config.data_dir.join(DEMO_CREDENTIALS_FILE);
    std::fs::create_dir_all(&config.data_dir)?;
    write_private(&path, &serde_json::to_string_pretty(&file)?)?;
    println!(
        "  Demo merchant {} is ready (sandbox channel). App credentials (shown once; also saved to {} for `payrail demo`):\n    key_id: {}\n    secret: {}\n",
        merchant.id,
        path.display(),
        creds.app.key_id,
        creds.secret.expose()
    );
    Ok(())
}

pub async fn serve(o: Overrides) -> Result<()> {
    let config = load_config(&o)?;
    init_logging(&config.log_level, config.log_format);
    let engine = build_engine(&config).await?;
    run_server(engine, &config, None).await
}

/// Runs until SIGINT/SIGTERM (or `stop` turns true). Used by `serve` and the in-process bench.
pub async fn run_server(
    engine: Arc<Engine>,
    config: &Config,
    stop: Option<watch::Receiver<bool>>,
) -> Result<()> {
    // Only the api role listens; a worker-only process must not hold the port.
    let listener = match config.api {
        true => Some(
            tokio::net::TcpListener::bind(config.listen)
                .await
                .map_err(|e| {
                    anyhow::Error::new(ConfigError(format!(
                        "cannot listen on {}: {e}",
                        config.listen
                    )))
                })?,
        ),
        false => None,
    };
    let addr = match &listener {
        Some(l) => l.local_addr()?,
        None => config.listen,
    };
    let base_url = format!("http://{addr}");
    bootstrap(&engine, config, &base_url).await?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(payrail_engine::worker::run_accounts_refresher(
        engine.clone(),
        shutdown_rx.clone(),
    ));
    if config.worker {
        tasks.spawn(payrail_engine::worker::run_sync_worker(
            engine.clone(),
            shutdown_rx.clone(),
        ));
        tasks.spawn(payrail_engine::worker::run_janitor(
            engine.clone(),
            shutdown_rx.clone(),
        ));
        tasks.spawn(payrail_engine::webhooks::run_webhook_dispatcher(
            engine.clone(),
            shutdown_rx.clone(),
        ));
        tasks.spawn(payrail_engine::webhooks::run_webhook_sender(
            engine.clone(),
            shutdown_rx.clone(),
        ));
        tasks.spawn(payrail_engine::worker::run_ledger_maintenance(
            engine.clone(),
            shutdown_rx.clone(),
        ));
        tasks.spawn(payrail_engine::worker::run_settlement_worker(
            engine.clone(),
            shutdown_rx.clone(),
        ));
    }
    if engine.config.webhook_allow_private_targets {
        tracing::warn!("webhooks may be sent to loopback and private addresses (webhook_allow_private_targets); for local development only");
    }
    tracing::info!(
        addr = %addr,
        database = engine.store.backend(),
        api = config.api,
        worker = config.worker,
        channels = ?engine.channels.names(),
        "payrail started"
    );
    let signal = wait_for_stop(stop);
    if let Some(listener) = listener {
        if config.announce {
            // Tests and scripts read this line to find the port.
            println!("payrail listening on {base_url}");
        }
        let mut rx = shutdown_rx.clone();
        let app = payrail_api::app(engine.clone());
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = rx.changed().await;
        });
        let shutdown_tx2 = shutdown_tx.clone();
        let feed_engine = engine.clone();
        tokio::spawn(async move {
            signal.await;
            tracing::info!("shutting down: no new requests, finishing the ones in flight");
            // Open event streams end now; graceful shutdown would otherwise wait for them.
            feed_engine.feed.close();
            let _ = shutdown_tx2.send(true);
        });
        server.await.context("HTTP server failed")?;
    } else {
        if config.announce {
            println!("payrail worker running (no API in this process)");
        }
        signal.await;
        let _ = shutdown_tx.send(true);
    }
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    if tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = config.shutdown_grace_ms,
            "workers did not stop in time; their leased jobs will be retried"
        );
    }
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_stop(stop: Option<watch::Receiver<bool>>) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    let external = async {
        match stop {
            Some(mut rx) => {
                while !*rx.borrow() {
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
        _ = external => {}
    }
}

/// Engine settings suitable for tests and the bench (short delays).
#[allow(dead_code)]
pub fn fast_engine_config() -> EngineConfig {
    EngineConfig {
        sync_first_delay_ms: 200,
        sync_max_delay_ms: 2_000,
        worker_poll_ms: 50,
        ..EngineConfig::default()
    }
}
