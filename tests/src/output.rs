//! Separating `make`'s output from the lines Hobotnica itself writes into a
//! job's log (`[hobotnica] fetching ...`, `[hobotnica] cancelled`, ...), so
//! tests can compare make's bytes exactly.

/// How a line written by the agent or the controller starts.
pub const ANNOTATION_PREFIX: &[u8] = b"[hobotnica] ";

/// A streaming filter that drops whole annotation lines and passes every
/// other byte through unchanged. Holds at most one partial line.
#[derive(Default)]
pub struct OutputFilter {
    partial: Vec<u8>,
}

impl OutputFilter {
    /// Feeds log bytes; `emit` receives make's bytes.
    pub fn feed(&mut self, mut data: &[u8], mut emit: impl FnMut(&[u8])) {
        while let Some(newline) = data.iter().position(|b| *b == b'\n') {
            let (line, rest) = data.split_at(newline + 1);
            if self.partial.is_empty() {
                if !line.starts_with(ANNOTATION_PREFIX) {
                    emit(line);
                }
            } else {
                self.partial.extend_from_slice(line);
                if !self.partial.starts_with(ANNOTATION_PREFIX) {
                    emit(&self.partial);
                }
                self.partial.clear();
            }
            data = rest;
        }
        self.partial.extend_from_slice(data);
    }

    /// Emits what is left (a last line without a newline).
    pub fn finish(mut self, mut emit: impl FnMut(&[u8])) {
        if !self.partial.is_empty() && !self.partial.starts_with(ANNOTATION_PREFIX) {
            emit(&self.partial);
        }
        self.partial.clear();
    }
}

/// Make's output in a whole log.
pub fn make_output(log: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(log.len());
    let mut filter = OutputFilter::default();
    filter.feed(log, |bytes| out.extend_from_slice(bytes));
    filter.finish(|bytes| out.extend_from_slice(bytes));
    out
}

/// The annotation lines of a whole log, without their prefix.
pub fn annotations(log: &[u8]) -> Vec<String> {
    log.split(|b| *b == b'\n')
        .filter_map(|line| line.strip_prefix(ANNOTATION_PREFIX))
        .map(|line| String::from_utf8_lossy(line).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotation_lines_are_dropped_in_any_split() {
        let log = b"[hobotnica] fetching x\nout 1\nerr 1\n[hobotnica] done\nlast";
        for split in 0..=log.len() {
            let mut out = Vec::new();
            let mut filter = OutputFilter::default();
            filter.feed(&log[..split], |b| out.extend_from_slice(b));
            filter.feed(&log[split..], |b| out.extend_from_slice(b));
            filter.finish(|b| out.extend_from_slice(b));
            assert_eq!(out, b"out 1\nerr 1\nlast", "split at {split}");
        }
        assert_eq!(annotations(log), ["fetching x", "done"]);
    }
}
