//! The `historian` binary: `serve` runs the server, `import` bulk-loads line protocol,
//! `query` runs SQL against a running server.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

// glibc malloc keeps freed flush and request buffers in per-thread arenas; RSS then
// grows far past what is in use. mimalloc returns memory to the OS.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin;
mod audit;
mod auth;
mod background;
mod client;
mod config;
mod flight;
mod http;
mod import;
mod keys;
mod pg;
mod placeholder;
mod query_client;
mod role;
mod server;
mod session;
mod state_file;
mod subject;
mod token;

/// Historian: a time-series historian for factories.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the server.
    Serve(ServeArgs),
    /// Loads `.lp` / `.lp.gz` files into a running server.
    Import(import::ImportArgs),
    /// Runs one SQL query against a running server and prints the result.
    Query(query_client::QueryArgs),
    /// Manages the keyring of pseudonyms and data keys.
    Keys(keys::KeysArgs),
    /// Data-subject requests against a running server: export, erase, inventory.
    Subject(subject::SubjectArgs),
    /// Creates, lists and revokes API tokens.
    Token(admin::TokenArgs),
    /// Checks the audit trail.
    Audit(AuditArgs),
}

#[derive(Debug, clap::Args)]
struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Verifies the hash chain: finds changed, removed, reordered or truncated records and
    /// a rewritten chain. Exits non-zero if anything is wrong.
    Verify {
        /// Configuration file (for the lake and the data directory).
        #[arg(long, env = "HISTORIAN_CONFIG")]
        config: Option<PathBuf>,
        /// Data directory.
        #[arg(long, env = "HISTORIAN_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Configuration file (TOML); without it the embedded defaults apply.
    #[arg(long, env = "HISTORIAN_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory: the WAL, and the lake unless `storage.lake` says otherwise.
    #[arg(long, env = "HISTORIAN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// HTTP listen address, e.g. 127.0.0.1:8181 (port 0 picks a free one).
    #[arg(long, env = "HISTORIAN_HTTP_BIND")]
    http_bind: Option<String>,
    /// PostgreSQL wire protocol listen address, e.g. 127.0.0.1:5432 (port 0 picks a free
    /// one); off unless given here or in the config.
    #[arg(long, env = "HISTORIAN_PG_BIND")]
    pg_bind: Option<String>,
    /// No authentication: every caller is an anonymous admin. For local experiments only;
    /// refused unless the server listens on a loopback address.
    #[arg(long)]
    without_auth: bool,
}

fn init_tracing(format: &str, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result: Result<(), Box<dyn std::error::Error>> = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => {
                let mut config = match &args.config {
                    Some(path) => config::Config::load(path)?,
                    None => config::Config::default(),
                };
                if let Some(d) = args.data_dir {
                    config.server.data_dir = d;
                }
                if let Some(b) = args.http_bind {
                    config.server.http_bind = b;
                }
                if let Some(b) = args.pg_bind {
                    config.server.pg_bind = Some(b);
                }
                init_tracing(&config.log.format, &config.log.level);
                server::serve(config, args.without_auth).await
            }
            Command::Import(args) => {
                init_tracing("text", "warn");
                import::run(args).await
            }
            Command::Query(args) => {
                init_tracing("text", "warn");
                query_client::run(args).await
            }
            Command::Keys(args) => {
                init_tracing("text", "warn");
                keys::run(args)
            }
            Command::Subject(args) => {
                init_tracing("text", "warn");
                subject::run(args).await
            }
            Command::Token(args) => {
                init_tracing("text", "warn");
                admin::run_token(args).await
            }
            Command::Audit(AuditArgs {
                command: AuditCommand::Verify { config, data_dir },
            }) => {
                init_tracing("text", "warn");
                let mut config = match &config {
                    Some(path) => config::Config::load(path)?,
                    None => config::Config::default(),
                };
                if let Some(d) = data_dir {
                    config.server.data_dir = d;
                }
                server::verify_audit(&config).await
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
