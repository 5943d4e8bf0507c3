//! `outpost-gateway`: the site box daemon and its operator commands.
//!
//! Every subcommand accepts `--config PATH` (or `OUTPOST_CONFIG`); with neither, the
//! embedded defaults apply, and `OUTPOST_<SECTION>__<KEY>` variables override any key.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use outpost_gateway::admin_client::{self, ClientError};
use outpost_gateway::auth;
use outpost_gateway::config::Config;
use outpost_gateway::export::{self, Format, Since};
use outpost_gateway::journal::{Journal, JournalError};
use outpost_ops::token::AdminToken;
use tokio_util::sync::CancellationToken;

/// Collects clock-in punches from local devices, keeps them safe on disk, and forwards them
/// to the relay.
#[derive(Parser)]
#[command(name = "outpost-gateway", version, about, propagate_version = true)]
struct Cli {
    /// Configuration file (TOML). Default: /etc/outpost/gateway.toml if it exists, else the
    /// embedded defaults.
    #[arg(long, global = true, env = "OUTPOST_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Print the running gateway's status (asks its admin API).
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Dump the journal as NDJSON or CSV (via the running gateway, or directly when stopped).
    Export {
        /// `ndjson` or `csv`.
        #[arg(long, default_value = "ndjson")]
        format: Format,
        /// Only records from this gateway_seq, or received at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<Since>,
    },
    /// Manage device credentials.
    Device {
        #[command(subcommand)]
        action: DeviceAction,
    },
    /// Recover the records of a journal that could not be opened and was set aside
    /// (`<data_dir>/journal.set-aside-<time>`) into the live journal. Stop the gateway first.
    Salvage {
        /// The set-aside journal directory (listed by `status` and in the log).
        path: PathBuf,
    },
    /// Validate the configuration and exit (0 valid, 2 invalid).
    CheckConfig,
}

#[derive(Subcommand)]
enum DeviceAction {
    /// Issue a token for a device; the token is printed once, as the last line.
    Add {
        /// The device id (as in its punches' device_id).
        id: String,
    },
    /// Revoke a device's token; its requests fail with 401 from then on.
    Revoke {
        /// The device id.
        id: String,
    },
    /// List devices that have tokens.
    List,
}

/// Where the Debian package installs the configuration.
const PACKAGED_CONFIG: &str = "/etc/outpost/gateway.toml";

fn main() -> ExitCode {
    let cli = Cli::parse();
    // No --config and no OUTPOST_CONFIG: a packaged box's file if there is one, so operator
    // commands find the service's data; otherwise the embedded defaults.
    let config = cli.config.clone().or_else(|| {
        let packaged = PathBuf::from(PACKAGED_CONFIG);
        packaged.exists().then_some(packaged)
    });
    let cfg = match outpost_ops::config::load_from_env::<Config>(config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outpost-gateway: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(cfg),
        Command::Status { json } => status(&cfg, json),
        Command::Export { format, since } => export_cmd(&cfg, format, since.unwrap_or_default()),
        Command::Device { action } => device(&cfg, action),
        Command::Salvage { path } => salvage(&cfg, &path),
        Command::CheckConfig => {
            match &config {
                Some(p) => println!("checked {}", p.display()),
                None => println!("no config file: checked the embedded defaults"),
            }
            println!(
                "configuration OK (gateway {} at site {}, data in {}, HTTP on {})",
                cfg.gateway.id,
                cfg.gateway.site,
                cfg.gateway.data_dir.display(),
                cfg.http.listen
            );
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outpost-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cfg: Config) -> anyhow::Result<()> {
    outpost_ops::logging::init(
        cfg.log.format,
        &cfg.log.level,
        outpost_gateway::config::DEFAULT_LOG_LEVEL,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            outpost_ops::signal::wait_for_signal().await;
            signals.cancel();
        });
        outpost_gateway::daemon::run(cfg, shutdown).await
    })
}

fn admin_token(cfg: &Config) -> anyhow::Result<String> {
    AdminToken::read(&cfg.admin_token_file()).with_context(|| {
        "cannot read the admin token (auth.admin_token_file); run this as the gateway's user, or point --config at its configuration".to_string()
    })
}

fn status(cfg: &Config, raw: bool) -> anyhow::Result<()> {
    let addr = admin_client::local_addr(cfg.http.listen);
    let token = admin_token(cfg)?;
    let (code, mut body) = admin_client::get(addr, "/v1/status", &token).with_context(|| {
        format!("cannot reach the gateway's admin API on {addr} (http.listen); is it running?")
    })?;
    let mut text = String::new();
    body.read_to_string(&mut text)
        .context("reading the status")?;
    if code != 200 {
        bail!("the gateway answered {code}: {}", text.trim());
    }
    if raw {
        println!("{text}");
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&text).context("the status is not JSON")?;
    let j = &v["journal"];
    println!(
        "outpost-gateway {} — gateway {} at site {}, up {} s",
        v["version"].as_str().unwrap_or("?"),
        v["gateway"]["id"].as_str().unwrap_or("?"),
        v["gateway"]["site"].as_str().unwrap_or("?"),
        v["uptime_s"]
    );
    println!("journal: {} records, {} bytes ({:.1}% of quota), oldest {} s old, next seq {}, acked through {}",
        j["records"], j["bytes"], j["quota_used"].as_f64().unwrap_or(0.0) * 100.0, j["oldest_age_s"], j["next_seq"], j["acked_through"]);
    println!(
        "dedup window: {} keys (max {}, {} s)",
        v["dedup_window"]["keys"], v["dedup_window"]["max_keys"], v["dedup_window"]["max_age_s"]
    );
    println!("uplink: {}", v["uplink"]["state"].as_str().unwrap_or("?"));
    println!(
        "clock: {} (synced: {})",
        v["clock"]["wall"].as_str().unwrap_or("?"),
        v["clock"]["synced"]
    );
    if let Some(ts) = v["adms"]["terminals"].as_array() {
        for t in ts {
            println!("adms terminal: {t}");
        }
    }
    Ok(())
}

fn export_cmd(cfg: &Config, format: Format, since: Since) -> anyhow::Result<()> {
    let addr = admin_client::local_addr(cfg.http.listen);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    // Prefer the running daemon: sled allows one process per database.
    let token = admin_token(cfg).ok();
    if let Some(token) = token {
        let fmt = match format {
            Format::Ndjson => "ndjson",
            Format::Csv => "csv",
        };
        let since_q = match since {
            Since::All => String::new(),
            Since::Seq(n) => format!("&since={n}"),
            Since::Time(ms) => format!("&since={}", outpost_protocol::json::format_time(ms, None)),
        };
        match admin_client::get(addr, &format!("/v1/export?format={fmt}{since_q}"), &token) {
            Ok((200, mut body)) => {
                eprintln!("exporting through the running gateway's admin API on {addr}");
                std::io::copy(&mut body, &mut out).context("writing the export")?;
                out.flush()?;
                return Ok(());
            }
            Ok((code, mut body)) => {
                let mut text = String::new();
                let _ = body.read_to_string(&mut text);
                bail!(
                    "the running gateway refused the export ({code}): {}",
                    text.trim()
                );
            }
            Err(ClientError::NotRunning(_)) => {}
            Err(e) => return Err(e).context("cannot reach the running gateway"),
        }
    }
    let dir = cfg.journal_dir();
    eprintln!(
        "the gateway is not running: reading the journal directly at {}",
        dir.display()
    );
    let journal = Journal::open(&dir, &cfg.journal)
        .with_context(|| format!("cannot open the journal at {}", dir.display()))?;
    out.write_all(export::header(format).as_bytes())?;
    let mut next = since.first_seq();
    loop {
        let page = journal.read_from(next, 1000, 1 << 20)?;
        let Some(last) = page.last() else { break };
        next = last.gateway_seq + 1;
        for r in page.iter().filter(|r| since.admits(r)) {
            out.write_all(export::line(format, &cfg.gateway.site, &cfg.gateway.id, r).as_bytes())?;
        }
    }
    out.flush()?;
    Ok(())
}

fn salvage(cfg: &Config, from: &std::path::Path) -> anyhow::Result<()> {
    let dir = cfg.journal_dir();
    let journal = match Journal::open(&dir, &cfg.journal) {
        Ok(j) => j,
        Err(JournalError::InUse { .. }) => bail!(
            "the gateway is running and holds the journal at {}: stop it first (sudo systemctl stop outpost-gateway), run salvage, then start it again",
            dir.display()
        ),
        Err(e) => return Err(e).context(format!("cannot open the live journal at {}", dir.display())),
    };
    eprintln!(
        "the gateway is not running: salvaging {} into the journal at {}",
        from.display(),
        dir.display()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt
        .block_on(outpost_gateway::journal::salvage(from, &journal))
        .with_context(|| format!("cannot salvage {}", from.display()))?;
    println!(
        "read {} records ({} unreadable): {} stored again, {} already there, {} refused (journal full)",
        report.read, report.unreadable, report.accepted, report.duplicates, report.rejected
    );
    match &report.renamed_to {
        Some(p) => println!("done; the set-aside journal is kept as {}", p.display()),
        None => println!("some records were refused: free room in the journal (or let the uplink drain it) and run salvage again"),
    }
    Ok(())
}

fn device(cfg: &Config, action: DeviceAction) -> anyhow::Result<()> {
    let path = cfg.devices_file();
    match action {
        DeviceAction::Add { id } => {
            let token = auth::add_device(&path, &id)?;
            eprintln!(
                "device {id} added to {}; a running gateway picks it up within seconds.",
                path.display()
            );
            eprintln!("This token is shown once. Configure the device to send `Authorization: Bearer <token>`:");
            println!("{token}");
        }
        DeviceAction::Revoke { id } => {
            auth::revoke_device(&path, &id)?;
            eprintln!("device {id} revoked in {}", path.display());
        }
        DeviceAction::List => {
            for e in auth::DeviceTable::load(&path)?.entries() {
                println!("{}\tadded {}", e.device_id, e.added);
            }
        }
    }
    Ok(())
}
