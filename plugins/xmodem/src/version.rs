//! `identify`: ask the running firmware for its version with a text command.
//!
//! What it is: drain, send `version_command`, read the first non-empty line
//! that is not the echo of the command, within `version_timeout_ms`, trimmed.
//! A line ends at `\r` or `\n`; if the time runs out on a partial line that is
//! not empty, that text is the answer (devices that print no newline).
//!
//! What it is not: XMODEM has no way to ask a bootloader for its version, so
//! without `version_command` this answers `unsupported`.

use otagw_plugin_sdk::{Error, Level, LinkFault, Port};

use crate::options::Settings;

/// Read the version line. `Unsupported` without `version_command`.
pub fn identify<P: Port + ?Sized>(port: &mut P, settings: &Settings) -> Result<String, Error> {
    let Some(cmd) = &settings.version_command else {
        return Err(Error::Unsupported(
            "xmodem has no way to read the version; set version_command".into(),
        ));
    };
    match port.drain() {
        Ok(_) | Err(LinkFault::Unsupported(_)) => {}
        Err(e) => return Err(Error::Transfer(format!("identify: drain: {e}"))),
    }
    port.write(cmd)
        .map_err(|e| Error::Transfer(format!("identify: sending version_command: {e}")))?;
    let echo = String::from_utf8_lossy(cmd).trim().to_string();

    let timeout = settings.version_timeout_ms;
    let deadline = port.now_ms() + u64::from(timeout);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let now = port.now_ms();
        if now >= deadline {
            break;
        }
        let chunk = port
            .read(256, (deadline - now).min(60_000) as u32)
            .map_err(|e| Error::Transfer(format!("identify: reading the version: {e}")))?;
        for b in chunk {
            if b == b'\r' || b == b'\n' {
                let text = String::from_utf8_lossy(&line).trim().to_string();
                line.clear();
                if text.is_empty() || text == echo {
                    continue;
                }
                return Ok(text);
            }
            line.push(b);
        }
    }
    let text = String::from_utf8_lossy(&line).trim().to_string();
    if !text.is_empty() && text != echo {
        port.log(
            Level::Debug,
            "identify: no line end before version_timeout_ms, using the partial line",
        );
        return Ok(text);
    }
    Err(Error::Timeout(format!(
        "identify: no answer to version_command within {timeout} ms"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use otagw_plugin_sdk::testing::ScriptPort;

    fn settings(cmd: Option<&str>) -> Settings {
        Settings {
            version_command: cmd.map(|c| c.as_bytes().to_vec()),
            ..Settings::default()
        }
    }

    #[test]
    fn unsupported_without_command() {
        let mut port = ScriptPort::new();
        let err = identify(&mut port, &settings(None)).unwrap_err();
        assert_eq!(
            err,
            Error::Unsupported("xmodem has no way to read the version; set version_command".into())
        );
        assert!(port.written.is_empty());
    }

    #[test]
    fn reads_the_line_and_skips_the_echo() {
        // Stale bytes (drained), the echo of the command, then the line.
        let mut port = ScriptPort::new()
            .arrive(0, [b'x'; 12])
            .reply_to(b"version\r", 1, b"version\r\n")
            .arrive(5, b"  1.4.2-rc1 ")
            .arrive(7, b"\r\n> ");
        let v = identify(&mut port, &settings(Some("version\r"))).unwrap();
        assert_eq!(v, "1.4.2-rc1");
        assert_eq!(port.written, b"version\r");
        assert_eq!(port.drained, 12);
    }

    #[test]
    fn partial_line_at_timeout() {
        let mut port = ScriptPort::new().arrive(3, b"v2.0");
        let v = identify(&mut port, &settings(Some("ver\n"))).unwrap();
        assert_eq!(v, "v2.0");
    }

    #[test]
    fn silence_is_a_timeout() {
        let mut port = ScriptPort::new();
        let err = identify(&mut port, &settings(Some("ver\n"))).unwrap_err();
        assert_eq!(
            err,
            Error::Timeout("identify: no answer to version_command within 2000 ms".into())
        );
        assert!(port.now >= 2000);
    }
}
