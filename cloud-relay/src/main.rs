//! `outpost-relay`: the fleet's intake server and its operator commands.
//!
//! ```text
//! outpost-relay [run] [--config PATH]          serve until SIGTERM/SIGINT
//! outpost-relay gateway add ID --site SITE     issue a gateway token (printed as the last line)
//! outpost-relay gateway revoke ID              revoke it (the running relay notices)
//! outpost-relay gateway list                   list registered gateways
//! outpost-relay check-config                   validate the configuration and exit
//! ```
//!
//! `--config` (or `OUTPOST_CONFIG`) names the TOML file; without it the embedded defaults
//! apply. Every key can be overridden with `OUTPOST_SECTION__KEY`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outpost_relay::auth;
use outpost_relay::config::{Config, LogFormat, StoreKind};

/// Receives batches from Outpost gateways and stores every punch exactly once.
#[derive(Parser)]
#[command(name = "outpost-relay", version, about)]
struct Cli {
    /// The TOML configuration file (every key documented in config/relay.toml).
    #[arg(long, global = true, env = "OUTPOST_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve until SIGTERM or SIGINT (the default).
    Run,
    /// Manage gateway credentials.
    Gateway {
        #[command(subcommand)]
        command: GatewayCommand,
    },
    /// Validate the configuration (keys, TLS files, store URL) and exit.
    CheckConfig,
}

#[derive(Subcommand)]
enum GatewayCommand {
    /// Issue a token for a new gateway; the token is printed once, as the last line.
    Add {
        /// The gateway id (its `gateway.id`).
        id: String,
        /// The site it serves (its `gateway.site`).
        #[arg(long)]
        site: String,
    },
    /// Revoke a gateway's token.
    Revoke {
        /// The gateway id.
        id: String,
    },
    /// List registered gateways (ids and sites, never tokens).
    List,
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

fn check_config(cfg: &Config) -> anyhow::Result<()> {
    outpost_relay::server::install_crypto_provider();
    if let (false, Some(cert), Some(key)) =
        (cfg.tls.disabled, &cfg.tls.cert_file, &cfg.tls.key_file)
    {
        outpost_relay::server::tls_acceptor(cert, key)?;
    }
    if cfg.store.kind == StoreKind::Postgres {
        cfg.store_url()?;
    }
    if let Some(f) = &cfg.auth.gateways_file {
        auth::Gateways::load(f).context("auth.gateways_file")?;
    } else {
        auth::Gateways::load(&cfg.gateways_file()).context("auth.gateways_file")?;
    }
    println!(
        "configuration OK: listen {} ({}), store {:?}, data_dir {}",
        cfg.relay.listen,
        if cfg.tls.disabled {
            "plain HTTP"
        } else {
            "TLS"
        },
        cfg.store.kind,
        cfg.relay.data_dir.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::load_from_env(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outpost-relay: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            init_logging(&cfg);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("start the tokio runtime")
                .and_then(|rt| rt.block_on(outpost_relay::server::run(cfg)))
        }
        Command::CheckConfig => check_config(&cfg),
        Command::Gateway { command } => {
            let file = cfg.gateways_file();
            match command {
                GatewayCommand::Add { id, site } => {
                    auth::add_gateway(&file, &id, &site).map(|token| {
                        println!("gateway {id} (site {site}) added to {}.", file.display());
                        println!("Put this token in the gateway's uplink.token_file; it is shown only once:");
                        println!("{token}");
                    })
                }
                GatewayCommand::Revoke { id } => auth::revoke_gateway(&file, &id).map(|()| {
                    println!("gateway {id} revoked; a running relay refuses it within auth.reload_interval_ms");
                }),
                GatewayCommand::List => auth::Gateways::load(&file).map(|g| {
                    for c in g.list() {
                        println!("{}\t{}\t{}", c.gateway_id, c.site_id, c.added_ms);
                    }
                }),
            }
            .map_err(anyhow::Error::from)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outpost-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}
