//! Terminal output that never panics. `println!` panics when stdout is closed or full
//! (`rabbit generate … | head -c 1`, `> /dev/full`); here a write error becomes [`StdoutError`],
//! which `main` turns into a quiet exit for a closed pipe and a clear error otherwise. Status
//! lines on stderr ignore write errors: there is nowhere left to report them.

use std::fmt;
use std::io::{self, Write};

/// Writing to standard output failed.
#[derive(Debug)]
pub struct StdoutError(pub io::Error);

impl fmt::Display for StdoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("writing to standard output")
    }
}

impl std::error::Error for StdoutError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

impl StdoutError {
    /// The reader of our stdout went away: not an error worth a message.
    pub fn is_closed_pipe(&self) -> bool {
        self.0.kind() == io::ErrorKind::BrokenPipe
    }
}

/// Writes `text` to stdout and flushes (streamed tokens must show at once).
pub fn write(text: &str) -> Result<(), StdoutError> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .map_err(StdoutError)
}

/// Writes `args` and a newline to stdout.
pub fn line(args: fmt::Arguments<'_>) -> Result<(), StdoutError> {
    let mut out = io::stdout().lock();
    out.write_fmt(args)
        .and_then(|_| out.write_all(b"\n"))
        .and_then(|_| out.flush())
        .map_err(StdoutError)
}

/// A status line on stderr; write errors are ignored.
pub fn write_note(args: fmt::Arguments<'_>, newline: bool) {
    let mut err = io::stderr().lock();
    let _ = err.write_fmt(args);
    if newline {
        let _ = err.write_all(b"\n");
    }
    let _ = err.flush();
}

/// The error and its causes, `: `-separated like anyhow's `{:#}`, minus causes whose text the
/// message already carries (library errors often print their source themselves).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// `outln!(...)`: like `println!`, returning `Result<(), StdoutError>`.
macro_rules! outln {
    () => { $crate::out::line(format_args!("")) };
    ($($t:tt)*) => { $crate::out::line(format_args!($($t)*)) };
}

/// `note!(...)`: like `eprintln!`, never panicking.
macro_rules! note {
    () => { $crate::out::write_note(format_args!(""), true) };
    ($($t:tt)*) => { $crate::out::write_note(format_args!($($t)*), true) };
}

/// `note_inline!(...)`: like `eprint!`, never panicking.
macro_rules! note_inline {
    ($($t:tt)*) => { $crate::out::write_note(format_args!($($t)*), false) };
}

pub(crate) use {note, note_inline, outln};
