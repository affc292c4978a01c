//! `hobot admin export | import | migrate`: snapshots of a whole store,
//! read and written on the store directly (`store::snapshot`), with
//! progress on stderr.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use hobotnica_common::private_fs;
use hobotnica_controller::store::open::{self, StoreLocation};
use hobotnica_controller::store::snapshot::{self, Progress};

use crate::client::{Client, Connection};
use crate::config::{ExportArgs, GlobalArgs, ImportArgs, MigrateArgs};

fn report(verb: &'static str) -> impl Fn(&Progress) + Send + 'static {
    move |done: &Progress| eprintln!("{verb} {done}")
}

/// The temporary file an export writes before it is renamed to `out`.
fn temporary_beside(out: &Path) -> PathBuf {
    let name = out.file_name().map_or_else(
        || "snapshot".into(),
        |name| name.to_string_lossy().into_owned(),
    );
    out.with_file_name(format!(".{name}.{}.partial", std::process::id()))
}

/// `hobot admin export`: from the store the options name, or without them
/// through the controller (`GET /api/v1/admin/export`, admin token).
pub async fn export(args: ExportArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let location = if args.store.given() {
        Some(args.store.location()?)
    } else {
        None
    };
    if !args.force && args.out.exists() {
        anyhow::bail!("{} exists: give --force to replace it", args.out.display());
    }
    let partial = temporary_beside(&args.out);
    let file = private_fs::private_open_options()
        .write(true)
        .create_new(true)
        .open(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let written = async {
        let summary = match &location {
            Some(location) => {
                let store = open::open_existing(location).await?;
                eprintln!("exporting {}", location.describe());
                let done = snapshot::export_to_writer(
                    store.as_ref(),
                    location.kind(),
                    file.try_clone()?,
                    report("exported"),
                )
                .await?;
                done.to_string()
            }
            None => download(global, &file).await?,
        };
        file.sync_all()?;
        if !args.force && args.out.exists() {
            anyhow::bail!(
                "{} appeared meanwhile: give --force to replace it",
                args.out.display()
            );
        }
        std::fs::rename(&partial, &args.out)
            .with_context(|| format!("cannot write {}", args.out.display()))?;
        Ok(summary)
    }
    .await;
    match written {
        Ok(summary) => {
            eprintln!("exported {summary} into {}", args.out.display());
            Ok(())
        }
        Err(err) => {
            let _ = std::fs::remove_file(&partial);
            Err(err.context(format!("the export into {} failed", args.out.display())))
        }
    }
}

/// Downloads the controller's snapshot into `file`; says how much.
async fn download(global: &GlobalArgs, file: &std::fs::File) -> anyhow::Result<String> {
    let client = Client::new(Connection::discover(global)?)?;
    eprintln!(
        "exporting through the controller at {}",
        client.connection.url
    );
    let mut response = client
        .send(reqwest::Method::GET, "/api/v1/admin/export", None)
        .await?;
    let mut out = std::io::BufWriter::new(file.try_clone()?);
    let mut bytes: u64 = 0;
    let mut reported: u64 = 0;
    while let Some(chunk) = response.chunk().await.context(
        "the download was cut off (the export failed on the controller, or the connection)",
    )? {
        out.write_all(&chunk)?;
        bytes += chunk.len() as u64;
        if bytes >= reported + DOWNLOAD_PROGRESS_BYTES {
            reported = bytes;
            eprintln!("downloaded {}", hobotnica_common::size::human_size(bytes));
        }
    }
    out.flush()?;
    Ok(format!(
        "{} (compressed) from the controller",
        hobotnica_common::size::human_size(bytes)
    ))
}

/// Progress of a download is reported every this many bytes.
const DOWNLOAD_PROGRESS_BYTES: u64 = 16 * 1024 * 1024;

pub async fn import(args: ImportArgs) -> anyhow::Result<()> {
    let location = args.store.location()?;
    let file = std::fs::File::open(&args.file)
        .with_context(|| format!("cannot open {}", args.file.display()))?;
    let (header, records) = snapshot::read_file(file)
        .await
        .with_context(|| format!("cannot import {}", args.file.display()))?;
    let store = open::open_for_admin(&location).await?;
    eprintln!(
        "importing a snapshot of a {} store, made {} by Hobotnica {}, into {}",
        header.source,
        header.created_at.format("%Y-%m-%d %H:%M:%S UTC"),
        header.hobotnica,
        location.describe()
    );
    let done = snapshot::import_records(store.as_ref(), records, report("imported"))
        .await
        .with_context(|| format!("cannot import {}", args.file.display()))?;
    eprintln!("imported {done} from {}", args.file.display());
    Ok(())
}

pub async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let (from, to) = (args.from.location()?, args.to.location()?);
    if let (
        StoreLocation::Embedded { data_dir: a, .. },
        StoreLocation::Embedded { data_dir: b, .. },
    ) = (&from, &to)
        && a == b
    {
        anyhow::bail!("the source and the target are the same data directory");
    }
    let source = open::open_existing(&from).await?;
    let target = open::open_for_admin(&to).await?;
    eprintln!("migrating {} to {}", from.describe(), to.describe());
    let done = snapshot::migrate(source.as_ref(), target.as_ref(), report("copied"))
        .await
        .context("the migration failed")?;
    eprintln!(
        "copied {done} from {} to {}",
        from.describe(),
        to.describe()
    );
    let _ = std::io::stderr().flush();
    Ok(())
}
