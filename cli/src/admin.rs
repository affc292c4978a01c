//! `hobot admin export | import | migrate`: snapshots of a whole store,
//! read and written on the store directly (`store::snapshot`), with
//! progress on stderr.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use hobotnica_common::private_fs;
use hobotnica_controller::store::open::{self, StoreLocation};
use hobotnica_controller::store::snapshot::{self, Progress};

use crate::config::{ExportArgs, ImportArgs, MigrateArgs};

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

pub async fn export(args: ExportArgs) -> anyhow::Result<()> {
    let location = args.store.location()?;
    if !args.force && args.out.exists() {
        anyhow::bail!("{} exists: give --force to replace it", args.out.display());
    }
    let store = open::open_existing(&location).await?;
    eprintln!("exporting {}", location.describe());
    let partial = temporary_beside(&args.out);
    let file = private_fs::private_open_options()
        .write(true)
        .create_new(true)
        .open(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let written = async {
        let done = snapshot::export_to_writer(
            store.as_ref(),
            location.kind(),
            file.try_clone()?,
            report("exported"),
        )
        .await?;
        file.sync_all()?;
        if !args.force && args.out.exists() {
            anyhow::bail!(
                "{} appeared meanwhile: give --force to replace it",
                args.out.display()
            );
        }
        std::fs::rename(&partial, &args.out)
            .with_context(|| format!("cannot write {}", args.out.display()))?;
        Ok(done)
    }
    .await;
    match written {
        Ok(done) => {
            eprintln!("exported {done} into {}", args.out.display());
            Ok(())
        }
        Err(err) => {
            let _ = std::fs::remove_file(&partial);
            Err(err.context(format!("the export into {} failed", args.out.display())))
        }
    }
}

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
