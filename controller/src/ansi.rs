//! CORE: the colours a job's log has set at a point, so that a page that
//! shows the log from its middle (or skips ahead in it) goes on in the
//! colours the job left there.
//!
//! [`SgrTracker`] reads log bytes the way the job page's renderer
//! (`assets/log.js`) reads the text: SGR sequences (`ESC [ … m`, or the C1
//! CSI `U+009B`) change the style, every other escape sequence (OSC,
//! DCS, SOS, PM, APC to their terminator; other CSI and two-byte escapes)
//! is passed over. Only the style is kept, never text: the result is a
//! list of SGR parameters that the page applies where it goes on.

/// A colour the page has a class for: an SGR code of the 8 colours
/// (30–37 foreground, 40–47 background) or their bright forms (90–97,
/// 100–107).
type Colour = u8;

/// What the SGR sequences of a stretch of log did to the style, whatever
/// it was before: whether they reset it, and each attribute they set since
/// (`Some`), or left alone (`None`). From the log's start (the default
/// style), this is the style itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SgrChange {
    reset: bool,
    bold: Option<bool>,
    italic: Option<bool>,
    underline: Option<bool>,
    fg: Option<Option<Colour>>,
    bg: Option<Option<Colour>>,
}

impl SgrChange {
    /// SGR parameters that make the same change, e.g. `0;1;31` or `22;44`;
    /// empty when the stretch changed nothing.
    pub fn params(&self) -> String {
        let flag = |set: Option<bool>, on: u8, off: u8| set.map(|set| if set { on } else { off });
        let codes = [
            self.reset.then_some(0),
            flag(self.bold, 1, 22),
            flag(self.italic, 3, 23),
            flag(self.underline, 4, 24),
            self.fg.map(|fg| fg.unwrap_or(39)),
            self.bg.map(|bg| bg.unwrap_or(49)),
        ];
        codes
            .iter()
            .flatten()
            .map(u8::to_string)
            .collect::<Vec<_>>()
            .join(";")
    }

    /// Applies one SGR sequence's parameters (`""` resets, as `0`).
    fn apply(&mut self, params: &[u8]) {
        let codes: Vec<u32> = if params.is_empty() {
            vec![0]
        } else {
            params
                .split(|byte| *byte == b';')
                .map(|part| {
                    part.iter().fold(0u32, |value, digit| {
                        value
                            .saturating_mul(10)
                            .saturating_add(u32::from(digit - b'0'))
                    })
                })
                .collect()
        };
        let mut index = 0;
        while index < codes.len() {
            let code = codes[index];
            match code {
                0 => {
                    *self = SgrChange {
                        reset: true,
                        ..SgrChange::default()
                    }
                }
                1 => self.bold = Some(true),
                3 => self.italic = Some(true),
                4 => self.underline = Some(true),
                22 => self.bold = Some(false),
                23 => self.italic = Some(false),
                24 => self.underline = Some(false),
                30..=37 | 90..=97 => self.fg = Some(Colour::try_from(code).ok()),
                39 => self.fg = Some(None),
                40..=47 | 100..=107 => self.bg = Some(Colour::try_from(code).ok()),
                49 => self.bg = Some(None),
                38 | 48 => {
                    // 256 colours: the first 16 have classes; the others and
                    // RGB leave the colour unset, as the page does.
                    let mut colour = None;
                    match codes.get(index + 1) {
                        Some(5) => {
                            colour = match codes.get(index + 2) {
                                Some(&n) if n < 8 => Colour::try_from(30 + n).ok(),
                                Some(&n) if n < 16 => Colour::try_from(90 + n - 8).ok(),
                                _ => None,
                            };
                            index += 2;
                        }
                        Some(2) => index += 4,
                        _ => {}
                    }
                    if code == 38 {
                        self.fg = Some(colour);
                    } else {
                        self.bg = Some(colour.map(|fg| fg + 10));
                    }
                }
                _ => {}
            }
            index += 1;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Text,
    /// After a `0xC2` in text: a C1 control may follow (`U+009B` CSI).
    C2,
    Escape,
    Csi,
    /// An OSC, DCS, SOS, PM or APC string, dropped up to BEL or ST.
    String,
    /// An ESC inside such a string: `\` ends it.
    StringEscape,
    /// After a `0xC2` inside such a string: `U+009C` (ST) ends it.
    StringC2,
}

/// The longest SGR parameter list kept (as the page does: the rest of a
/// longer one is dropped).
const MAX_PARAMS: usize = 64;

/// Follows the SGR sequences through a stretch of log read in pieces of
/// any size. It starts outside any escape sequence.
#[derive(Debug, Clone)]
pub struct SgrTracker {
    mode: Mode,
    params: Vec<u8>,
    change: SgrChange,
}

impl Default for SgrTracker {
    fn default() -> Self {
        SgrTracker {
            mode: Mode::Text,
            params: Vec::with_capacity(MAX_PARAMS),
            change: SgrChange::default(),
        }
    }
}

impl SgrTracker {
    /// What the bytes fed so far did to the style.
    pub fn change(&self) -> SgrChange {
        self.change
    }

    /// Reads the next bytes of the log.
    pub fn feed(&mut self, bytes: &[u8]) {
        let mut index = 0;
        while index < bytes.len() {
            if self.mode == Mode::Text {
                // Plain text is most of a log: jump to the next possible escape.
                match memchr::memchr2(0x1b, 0xc2, &bytes[index..]) {
                    None => return,
                    Some(found) => index += found,
                }
            }
            self.step(bytes[index]);
            index += 1;
        }
    }

    fn step(&mut self, byte: u8) {
        self.mode = match (self.mode, byte) {
            (Mode::Text | Mode::C2, 0x1b) => Mode::Escape,
            (Mode::Text | Mode::C2, 0xc2) => Mode::C2,
            (Mode::C2, 0x9b) => self.csi(),
            (Mode::Text | Mode::C2, _) => Mode::Text,
            (Mode::Escape, b'[') => self.csi(),
            (Mode::Escape, b']' | b'P' | b'X' | b'^' | b'_') => Mode::String,
            (Mode::Escape, _) => Mode::Text,
            (Mode::Csi, 0x40..=0x7e) => {
                if byte == b'm'
                    && self
                        .params
                        .iter()
                        .all(|param| param.is_ascii_digit() || *param == b';')
                {
                    self.change.apply(&self.params);
                }
                Mode::Text
            }
            (Mode::Csi, 0x20..=0x3f) => {
                if self.params.len() < MAX_PARAMS {
                    self.params.push(byte);
                }
                Mode::Csi
            }
            (Mode::Csi, _) => Mode::Text,
            (Mode::String | Mode::StringC2, 0x07) => Mode::Text,
            (Mode::StringC2, 0x9c) => Mode::Text,
            (Mode::String | Mode::StringC2, 0x1b) => Mode::StringEscape,
            (Mode::String | Mode::StringC2, 0xc2) => Mode::StringC2,
            (Mode::String | Mode::StringC2, _) => Mode::String,
            (Mode::StringEscape, b'\\') => Mode::Text,
            (Mode::StringEscape, _) => Mode::String,
        };
    }

    fn csi(&mut self) -> Mode {
        self.params.clear();
        Mode::Csi
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params_after(log: &[u8], piece: usize) -> String {
        let mut tracker = SgrTracker::default();
        for part in log.chunks(piece) {
            tracker.feed(part);
        }
        tracker.change().params()
    }

    fn check(log: &[u8], expected: &str) {
        for piece in [1, 2, 3, 5, 1024] {
            assert_eq!(
                params_after(log, piece),
                expected,
                "{:?} in pieces of {piece}",
                String::from_utf8_lossy(log)
            );
        }
    }

    #[test]
    fn sgr_sequences_become_the_change_they_make() {
        check(b"plain text\n", "");
        check(b"\x1b[31mred\n", "31");
        check(b"\x1b[1;4;31;44mloud\nstill\n", "1;4;31;44");
        check(b"\x1b[1;31m\x1b[0;4mx\x1b[49m", "0;4;49");
        check(b"\x1b[31mred\x1b[0m plain\n", "0");
        check(b"\x1b[31mred\x1b[m plain\n", "0");
        check(b"\x1b[1;92;103mx\x1b[22;39m", "22;39;103");
        check(b"\x1b[38;5;1mx\x1b[48;5;12m", "31;104");
        check(b"\x1b[31m\x1b[38;5;200mx", "39");
        check(b"\x1b[31m\x1b[38;2;1;2;3;1mx", "1;39");
        check("\u{9b}32mC1 CSI".as_bytes(), "32");
    }

    #[test]
    fn other_sequences_change_nothing() {
        // OSC 8 hyperlinks, titles, DCS, a non-SGR CSI, a malformed SGR.
        check(b"\x1b]8;;javascript:alert(1)\x1b\\link\x1b]8;;\x1b\\", "");
        check(b"\x1b]0;title \x1b[31m inside\x07after", "");
        check("\x1b]0;title\u{9c}\x1b[33mafter".as_bytes(), "33");
        check(b"\x1bPdcs \x1b[31m\x1b\\\x1b[2J\x1b[?25l", "");
        // A malformed CSI ends at the byte that breaks it, which goes too.
        check(b"\x1b[3x1m\x1b[31;\x1b[1m", "");
        check(b"\x1b(B\x1b[35m", "35");
    }
}
