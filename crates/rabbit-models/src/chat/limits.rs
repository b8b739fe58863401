//! Bounds on one render, so a hostile or broken template fails fast instead of filling memory:
//! the output goes into a buffer that refuses to grow past a byte limit, and minijinja's fuel
//! caps the template instructions a render may execute (a loop that never ends, or one that
//! runs for hours while printing nothing).

use std::io;

use super::Message;

/// Default for [`ChatTemplate::max_rendered_bytes`](super::ChatTemplate::max_rendered_bytes):
/// 64 MiB. Far above any prompt a model's context holds (a 128k-token context is well under
/// 1 MiB of typical text), low enough that rendering never threatens the machine. Callers that
/// know the context length pass a tighter limit.
pub const DEFAULT_MAX_RENDERED_BYTES: usize = 64 << 20;

/// Instructions every render may execute, whatever its input. Measured: the Qwen2.5 template
/// runs about 25 instructions per message, Qwen3's about 75 (at most 110 over the goldens), so a
/// 10 000-message conversation takes under 1 M; a template that loops without end exhausts this
/// allowance in about half a second.
const FUEL_BASE: u64 = 20_000_000;
/// Extra instructions per message: two orders of magnitude above what real templates use, for
/// heavier per-message logic (tool calls, looking back over earlier messages).
const FUEL_PER_MESSAGE: u64 = 20_000;
/// Extra instructions per byte of input (contents, roles, extra variables), for templates that
/// walk a message character by character.
const FUEL_PER_INPUT_BYTE: u64 = 16;

/// The instruction budget of a render of `messages` with `kwargs`: proportional to the input,
/// so long conversations are never cut short while a runaway loop on a short one stops early.
pub(super) fn fuel_for(
    messages: &[Message],
    kwargs: &serde_json::Map<String, serde_json::Value>,
) -> u64 {
    let mut input_bytes: u64 = messages
        .iter()
        .map(|m| (m.role.len() + m.content.len()) as u64)
        .sum();
    for (k, v) in kwargs {
        input_bytes += k.len() as u64 + v.to_string().len() as u64;
    }
    FUEL_BASE
        .saturating_add(FUEL_PER_MESSAGE.saturating_mul(messages.len() as u64))
        .saturating_add(FUEL_PER_INPUT_BYTE.saturating_mul(input_bytes))
}

/// An in-memory output that refuses any write that would take it past `limit` bytes (and
/// remembers that it did, so the render error can say why).
#[derive(Debug)]
pub(super) struct BoundedOutput {
    buf: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl BoundedOutput {
    /// An empty output accepting at most `limit` bytes.
    pub(super) fn new(limit: usize) -> Self {
        BoundedOutput {
            buf: Vec::new(),
            limit,
            overflowed: false,
        }
    }

    /// True once a write was refused.
    pub(super) fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// The text written. minijinja writes whole `str` pieces and a refused write takes none of
    /// its bytes, so the buffer is always valid UTF-8; the lossy path only guards that reasoning.
    pub(super) fn into_string(self) -> String {
        String::from_utf8(self.buf)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }
}

impl io::Write for BoundedOutput {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.len() > self.limit - self.buf.len() {
            self.overflowed = true;
            return Err(io::Error::other(format!(
                "rendered text exceeds the limit of {} bytes",
                self.limit
            )));
        }
        // Grow geometrically but never past the limit, so the buffer holds at most `limit`.
        let needed = self.buf.len() + data.len();
        if needed > self.buf.capacity() {
            let target = needed
                .max(self.buf.capacity().saturating_mul(2))
                .min(self.limit);
            self.buf.reserve_exact(target - self.buf.len());
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn bounded_output_takes_up_to_the_limit_and_nothing_past_it() {
        let mut out = BoundedOutput::new(10);
        out.write_all(b"hello").unwrap();
        out.write_all(b"world").unwrap();
        assert!(!out.overflowed());
        assert!(out.write_all(b"!").is_err());
        assert!(out.overflowed());
        // A refused write takes none of its bytes.
        assert_eq!(out.buf.len(), 10);
        assert!(
            out.buf.capacity() <= 10,
            "the buffer never holds more than the limit"
        );
        assert_eq!(out.into_string(), "helloworld");

        let mut out = BoundedOutput::new(4);
        assert!(out.write_all("ééé".as_bytes()).is_err());
        assert_eq!(out.buf.len(), 0);
    }

    #[test]
    fn fuel_grows_with_the_input() {
        let empty = serde_json::Map::new();
        let one = fuel_for(&[Message::new("user", "hi")], &empty);
        let many = fuel_for(&vec![Message::new("user", "hi"); 1000], &empty);
        let long = fuel_for(&[Message::new("user", "x".repeat(1 << 20))], &empty);
        assert!(one >= FUEL_BASE);
        assert!(many > one && long > one);
        let mut kwargs = serde_json::Map::new();
        kwargs.insert("tools".into(), serde_json::json!(["x".repeat(1000)]));
        assert!(fuel_for(&[Message::new("user", "hi")], &kwargs) > one);
    }
}
