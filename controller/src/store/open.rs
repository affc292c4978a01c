//! Which store to open, and opening it: the one place the controller and
//! `hobot admin` (export, import, migrate) name a backend. A new backend is
//! one more [`StoreLocation`] arm and its options.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hobotnica_common::private_fs::{Secret, read_secret_file};

use super::Store;
use super::embedded::{EmbeddedStore, OpenError};
use super::postgres::PostgresStore;
use super::redis::RedisStore;

/// Every key a controller writes in Redis starts with this.
pub const REDIS_KEY_PREFIX: &str = "hobotnica:";

/// A store, as the options name it.
#[derive(Clone)]
pub enum StoreLocation {
    /// The embedded store in a data directory; `wait`: how long to wait for
    /// another process that has it open (`--store-wait`).
    Embedded { data_dir: PathBuf, wait: Duration },
    /// Redis at `url` (which may hold a password), its server verified
    /// against `ca_cert` or the system's roots.
    Redis {
        url: Secret,
        ca_cert: Option<PathBuf>,
    },
    /// PostgreSQL at `url` (which may hold a password; TLS by its
    /// `sslmode`), its server verified against `ca_cert` or the system's
    /// roots.
    Postgres {
        url: Secret,
        ca_cert: Option<PathBuf>,
    },
}

impl StoreLocation {
    /// The kind of store, as a snapshot's header names it.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreLocation::Embedded { .. } => "embedded",
            StoreLocation::Redis { .. } => "redis",
            StoreLocation::Postgres { .. } => "postgres",
        }
    }

    /// Where it is, without a secret: the data directory, or Redis' address.
    pub fn describe(&self) -> String {
        match self {
            StoreLocation::Embedded { data_dir, .. } => {
                format!("the embedded store in {}", data_dir.display())
            }
            StoreLocation::Redis { url, .. } => format!("Redis at {}", host_of(url)),
            StoreLocation::Postgres { url, .. } => format!("PostgreSQL at {}", host_of(url)),
        }
    }
}

/// The host (and port) of a server URL, without its credentials.
fn host_of(url: &Secret) -> &str {
    let rest = url
        .expose()
        .split_once("://")
        .map_or(url.expose(), |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host)
}

/// Why a store refuses to be used.
#[derive(Debug, thiserror::Error)]
pub enum OpenStoreError {
    #[error("the data directory is in use by a running controller: stop it first ({0})")]
    InUse(PathBuf),
    #[error(
        "an earlier import into this store did not finish; empty it and import again \
         (a controller does not start on a half-imported store)"
    )]
    UnfinishedImport,
    #[error("there is no store in {0} (no hobotnica.redb)")]
    NoStore(PathBuf),
}

/// Opens the store at `location` (as a controller does: an embedded store
/// in use is waited for up to `wait`, then refused with a hint about
/// `--store-wait`).
pub async fn open(location: &StoreLocation) -> anyhow::Result<Arc<dyn Store>> {
    open_as(location, false).await
}

/// Opens the store at `location` for `hobot admin`: an embedded store in
/// use by a controller is refused at once, saying so.
pub async fn open_for_admin(location: &StoreLocation) -> anyhow::Result<Arc<dyn Store>> {
    open_as(location, true).await
}

async fn open_as(location: &StoreLocation, admin: bool) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match location {
        StoreLocation::Postgres { url, ca_cert } => {
            let ca = match ca_cert {
                Some(path) => Some(std::fs::read(path).with_context(|| {
                    format!(
                        "cannot read the PostgreSQL CA certificate {}",
                        path.display()
                    )
                })?),
                None => None,
            };
            Arc::new(PostgresStore::connect(url.expose(), ca).await?)
        }
        StoreLocation::Redis { url, ca_cert } => {
            let ca = match ca_cert {
                Some(path) => Some(std::fs::read(path).with_context(|| {
                    format!("cannot read the Redis CA certificate {}", path.display())
                })?),
                None => None,
            };
            Arc::new(RedisStore::connect(url.expose(), REDIS_KEY_PREFIX, ca).await?)
        }
        StoreLocation::Embedded { data_dir, wait } => {
            match EmbeddedStore::open_waiting(data_dir, *wait).await {
                Ok(store) => Arc::new(store),
                Err(OpenError::InUse(path)) if admin => {
                    return Err(OpenStoreError::InUse(path).into());
                }
                Err(err) => return Err(err.into()),
            }
        }
    })
}

/// Opens the store at `location` for a controller to serve: one that holds
/// the remains of an unfinished import is refused.
pub async fn open_to_serve(location: &StoreLocation) -> anyhow::Result<Arc<dyn Store>> {
    let store = open(location).await?;
    if store
        .import_unfinished()
        .await
        .context("cannot read the store")?
    {
        return Err(OpenStoreError::UnfinishedImport.into());
    }
    Ok(store)
}

/// Opens an existing store to read from (an embedded store that is not
/// there is an error, not a new empty store).
pub async fn open_existing(location: &StoreLocation) -> anyhow::Result<Arc<dyn Store>> {
    if let StoreLocation::Embedded { data_dir, .. } = location
        && !data_dir.join("hobotnica.redb").exists()
    {
        return Err(OpenStoreError::NoStore(data_dir.clone()).into());
    }
    open_for_admin(location).await
}

/// The store options of a command that works on a store directly, as the
/// controller's: `--data-dir`, or `--redis` (a URL with a password in
/// `HOBOTNICA_REDIS_URL` or `--redis-url-file`, never on the command line)
/// and `--redis-ca-cert`, or `--postgres` (likewise) and
/// `--postgres-ca-cert`. [`MigrateFrom`] and [`MigrateTo`] are the same
/// with `--from-` and `--to-`.
macro_rules! store_args {
    ($(#[$meta:meta])* $name:ident, $data_id:literal, $data_dir:literal, $redis:literal, $redis_env:literal,
     $url_file:literal, $url_file_env:literal, $ca:literal, $ca_env:literal, $data_env:literal,
     $pg:literal, $pg_env:literal, $pg_file:literal, $pg_file_env:literal, $pg_ca:literal, $pg_ca_env:literal) => {
        $(#[$meta])*
        #[derive(Clone, Debug, clap::Args)]
        pub struct $name {
            /// The embedded store's data directory.
            #[arg(id = $data_id, long = $data_dir, env = $data_env, value_name = "DIR")]
            pub data_dir: Option<PathBuf>,
            /// Redis (`redis://host:6379/0`, `rediss://` for TLS). A URL
            /// with a password belongs in the environment variable or the
            /// URL file, not on the command line.
            #[arg(id = $redis, long = $redis, env = $redis_env, hide_env_values = true, value_name = "URL", value_parser = Secret::parse)]
            pub redis_url: Option<Secret>,
            /// File holding the Redis URL (mode 0600 or stricter).
            #[arg(id = $url_file, long = $url_file, env = $url_file_env, value_name = "FILE")]
            pub redis_url_file: Option<PathBuf>,
            /// The CA certificate (PEM) that signed Redis' certificate.
            #[arg(id = $ca, long = $ca, env = $ca_env, value_name = "FILE")]
            pub redis_ca_cert: Option<PathBuf>,
            /// PostgreSQL (`postgres://user@host:5432/db?sslmode=verify-full`).
            /// A URL with a password belongs in the environment variable or
            /// the URL file, not on the command line.
            #[arg(id = $pg, long = $pg, env = $pg_env, hide_env_values = true, value_name = "URL", value_parser = Secret::parse)]
            pub postgres_url: Option<Secret>,
            /// File holding the PostgreSQL URL (mode 0600 or stricter).
            #[arg(id = $pg_file, long = $pg_file, env = $pg_file_env, value_name = "FILE")]
            pub postgres_url_file: Option<PathBuf>,
            /// The CA certificate (PEM) that signed PostgreSQL's certificate.
            #[arg(id = $pg_ca, long = $pg_ca, env = $pg_ca_env, value_name = "FILE")]
            pub postgres_ca_cert: Option<PathBuf>,
            /// The Redis URL was given on the command line
            /// ([`Self::note_command_line`]).
            #[arg(skip)]
            pub redis_on_command_line: bool,
            /// The PostgreSQL URL was given on the command line.
            #[arg(skip)]
            pub postgres_on_command_line: bool,
            /// The data directory was given, not a default
            /// ([`Self::note_command_line`]).
            #[arg(skip)]
            pub data_dir_given: bool,
        }

        impl $name {
            /// Whether any store option was given.
            pub fn given(&self) -> bool {
                self.data_dir_given
                    || self.redis_url.is_some()
                    || self.redis_url_file.is_some()
                    || self.postgres_url.is_some()
                    || self.postgres_url_file.is_some()
            }

            /// Notes whether the Redis URL came from the command line;
            /// `matches` are those of the command that flattens these.
            pub fn note_command_line(&mut self, matches: &clap::ArgMatches) {
                use clap::parser::ValueSource;
                self.redis_on_command_line =
                    matches.value_source($redis) == Some(ValueSource::CommandLine);
                self.postgres_on_command_line =
                    matches.value_source($pg) == Some(ValueSource::CommandLine);
                // `hobot --data-dir` is global, with a default: only a
                // directory given names the store.
                self.data_dir_given = matches!(
                    matches.value_source($data_id),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                );
            }

            /// The store these options name. A Redis URL with a password
            /// given on the command line is refused.
            pub fn location(&self) -> anyhow::Result<StoreLocation> {
                let redis = server_url(
                    (&self.redis_url, self.redis_on_command_line, $redis, $redis_env),
                    (&self.redis_url_file, concat!("--", $url_file)),
                )?;
                let postgres = server_url(
                    (&self.postgres_url, self.postgres_on_command_line, $pg, $pg_env),
                    (&self.postgres_url_file, concat!("--", $pg_file)),
                )?;
                let data_dir = self.data_dir.as_ref().filter(|_| self.data_dir_given);
                match (data_dir, redis, postgres) {
                    (Some(dir), None, None) => Ok(StoreLocation::Embedded {
                        data_dir: dir.clone(),
                        wait: Duration::ZERO,
                    }),
                    (None, Some(url), None) => Ok(StoreLocation::Redis {
                        url,
                        ca_cert: self.redis_ca_cert.clone(),
                    }),
                    (None, None, Some(url)) => Ok(StoreLocation::Postgres {
                        url,
                        ca_cert: self.postgres_ca_cert.clone(),
                    }),
                    (None, None, None) => anyhow::bail!(
                        "name the store: --{} DIR, --{} URL or --{} URL",
                        $data_dir, $redis, $pg
                    ),
                    _ => anyhow::bail!("give one of --{}, --{} and --{}, not more", $data_dir, $redis, $pg),
                }
            }
        }
    };
}

/// A server's URL from its option or its URL file (one of them); a URL
/// with a password given on the command line is refused.
fn server_url(
    (url, on_command_line, option, env): (&Option<Secret>, bool, &str, &str),
    (file, file_option): (&Option<PathBuf>, &'static str),
) -> anyhow::Result<Option<Secret>> {
    if let Some(url) = url
        && on_command_line
        && crate::config::url_has_password(url.expose())
    {
        anyhow::bail!(
            "a URL with a password is refused on the command line (other users see it in the \
             process list): give it in {env} or {file_option}"
        );
    }
    Ok(match (url, file) {
        (Some(_), Some(_)) => anyhow::bail!("give --{option} or {file_option}, not both"),
        (Some(url), None) => Some(url.clone()),
        (None, Some(path)) => Some(read_secret_file(file_option, path)?),
        (None, None) => None,
    })
}

store_args!(
    /// A store, by the controller's options.
    StoreArgs, "data_dir", "data-dir", "redis", "HOBOTNICA_REDIS_URL", "redis-url-file",
    "HOBOTNICA_REDIS_URL_FILE", "redis-ca-cert", "HOBOTNICA_REDIS_CA_CERT", "HOBOTNICA_DATA_DIR",
    "postgres", "HOBOTNICA_POSTGRES_URL", "postgres-url-file", "HOBOTNICA_POSTGRES_URL_FILE",
    "postgres-ca-cert", "HOBOTNICA_POSTGRES_CA_CERT"
);
store_args!(
    /// The store a migration reads.
    MigrateFrom, "from-data-dir", "from-data-dir", "from-redis", "HOBOTNICA_FROM_REDIS_URL", "from-redis-url-file",
    "HOBOTNICA_FROM_REDIS_URL_FILE", "from-redis-ca-cert", "HOBOTNICA_FROM_REDIS_CA_CERT",
    "HOBOTNICA_FROM_DATA_DIR", "from-postgres", "HOBOTNICA_FROM_POSTGRES_URL", "from-postgres-url-file",
    "HOBOTNICA_FROM_POSTGRES_URL_FILE", "from-postgres-ca-cert", "HOBOTNICA_FROM_POSTGRES_CA_CERT"
);
store_args!(
    /// The store a migration writes.
    MigrateTo, "to-data-dir", "to-data-dir", "to-redis", "HOBOTNICA_TO_REDIS_URL", "to-redis-url-file",
    "HOBOTNICA_TO_REDIS_URL_FILE", "to-redis-ca-cert", "HOBOTNICA_TO_REDIS_CA_CERT",
    "HOBOTNICA_TO_DATA_DIR", "to-postgres", "HOBOTNICA_TO_POSTGRES_URL", "to-postgres-url-file",
    "HOBOTNICA_TO_POSTGRES_URL_FILE", "to-postgres-ca-cert", "HOBOTNICA_TO_POSTGRES_CA_CERT"
);
