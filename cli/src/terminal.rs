//! What of a job's output may reach the operator's terminal.
//!
//! A job's log is written by whoever wrote the job (a stranger's pull
//! request, say). Printed raw on a terminal, its escape sequences would
//! write the operator's clipboard (OSC 52), change the window title, clear
//! the screen or move the cursor over earlier lines. [`TerminalFilter`]
//! keeps text and colours and drops every other control function, as a
//! stream: a sequence split between two reads is recognised all the same,
//! and memory stays bounded whatever the job prints (an unterminated OSC is
//! dropped byte by byte as it arrives, never collected).
//!
//! Kept: printable ASCII, UTF-8 text (every character from U+00A0 on),
//! `\n`, `\r`, `\t`, `\b`, and SGR sequences `ESC [ <digits and ;> m`.
//! Dropped: every other CSI sequence, OSC (up to BEL or ST), DCS, SOS, PM
//! and APC strings (up to ST), every other escape sequence, the other C0
//! controls and DEL, and the C1 controls U+0080 to U+009F (as UTF-8 or as
//! lone bytes).

/// Longest CSI sequence (between `ESC [` and its final byte) that may be
/// an SGR and is kept to be passed on; a longer one is dropped.
const MAX_SGR_PARAMS: usize = 64;

const ESC: u8 = 0x1b;
const BEL: u8 = 0x07;
const CAN: u8 = 0x18;
const SUB: u8 = 0x1a;

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Text; `continuation` bytes of a UTF-8 character are still due.
    Ground { continuation: u8 },
    /// `0xC2` was read: the next byte says whether it starts a C1 control
    /// (U+0080..U+009F, dropped) or a character from U+00A0 on (kept).
    LeadC2,
    /// `ESC` was read.
    Escape,
    /// `ESC` and intermediate bytes (0x20..0x2F) were read.
    EscapeIntermediate,
    /// `ESC [` and these parameter bytes; `sgr` while they may still make
    /// an SGR sequence.
    Csi { sgr: bool },
    /// An OSC (ended by BEL or ST) or a DCS, SOS, PM or APC string (ended
    /// by ST); `escape` when the last byte was ESC, `lead_c2` when it was
    /// 0xC2 (U+009C is ST too).
    String {
        osc: bool,
        escape: bool,
        lead_c2: bool,
    },
}

/// A streaming filter from a job's output to what a terminal may be given.
#[derive(Debug, Clone)]
pub struct TerminalFilter {
    state: State,
    /// The parameter bytes of a CSI sequence that may be an SGR (at most
    /// [`MAX_SGR_PARAMS`]).
    params: Vec<u8>,
}

impl Default for TerminalFilter {
    fn default() -> Self {
        TerminalFilter::new()
    }
}

impl TerminalFilter {
    pub fn new() -> TerminalFilter {
        TerminalFilter {
            state: State::Ground { continuation: 0 },
            params: Vec::with_capacity(MAX_SGR_PARAMS),
        }
    }

    /// Appends to `out` what of `input` (the next bytes of the stream) may
    /// reach a terminal.
    pub fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len());
        for &byte in input {
            self.byte(byte, out);
        }
    }

    fn ground(&mut self) {
        self.state = State::Ground { continuation: 0 };
    }

    fn byte(&mut self, byte: u8, out: &mut Vec<u8>) {
        match self.state {
            State::Ground { continuation } => self.ground_byte(byte, continuation, out),
            State::LeadC2 => match byte {
                // C1 controls: dropped with their lead byte.
                0x80..=0x9f => self.ground(),
                0xa0..=0xbf => {
                    out.extend_from_slice(&[0xc2, byte]);
                    self.ground();
                }
                // Not UTF-8: the lead byte goes on as it is (the terminal
                // shows a replacement character), the byte is read afresh.
                _ => {
                    out.push(0xc2);
                    self.ground();
                    self.ground_byte(byte, 0, out);
                }
            },
            State::Escape => self.escape_byte(byte, out),
            State::EscapeIntermediate => match byte {
                0x20..=0x2f => {}
                0x30..=0x7e => self.ground(),
                _ => self.interrupted(byte, out),
            },
            State::Csi { sgr } => match byte {
                0x20..=0x3f => {
                    let may_be_sgr = sgr
                        && (byte.is_ascii_digit() || byte == b';')
                        && self.params.len() < MAX_SGR_PARAMS;
                    if may_be_sgr {
                        self.params.push(byte);
                    }
                    self.state = State::Csi { sgr: may_be_sgr };
                }
                0x40..=0x7e => {
                    if sgr && byte == b'm' {
                        out.extend_from_slice(b"\x1b[");
                        out.extend_from_slice(&self.params);
                        out.push(b'm');
                    }
                    self.ground();
                }
                _ => self.interrupted(byte, out),
            },
            State::String {
                osc,
                escape,
                lead_c2,
            } => {
                if escape {
                    if byte == b'\\' {
                        self.ground();
                    } else {
                        // ESC not followed by `\` ends the string and
                        // starts a new sequence.
                        self.state = State::Escape;
                        self.escape_byte(byte, out);
                    }
                    return;
                }
                match byte {
                    ESC => {
                        self.state = State::String {
                            osc,
                            escape: true,
                            lead_c2: false,
                        }
                    }
                    BEL if osc => self.ground(),
                    CAN | SUB => self.ground(),
                    0x9c if lead_c2 => self.ground(),
                    _ => {
                        self.state = State::String {
                            osc,
                            escape: false,
                            lead_c2: byte == 0xc2,
                        }
                    }
                }
            }
        }
    }

    fn ground_byte(&mut self, byte: u8, continuation: u8, out: &mut Vec<u8>) {
        if continuation > 0 {
            if (0x80..=0xbf).contains(&byte) {
                out.push(byte);
                self.state = State::Ground {
                    continuation: continuation - 1,
                };
                return;
            }
            // A character cut short: this byte is read afresh.
            self.ground();
        }
        match byte {
            ESC => self.state = State::Escape,
            b'\n' | b'\r' | b'\t' | 0x08 | 0x20..=0x7e => out.push(byte),
            // The other C0 controls, DEL, and lone C1 bytes.
            0x00..=0x1f | 0x7f..=0x9f => {}
            0xc2 => self.state = State::LeadC2,
            _ => {
                out.push(byte);
                let continuation = match byte {
                    0xc3..=0xdf => 1,
                    0xe0..=0xef => 2,
                    0xf0..=0xf4 => 3,
                    // A stray continuation byte or a byte that never starts
                    // UTF-8: the terminal shows a replacement character.
                    _ => 0,
                };
                self.state = State::Ground { continuation };
            }
        }
    }

    fn escape_byte(&mut self, byte: u8, out: &mut Vec<u8>) {
        match byte {
            b'[' => {
                self.params.clear();
                self.state = State::Csi { sgr: true };
            }
            b']' | b'P' | b'X' | b'^' | b'_' => {
                self.state = State::String {
                    osc: byte == b']',
                    escape: false,
                    lead_c2: false,
                }
            }
            ESC => {}
            0x20..=0x2f => self.state = State::EscapeIntermediate,
            // A two-byte sequence (ESC c resets the terminal, ESC 7 saves
            // the cursor, ...): dropped.
            0x30..=0x7e => self.ground(),
            _ => self.interrupted(byte, out),
        }
    }

    /// A byte that cannot continue the sequence being read: the sequence is
    /// dropped and the byte read afresh (a newline still ends the line, and
    /// text is never lost to a broken sequence).
    fn interrupted(&mut self, byte: u8, out: &mut Vec<u8>) {
        self.ground();
        if !matches!(byte, CAN | SUB) {
            self.ground_byte(byte, 0, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filtered(input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        TerminalFilter::new().filter(input, &mut out);
        out
    }

    fn text(input: &[u8]) -> String {
        String::from_utf8(filtered(input)).expect("UTF-8 in, UTF-8 out")
    }

    /// Colours, an OSC 52 clipboard write (ended by BEL), a title change
    /// (ended by ST), a screen clear, a cursor move, a DCS, and text around
    /// them in several scripts.
    const SAMPLE: &[u8] = b"\x1b[1;31mred\x1b[0m ok\n\
        \x1b]52;c;cHduZWQ=\x07clip\n\
        \x1b]0;pwned title\x1b\\title\n\
        \x1b[2J\x1b[Hcleared\n\
        \x1bPq#0;2;0;0;0\x1b\\dcs\n\
        caf\xc3\xa9 \xe2\x9c\x93 \xf0\x9f\x90\x99\x1b[m\tend\r\n";

    const SAMPLE_FILTERED: &str =
        "\x1b[1;31mred\x1b[0m ok\nclip\ntitle\ncleared\ndcs\ncafé ✓ 🐙\x1b[m\tend\r\n";

    #[test]
    fn colours_and_text_pass_other_sequences_do_not() {
        assert_eq!(text(SAMPLE), SAMPLE_FILTERED);
    }

    /// Every split of the sample into two reads gives the same output as
    /// one read: a sequence cut in two is still recognised.
    #[test]
    fn every_split_point_gives_the_same_output() {
        for split in 0..=SAMPLE.len() {
            let mut filter = TerminalFilter::new();
            let mut out = Vec::new();
            filter.filter(&SAMPLE[..split], &mut out);
            filter.filter(&SAMPLE[split..], &mut out);
            assert_eq!(
                String::from_utf8_lossy(&out),
                SAMPLE_FILTERED,
                "split at byte {split}"
            );
        }
        // And one byte at a time.
        let mut filter = TerminalFilter::new();
        let mut out = Vec::new();
        for byte in SAMPLE {
            filter.filter(std::slice::from_ref(byte), &mut out);
        }
        assert_eq!(String::from_utf8_lossy(&out), SAMPLE_FILTERED);
    }

    /// An OSC that never ends is dropped as it comes: nothing of it is
    /// printed and the filter holds no more memory than at the start.
    #[test]
    fn an_unterminated_osc_is_dropped_in_bounded_memory() {
        let mut filter = TerminalFilter::new();
        let mut out = Vec::new();
        filter.filter(b"before\x1b]52;c;", &mut out);
        let chunk = vec![b'A'; 64 * 1024];
        for _ in 0..256 {
            filter.filter(&chunk, &mut out);
        }
        assert_eq!(out, b"before");
        assert!(filter.params.capacity() <= MAX_SGR_PARAMS);
        // A long CSI is dropped whole, also without collecting it.
        let mut filter = TerminalFilter::new();
        let mut out = Vec::new();
        filter.filter(b"\x1b[", &mut out);
        for _ in 0..256 {
            filter.filter(&vec![b'1'; 64 * 1024], &mut out);
        }
        filter.filter(b"mafter", &mut out);
        assert_eq!(out, b"after");
        assert!(filter.params.capacity() <= MAX_SGR_PARAMS);
    }

    #[test]
    fn c0_and_c1_controls_are_dropped_text_is_not() {
        // BEL, NUL, DEL, form feed, vertical tab are dropped.
        assert_eq!(text(b"a\x07b\x00c\x7fd\x0ce\x0bf\x08"), "abcdef\x08");
        // C1 controls as UTF-8 (CSI U+009B, OSC U+009D, ST U+009C) and as
        // lone bytes are dropped; what follows them is plain text.
        assert_eq!(text(b"\xc2\x9b2J\xc2\x9d0;t\xc2\x9cx"), "2J0;tx");
        assert_eq!(text(b"\x9b2J\x9dy"), "2Jy");
        // Characters from U+00A0 on are text, continuation bytes in the
        // C1 range included (U+2713 is E2 9C 93).
        assert_eq!(text("\u{a0}é€✓🐙ß".as_bytes()), "\u{a0}é€✓🐙ß");
        assert_eq!(text("\u{85}\u{9f}ok".as_bytes()), "ok");
    }

    #[test]
    fn sequences_other_than_sgr_are_dropped() {
        // Other CSI: cursor moves, private modes (alternate screen,
        // hidden cursor), colon sub-parameters, a CSI with intermediates.
        assert_eq!(
            text(b"\x1b[5A\x1b[?1049h\x1b[?25l\x1b[38:5:1m\x1b[1 qx"),
            "x"
        );
        // Two-byte escapes (reset, save cursor) and charset designation.
        assert_eq!(text(b"\x1bc\x1b7\x1b(0x"), "x");
        // SOS, PM and APC strings up to ST; an OSC ended by U+009C.
        assert_eq!(
            text(b"\x1bXsos\x1b\\\x1b^pm\x1b\\\x1b_apc\x1b\\\x1b]2;t\xc2\x9cx"),
            "x"
        );
        // An ESC inside an OSC ends it and starts a new sequence.
        assert_eq!(text(b"\x1b]0;title\x1b[32mgreen"), "\x1b[32mgreen");
        // A sequence cut by a newline or by text loses nothing but itself.
        assert_eq!(text(b"\x1b[12\nnext"), "\nnext");
        assert_eq!(text("\x1b[1é".as_bytes()), "é");
        // CAN cancels a sequence.
        assert_eq!(text(b"\x1b]0;t\x18x"), "x");
    }

    #[test]
    fn invalid_utf8_passes_as_it_is() {
        assert_eq!(filtered(b"a\xc2Ab\xff\xfec"), b"a\xc2Ab\xff\xfec");
        assert_eq!(filtered(b"\xe2\x9c"), b"\xe2\x9c");
    }
}
