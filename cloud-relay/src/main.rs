//! `outpost-relay`: the fleet's intake server and its operator commands.
//!
//! ```text
//! outpost-relay [run] [--config PATH]          serve until SIGTERM/SIGINT
//! outpost-relay gateway add ID --site SITE     issue a gateway token (printed as the last line)
//! outpost-relay gateway add ID --site SITE --cert FILE
//!                                              register a client certificate instead (mTLS)
//! outpost-relay gateway revoke ID              revoke it (the running relay notices)
//! outpost-relay gateway list                   list registered gateways
//! outpost-relay reader add NAME                issue a read token for the query API (every site)
//! outpost-relay reader add NAME --site SITE [--site SITE]...
//!                                              a read token that sees only these sites
//! outpost-relay reader revoke NAME             revoke it
//! outpost-relay reader list                    list read tokens: name, added (Unix ms),
//!                                              sites (`*` = every site); never tokens
//! outpost-relay outputs [--json]               the outputs' state, from the running relay
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
use outpost_relay::auth::readers;
use outpost_relay::config::{Config, StoreKind};

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
    /// Manage read tokens for the query API (payroll, reporting).
    Reader {
        #[command(subcommand)]
        command: ReaderCommand,
    },
    /// Show each output's state, cursor, lag, last success and error, from the running
    /// relay's API (at relay.listen, with the admin token).
    Outputs {
        /// Print the raw JSON of GET /v1/outputs.
        #[arg(long)]
        json: bool,
    },
    /// Validate the configuration (keys, TLS files, store URL) and exit.
    CheckConfig,
}

#[derive(Subcommand)]
enum ReaderCommand {
    /// Issue a read token; it is printed once, as the last line.
    Add {
        /// Who will hold it (for your records), e.g. `payroll`.
        name: String,
        /// Let it read only this site (repeat for several); without it, every site.
        #[arg(long = "site", value_name = "SITE")]
        sites: Vec<String>,
    },
    /// Revoke a read token.
    Revoke {
        /// The name given to `reader add`.
        name: String,
    },
    /// List read tokens (names, dates and sites, never tokens).
    List,
}

#[derive(Subcommand)]
enum GatewayCommand {
    /// Register a gateway: issue its token (printed once, as the last line), or with
    /// `--cert` register its client certificate.
    Add {
        /// The gateway id (its `gateway.id`).
        id: String,
        /// The site it serves (its `gateway.site`).
        #[arg(long)]
        site: String,
        /// Register this PEM client certificate (issued by the CA in `tls.client_ca_file`)
        /// instead of issuing a token.
        #[arg(long, value_name = "FILE")]
        cert: Option<PathBuf>,
    },
    /// Revoke a gateway's token.
    Revoke {
        /// The gateway id.
        id: String,
    },
    /// List registered gateways (ids and sites, never tokens).
    List,
}

fn check_config(cfg: &Config) -> anyhow::Result<()> {
    outpost_relay::server::install_crypto_provider();
    if let (false, Some(cert), Some(key)) =
        (cfg.tls.disabled, &cfg.tls.cert_file, &cfg.tls.key_file)
    {
        outpost_relay::server::tls_acceptor(cert, key, cfg.tls.client_ca_file.as_deref())?;
    }
    readers::Readers::load(&cfg.readers_file()).context("auth.readers_file")?;
    if cfg.store.kind == StoreKind::Postgres {
        let url = cfg.store_url()?;
        let tls = outpost_relay::store::postgres::PgTls {
            mode: cfg.store.tls,
            ca_file: cfg.store.ca_file.clone(),
        };
        outpost_relay::store::postgres::PgStore::check_tls(&url, &tls)?;
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

/// `outpost-relay outputs`: `GET /v1/outputs` from the running relay, as a table.
fn outputs(cfg: &Config, json: bool) -> anyhow::Result<()> {
    outpost_relay::server::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let (status, body) = rt.block_on(outpost_relay::admin_client::get(cfg, "/v1/outputs"))?;
    if status != 200 {
        anyhow::bail!("the relay answered {status}: {}", body.trim());
    }
    if json {
        println!("{body}");
        return Ok(());
    }
    let v: serde_json::Value =
        serde_json::from_str(&body).context("the relay's answer is not JSON")?;
    print!("{}", outpost_relay::outputs::table::render(&v));
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match outpost_ops::config::load_from_env::<Config>(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outpost-relay: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            outpost_ops::logging::init(
                cfg.log.format,
                &cfg.log.level,
                outpost_relay::config::DEFAULT_LOG_LEVEL,
            );
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("start the tokio runtime")
                .and_then(|rt| rt.block_on(outpost_relay::server::run(cfg)))
        }
        Command::CheckConfig => check_config(&cfg),
        Command::Outputs { json } => outputs(&cfg, json),
        Command::Gateway { command } => {
            let file = cfg.gateways_file();
            match command {
                GatewayCommand::Add {
                    id,
                    site,
                    cert: Some(cert),
                } => auth::cert_file_fingerprint(&cert)
                    .and_then(|fp| auth::add_gateway_cert(&file, &id, &site, fp).map(|()| fp))
                    .map(|fp| {
                        println!(
                            "gateway {id} (site {site}) added to {} with client certificate sha256 {}.",
                            file.display(),
                            hex::encode(fp)
                        );
                        println!("No token was issued: the gateway authenticates with this certificate (uplink.client_cert_file).");
                        if cfg.tls.client_ca_file.is_none() {
                            println!("Note: tls.client_ca_file is not set, so the relay does not ask for client certificates yet.");
                        }
                    }),
                GatewayCommand::Add {
                    id,
                    site,
                    cert: None,
                } => auth::add_gateway(&file, &id, &site).map(|token| {
                    println!("gateway {id} (site {site}) added to {}.", file.display());
                    println!("Put this token in the gateway's uplink.token_file; it is shown only once:");
                    println!("{token}");
                }),
                GatewayCommand::Revoke { id } => auth::revoke_gateway(&file, &id).map(|()| {
                    println!("gateway {id} revoked; a running relay refuses it within auth.reload_interval_ms");
                }),
                GatewayCommand::List => auth::Gateways::load(&file).map(|g| {
                    for c in g.list() {
                        let how = match (c.token_hash.is_some(), c.cert_sha256) {
                            (_, Some(fp)) => format!("cert:{}", hex::encode(fp)),
                            _ => "token".to_string(),
                        };
                        println!("{}\t{}\t{}\t{how}", c.gateway_id, c.site_id, c.added_ms);
                    }
                }),
            }
            .map_err(anyhow::Error::from)
        }
        Command::Reader { command } => {
            let file = cfg.readers_file();
            match command {
                ReaderCommand::Add { name, mut sites } => {
                    sites.sort();
                    sites.dedup();
                    readers::add_reader(&file, &name, &sites).map(|token| {
                        let which = if sites.is_empty() {
                            "every site".to_string()
                        } else {
                            format!("sites {} only", sites.join(", "))
                        };
                        println!("reader {name} ({which}) added to {}.", file.display());
                        println!("This token reads the query API (/v1/punches, /v1/punches.csv, /v1/gateways, /v1/conflicts, /v1/rejected) for {which}; it is shown only once:");
                        println!("{token}");
                    })
                }
                ReaderCommand::Revoke { name } => readers::revoke_reader(&file, &name).map(|()| {
                    println!("reader {name} revoked; a running relay refuses it within auth.reload_interval_ms");
                }),
                ReaderCommand::List => readers::Readers::load(&file).map(|r| {
                    for x in r.list() {
                        println!("{}\t{}\t{}", x.name, x.added_ms, x.scope.describe());
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
