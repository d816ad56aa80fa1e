//! `payrail emulate <wechatpay|alipay|unionpay>`: one channel emulator on loopback, for demos and
//! manual testing. Keys are loaded from (or generated into) a folder, and what a channel account
//! needs to use the emulator is printed at start.

use anyhow::{bail, Context, Result};
use payrail_emulator::{spawn, ChannelKind, EmulatorConfig};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Clone)]
pub struct EmulateArgs {
    /// The channel to emulate: wechatpay, alipay or unionpay.
    channel: String,
    /// Port on 127.0.0.1 (default: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Folder with channel-private.pem and merchant-public.pem; missing keys are generated
    /// there (with merchant-private.pem for the channel account).
    #[arg(long, default_value = "payrail-emulator-keys")]
    keys_dir: PathBuf,
}

/// Reads `<dir>/<name>-private.pem` and `-public.pem`, generating and saving both if absent.
fn key_pair(dir: &Path, name: &str) -> Result<(PathBuf, String)> {
    let private = dir.join(format!("{name}-private.pem"));
    let public = dir.join(format!("{name}-public.pem"));
    if !private.exists() || !public.exists() {
        eprintln!("generating an RSA-2048 key pair for the {name} (a few seconds)…");
        let (priv_pem, pub_pem) = payrail_emulator::crypto::generate_key_pair()
            .map_err(anyhow::Error::msg)
            .context("cannot generate a key pair")?;
        write_private(&private, &priv_pem)?;
        std::fs::write(&public, pub_pem)
            .with_context(|| format!("cannot write {}", public.display()))?;
    }
    let pem = std::fs::read_to_string(&public)
        .with_context(|| format!("cannot read {}", public.display()))?;
    Ok((private, pem))
}

fn write_private(path: &Path, pem: &str) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(pem.as_bytes())?;
    Ok(())
}

pub async fn run(args: EmulateArgs) -> Result<()> {
    let Some(kind) = ChannelKind::parse(&args.channel) else {
        bail!(crate::serve::ConfigError(format!(
            "unknown channel {:?}; use wechatpay, alipay or unionpay",
            args.channel
        )));
    };
    let dir = args.keys_dir.join(&args.channel);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (channel_private, _) = key_pair(&dir, "channel")?;
    let (merchant_private, merchant_public_pem) = key_pair(&dir, "merchant")?;
    let mut cfg = EmulatorConfig::for_tests(kind);
    cfg.listen = SocketAddr::from(([127, 0, 0, 1], args.port));
    cfg.channel_private_key_pem = std::fs::read_to_string(&channel_private)
        .with_context(|| format!("cannot read {}", channel_private.display()))?;
    cfg.merchant_public_key_pem = merchant_public_pem;
    let emu = std::sync::Arc::new(spawn(cfg).await.context("cannot start the emulator")?);
    let public = dir.join("channel-public.pem");
    let c = &emu.config;
    println!("{} emulator listening on {}", args.channel, emu.base_url);
    println!("channel account settings (the same connector code as for the real endpoint):");
    match kind {
        ChannelKind::WechatPay => {
            println!("  base_url             = {}", emu.base_url);
            println!("  mchid                = {}", c.merchant_id);
            println!("  appid                = {}", c.app_id);
            println!("  merchant_serial_no   = any (not checked by the emulator)");
            println!("  merchant_private_key = {}", merchant_private.display());
            println!("  api_v3_key           = {}", c.api_v3_key);
            println!("  platform_public_key  = {}", public.display());
            println!("  platform_serial      = {}", c.platform_serial);
        }
        ChannelKind::Alipay => {
            println!("  gateway_url          = {}/gateway.do", emu.base_url);
            println!("  app_id               = {}", c.merchant_id);
            println!("  seller_id            = {}", c.app_id);
            println!("  app_private_key      = {}", merchant_private.display());
            println!("  alipay_public_key    = {}", public.display());
        }
        ChannelKind::UnionPay => {
            println!("  base_url             = {}", emu.base_url);
            println!("  mer_id               = {}", c.merchant_id);
            println!("  cert_id              = any (not checked by the emulator)");
            println!("  signing_key          = {}", merchant_private.display());
            println!("  unionpay_public_key  = {}", public.display());
        }
    }
    // The body of `POST /v1/operator/channel-accounts` for this emulator, keys inlined.
    let read = |p: &Path| {
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
    };
    let channel_public = read(&public)?;
    let merchant_key = read(&merchant_private)?;
    let body = match kind {
        ChannelKind::WechatPay => serde_json::json!({
            "channel": "wechatpay", "name": "WeChat Pay emulator",
            "config": {"base_url": emu.base_url, "mchid": c.merchant_id, "appid": c.app_id,
                "merchant_serial_no": "EMULATOR", "platform_public_key": channel_public,
                "platform_serial": c.platform_serial},
            "secrets": {"merchant_private_key": merchant_key, "api_v3_key": c.api_v3_key}
        }),
        ChannelKind::Alipay => serde_json::json!({
            "channel": "alipay", "name": "Alipay emulator",
            "config": {"gateway_url": format!("{}/gateway.do", emu.base_url), "app_id": c.merchant_id,
                "seller_id": c.app_id, "alipay_public_key": channel_public},
            "secrets": {"app_private_key": merchant_key}
        }),
        ChannelKind::UnionPay => serde_json::json!({
            "channel": "unionpay", "name": "UnionPay emulator",
            "config": {"base_url": emu.base_url, "mer_id": c.merchant_id, "cert_id": "EMULATOR",
                "unionpay_public_key": channel_public},
            "secrets": {"signing_key": merchant_key}
        }),
    };
    let account_file = dir.join("channel-account.json");
    let _ = std::fs::remove_file(&account_file);
    write_private(&account_file, &body.to_string())?;
    println!(
        "channel account request body (with the merchant key; keep it private): {}",
        account_file.display()
    );
    println!("admin: POST /__admin/script, /__admin/scan, /__admin/clock/advance, /__admin/bill-fault; GET /__admin/clock, /__admin/orders/{{no}}, /__admin/deliveries");
    // The emulator's clock follows the wall clock (notifications carry current timestamps and
    // retries come on the channel's real schedule); /__admin/clock/advance still jumps ahead.
    let ticker = {
        let emu = emu.clone();
        tokio::spawn(async move {
            let mut last = std::time::Instant::now();
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(1_000)).await;
                let now = std::time::Instant::now();
                let ms = i64::try_from(now.duration_since(last).as_millis()).unwrap_or(0);
                last = now;
                emu.advance(ms).await;
            }
        })
    };
    tokio::signal::ctrl_c()
        .await
        .context("cannot wait for Ctrl-C")?;
    ticker.abort();
    Ok(())
}
