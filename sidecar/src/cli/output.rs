//! Writing the CLI's answers. A reader that went away (`pgwarden sessions
//! list | head -1`) ends the output quietly, as for any Unix tool: the
//! command finishes with its usual exit code, never a panic (`println!`
//! panics on EPIPE, because Rust ignores SIGPIPE).

use std::io::{self, Write};

/// Write `text` to `w` and flush; a closed pipe counts as done.
pub fn write_or_closed(w: &mut impl Write, text: &str) -> io::Result<()> {
    match w.write_all(text.as_bytes()).and_then(|()| w.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// `text` on stdout. Other write errors (a full disk) are the caller's.
pub fn out(text: &str) -> io::Result<()> {
    write_or_closed(&mut io::stdout().lock(), text)
}

/// `text` on stdout, with a newline.
pub fn outln(text: &str) -> io::Result<()> {
    out(&format!("{text}\n"))
}

/// A message on stderr, with a newline; nothing can be done when stderr is
/// gone, so failures are ignored.
pub fn errln(text: &str) {
    let _ = write_or_closed(&mut io::stderr().lock(), &format!("{text}\n"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_pipe_is_done_not_an_error() {
        let (reader, mut writer) = io::pipe().unwrap();
        drop(reader);
        let big = "x".repeat(256 * 1024);
        assert!(write_or_closed(&mut writer, &big).is_ok());
        assert!(write_or_closed(&mut writer, "again\n").is_ok());
    }

    #[test]
    fn other_errors_are_reported() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::StorageFull))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        assert!(write_or_closed(&mut Full, "x").is_err());
        let mut v = Vec::new();
        write_or_closed(&mut v, "ok\n").unwrap();
        assert_eq!(v, b"ok\n");
    }
}
