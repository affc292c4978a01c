//! The filter between a job's output pipe and its spool. Today it passes every
//! byte through unchanged; secret masking (holding back a secret's length
//! minus one byte so a secret split across reads is still caught) plugs in
//! here without touching the reader or the shipper.

/// Streams output through, replacing secrets (identity for now).
#[derive(Debug, Default)]
pub struct Masker {
    _secrets: Vec<String>,
}

impl Masker {
    /// A masker for the job's secret values (`Assignment.secrets`).
    pub fn new(secrets: &[String]) -> Masker {
        Masker {
            _secrets: secrets.to_vec(),
        }
    }

    /// Filters `input`, appending what may leave the host now to `out`. Bytes
    /// may be held back until a later call or [`Masker::finish`].
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(input);
    }

    /// Flushes whatever was held back, at end of output.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let _ = out;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_bytes_through_in_order() {
        let mut masker = Masker::new(&["s3cret".to_owned()]);
        let mut out = Vec::new();
        masker.push(b"hello ", &mut out);
        masker.push(b"world\n", &mut out);
        masker.finish(&mut out);
        assert_eq!(out, b"hello world\n");
    }
}
