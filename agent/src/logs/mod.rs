//! A job's log on its way out: output pipe → [`Masker`] → [`Spool`] on disk →
//! [`Shipper`] → controller. [`Secrets`] also masks the lines the agent writes
//! itself.

mod mask;
mod shipper;
mod spool;

use std::io;
use std::sync::Arc;

pub use mask::{Masker, Secrets};
#[cfg(test)]
pub use shipper::LogChannel;
pub use shipper::{LogTransport, Shipper, ShipperEnd, ShipperHandle};
pub use spool::Spool;

use crate::process::OutputPipe;

/// Bytes read from the output pipe at once.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// How long a line is held back, at most, because wrapped base64 of a
/// secret might go on after its line break (see [`Masker::release`]).
const LINE_HOLD: std::time::Duration = std::time::Duration::from_millis(500);

/// Copies a process's output through the masker into the spool until every
/// writer has closed the pipe; returns the bytes read. A line the masker
/// holds back is released after [`LINE_HOLD`] without output. After a spool write
/// fails the pipe is still drained (so the process never blocks on a full
/// pipe) and the first error is returned at the end.
pub async fn copy_output(
    mut pipe: OutputPipe,
    mut masker: Masker,
    spool: Arc<Spool>,
) -> io::Result<u64> {
    let mut buf = vec![0u8; READ_BUFFER_BYTES];
    let mut masked = Vec::with_capacity(READ_BUFFER_BYTES);
    let mut total = 0u64;
    let mut first_error = None;
    loop {
        let n = if masker.holds_a_line_end() {
            match tokio::time::timeout(LINE_HOLD, pipe.read(&mut buf)).await {
                Ok(read) => read?,
                Err(_) => {
                    // Quiet with a whole line held back: let it go.
                    masked.clear();
                    masker.release(&mut masked);
                    if first_error.is_none()
                        && let Err(error) = spool.append(&masked)
                    {
                        first_error = Some(error);
                    }
                    continue;
                }
            }
        } else {
            pipe.read(&mut buf).await?
        };
        if n == 0 {
            break;
        }
        total += n as u64;
        masked.clear();
        masker.push(&buf[..n], &mut masked);
        if first_error.is_none()
            && let Err(error) = spool.append(&masked)
        {
            first_error = Some(error);
        }
    }
    masked.clear();
    masker.finish(&mut masked);
    if first_error.is_none()
        && let Err(error) = spool.append(&masked)
    {
        first_error = Some(error);
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(total),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::{CommandSpec, spawn};

    #[tokio::test]
    async fn output_reaches_the_spool_byte_for_byte() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let spool = Arc::new(Spool::create(dir.path().join("1-1.log"))?);
        // 3 MB of output, some on stderr.
        let spec = CommandSpec::new("/bin/sh", dir.path())
            .arg("-c")
            .arg("head -c 3000000 /dev/zero | tr '\\0' x; echo; echo tail >&2")
            .env("PATH", "/usr/bin:/bin");
        let (mut group, pipe) = spawn(&spec)?;
        let copied = copy_output(pipe, Secrets::default().masker(), spool.clone()).await?;
        assert!(group.wait().await?.success());
        assert_eq!(copied, 3_000_000 + 1 + 5);
        let len = spool.close();
        assert_eq!(len, copied);
        let data = spool.reader()?.read_at(0, usize::try_from(len)?)?;
        assert!(data[..3_000_000].iter().all(|b| *b == b'x'));
        assert_eq!(&data[3_000_000..], b"\ntail\n");
        Ok(())
    }

    #[tokio::test]
    async fn secrets_in_the_output_are_masked_even_split_across_writes() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let spool = Arc::new(Spool::create(dir.path().join("1-1.log"))?);
        // The secret comes in two writes with a pause between them, and once
        // more at the very end of the output.
        let spec = CommandSpec::new("/bin/sh", dir.path())
            .arg("-c")
            .arg("printf 'token: ghp_sec'; sleep 0.2; printf 'ret123\\n'; printf 'ghp_secret123'")
            .env("PATH", "/usr/bin:/bin");
        let (mut group, pipe) = spawn(&spec)?;
        let secrets = Secrets::new(["ghp_secret123", "a-longer-secret-value-here"]);
        copy_output(pipe, secrets.masker(), spool.clone()).await?;
        assert!(group.wait().await?.success());
        let len = spool.close();
        let data = spool.reader()?.read_at(0, usize::try_from(len)?)?;
        assert_eq!(String::from_utf8(data)?, "token: [MASKED]\n[MASKED]");
        Ok(())
    }

    #[tokio::test]
    async fn a_line_held_for_wrapped_base64_leaves_when_the_job_goes_quiet() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let spool = Arc::new(Spool::create(dir.path().join("1-1.log"))?);
        let gate = dir.path().join("gate");
        // "gate\n" could begin the secret wrapped ("e" then a line break);
        // then the job waits for the test to open the gate.
        let spec = CommandSpec::new("/bin/sh", dir.path())
            .arg("-c")
            .arg(format!(
                "echo 'waiting for the gate'; n=0; while [ ! -e '{}' ]; do n=$((n+1)); [ $n -gt 400 ] && exit 9; sleep 0.05; done; printf 'eWJj\\nZGVm\\n'",
                gate.display()
            ))
            .env("PATH", "/usr/bin:/bin");
        let (mut group, pipe) = spawn(&spec)?;
        let secrets = Secrets::new(["eWJjZGVm"]);
        let copying = tokio::spawn(copy_output(pipe, secrets.masker(), spool.clone()));
        let mut progress = spool.subscribe();
        let line = b"waiting for the gate\n";
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while progress.borrow_and_update().len < line.len() as u64 {
                progress.changed().await?;
            }
            anyhow::Ok(())
        })
        .await??;
        std::fs::write(&gate, b"")?;
        copying.await??;
        assert!(group.wait().await?.success());
        let len = spool.close();
        let data = spool.reader()?.read_at(0, usize::try_from(len)?)?;
        assert_eq!(String::from_utf8(data)?, "waiting for the gate\n[MASKED]\n");
        Ok(())
    }
}
