//! `historian keys`: the keyring's life cycle (init, status, backup, restore, master key
//! rotation), and opening it at server start. The server must be stopped for restore and
//! rotate: they rewrite the keyring file it holds open.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use privacy::{Keyring, KeyringError, MasterKey};

use crate::config::{Config, MASTER_KEY_ENV, MasterKeySource};

/// Arguments of `historian keys`.
#[derive(Debug, clap::Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
    /// Configuration file (for `[privacy]` and `[server].data_dir`).
    #[arg(long, env = "HISTORIAN_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Data directory (default keyring and master key places).
    #[arg(long, env = "HISTORIAN_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum KeysCommand {
    /// Creates the keyring, and the master key file unless HISTORIAN_MASTER_KEY is set.
    Init,
    /// Prints counts of keys and subjects per table (no secrets) as JSON.
    Status,
    /// Copies the keyring (sealed under the master key, which is not included) to a file.
    Backup {
        /// Where to write the backup (must not exist).
        out: PathBuf,
    },
    /// Restores a backup; keys destroyed since it was made stay destroyed. Stop the server first.
    Restore {
        /// The backup file.
        from: PathBuf,
    },
    /// Re-seals the keyring under a new master key. Stop the server first.
    Rotate {
        /// With the master key in HISTORIAN_MASTER_KEY: where to write the new key (the
        /// variable must then be changed to it).
        #[arg(long)]
        new_key_out: Option<PathBuf>,
    },
}

fn load_config(args: &KeysArgs) -> Result<Config, Box<dyn std::error::Error>> {
    let mut config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(d) = &args.data_dir {
        config.server.data_dir = d.clone();
    }
    Ok(config)
}

fn pending_file(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".new");
    PathBuf::from(name)
}

fn read_master(source: &MasterKeySource) -> Result<MasterKey, Box<dyn std::error::Error>> {
    Ok(match source {
        MasterKeySource::Env(v) => MasterKey::from_hex(v, MASTER_KEY_ENV)?,
        MasterKeySource::File(p) => MasterKey::from_file(p)?,
    })
}

/// Opens the keyring read-only (status, backup), beside a running server.
fn open_read_only(config: &Config) -> Result<Keyring, Box<dyn std::error::Error>> {
    let master = read_master(&config.master_key_source()?)?;
    Ok(Keyring::open_read_only(&config.keyring_dir()?, master)?)
}

/// Opens the keyring with the configured master key, taking its lock. A rotation
/// interrupted between re-sealing the keyring and renaming the new key file is finished
/// here.
pub fn open(config: &Config) -> Result<Keyring, Box<dyn std::error::Error>> {
    let dir = config.keyring_dir()?;
    let source = config.master_key_source()?;
    let master = read_master(&source).map_err(|e| {
        format!("{e}; tables with subjects in their privacy profile need the master key (`historian keys init` makes one)")
    })?;
    match Keyring::open(&dir, master) {
        Err(KeyringError::WrongMasterKey(at)) => {
            if let MasterKeySource::File(path) = &source {
                let pending = pending_file(path);
                if let Ok(new) = MasterKey::from_file(&pending)
                    && let Ok(k) = Keyring::open(&dir, new)
                {
                    std::fs::rename(&pending, path)?;
                    tracing::warn!(path = %path.display(), "finished an interrupted master key rotation");
                    return Ok(k);
                }
            }
            Err(KeyringError::WrongMasterKey(at).into())
        }
        other => Ok(other?),
    }
}

/// The keyring for the server, if some table needs it.
pub fn open_for_server(
    config: &Config,
) -> Result<Option<Arc<Keyring>>, Box<dyn std::error::Error>> {
    if !config.needs_keyring() {
        return Ok(None);
    }
    let keyring = open(config).map_err(|e| format!("cannot open the keyring: {e}"))?;
    let status = keyring.status();
    tracing::info!(
        dir = %keyring.dir().display(),
        keys = status.keys,
        subjects = status.subjects,
        "keyring opened"
    );
    Ok(Some(Arc::new(keyring)))
}

/// Runs `historian keys ...`.
pub fn run(args: KeysArgs) -> Result<(), Box<dyn std::error::Error>> {
    let config = load_config(&args)?;
    let dir = config.keyring_dir()?;
    match args.command {
        KeysCommand::Init => {
            let source = config.master_key_source()?;
            let master = match &source {
                MasterKeySource::File(p) if !p.exists() => {
                    if let Some(parent) = p.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    let key = MasterKey::generate()?;
                    key.write_new_file(p)?;
                    println!(
                        "master key written to {} (mode 0600); keep a copy apart from the data",
                        p.display()
                    );
                    key
                }
                other => read_master(other)?,
            };
            Keyring::init(&dir, master)?;
            println!("keyring created in {}", dir.display());
        }
        KeysCommand::Status => {
            let status = open_read_only(&config)?.status();
            println!("{}", serde_json::to_string_pretty(&status)?);
        }
        KeysCommand::Backup { out } => {
            let bytes = open_read_only(&config)?.backup(&out)?;
            println!(
                "backed up {bytes} bytes to {} (the master key is not in it)",
                out.display()
            );
        }
        KeysCommand::Restore { from } => {
            let master = read_master(&config.master_key_source()?)?;
            let keyring = Keyring::restore(&dir, master, &from)?;
            let status = keyring.status();
            println!(
                "restored {} keys from {}; destroyed keys re-applied: {:?}",
                status.keys,
                from.display(),
                status.destroyed
            );
        }
        KeysCommand::Rotate { new_key_out } => {
            let source = config.master_key_source()?;
            let old = read_master(&source)?;
            let new = MasterKey::generate()?;
            match (&source, new_key_out) {
                (MasterKeySource::File(path), None) => {
                    let pending = pending_file(path);
                    new.write_new_file(&pending)?;
                    Keyring::rotate(&dir, old, new)?;
                    std::fs::rename(&pending, path)?;
                    println!("keyring re-sealed; new master key in {}", path.display());
                }
                (MasterKeySource::Env(_), Some(out)) | (MasterKeySource::File(_), Some(out)) => {
                    new.write_new_file(&out)?;
                    Keyring::rotate(&dir, old, new)?;
                    println!(
                        "keyring re-sealed; the new master key is in {}: set {MASTER_KEY_ENV} or master_key_file to it",
                        out.display()
                    );
                }
                (MasterKeySource::Env(_), None) => {
                    return Err(format!(
                        "the master key comes from {MASTER_KEY_ENV}: pass --new-key-out FILE for the new one"
                    )
                    .into());
                }
            }
        }
    }
    Ok(())
}
