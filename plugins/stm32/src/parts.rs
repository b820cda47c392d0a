//! A small table of common STM32 product IDs (the PID that GET ID returns),
//! with the largest flash of each line and its erase layout.
//!
//! What it is: a convenience so a device needs no `flash_size` / `page_size`
//! options for common parts. The sizes are the largest member of each line
//! (an STM32F103C8 and an F103CB share PID 0x410), so the fit check refuses
//! only what no part of the line can hold; set `flash_size` for the exact part.
//! Layouts are of single-bank mode.
//!
//! What it is not: complete, or authoritative: the `flash_size` and
//! `page_size` options always win.

/// What the table knows about a PID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub pid: u16,
    /// The line, for logs and `identify`'s model.
    pub name: &'static str,
    /// Largest flash of the line, in bytes.
    pub flash_size: u32,
    /// The erase layout, in the `page_size` option's syntax.
    pub layout: &'static str,
}

const K: u32 = 1024;

const PARTS: &[Part] = &[
    part(0x412, "STM32F10x low-density", 32 * K, "1K"),
    part(0x410, "STM32F10x medium-density", 128 * K, "1K"),
    part(0x414, "STM32F10x high-density", 512 * K, "2K"),
    part(0x430, "STM32F10x XL-density", 1024 * K, "2K"),
    part(0x418, "STM32F105/F107 connectivity line", 256 * K, "2K"),
    part(0x420, "STM32F100 medium-density value line", 128 * K, "1K"),
    part(0x428, "STM32F100 high-density value line", 512 * K, "2K"),
    part(0x444, "STM32F03x", 32 * K, "1K"),
    part(0x445, "STM32F04x / F070x6", 32 * K, "1K"),
    part(0x440, "STM32F05x / F030x8", 64 * K, "1K"),
    part(0x448, "STM32F07x", 128 * K, "2K"),
    part(0x442, "STM32F09x / F030xC", 256 * K, "2K"),
    part(0x438, "STM32F303x4/6/8 / F334", 64 * K, "2K"),
    part(0x422, "STM32F302xB/C / F303xB/C", 256 * K, "2K"),
    part(0x446, "STM32F302xD/E / F303xD/E", 512 * K, "2K"),
    part(0x413, "STM32F405/407/415/417", 1024 * K, "16K*4,64K,128K"),
    part(
        0x419,
        "STM32F42x/43x",
        2048 * K,
        "16K*4,64K,128K*7,16K*4,64K,128K",
    ),
    part(0x423, "STM32F401xB/C", 256 * K, "16K*4,64K,128K"),
    part(0x433, "STM32F401xD/E", 512 * K, "16K*4,64K,128K"),
    part(0x431, "STM32F411", 512 * K, "16K*4,64K,128K"),
    part(0x421, "STM32F446", 512 * K, "16K*4,64K,128K"),
    part(0x435, "STM32L43x/44x", 256 * K, "2K"),
    part(0x466, "STM32G03x/04x", 64 * K, "2K"),
    part(0x460, "STM32G07x/08x", 128 * K, "2K"),
    part(0x468, "STM32G431/441", 128 * K, "2K"),
    part(0x497, "STM32WLE5/WL55", 256 * K, "2K"),
    part(0x495, "STM32WB55", 1024 * K, "4K"),
];

const fn part(pid: u16, name: &'static str, flash_size: u32, layout: &'static str) -> Part {
    Part {
        pid,
        name,
        flash_size,
        layout,
    }
}

/// The table's entry for `pid`.
pub fn lookup(pid: u16) -> Option<&'static Part> {
    PARTS.iter().find(|p| p.pid == pid)
}

/// `64 KiB`, `1 MiB`, or bytes.
pub fn human(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::Layout;

    #[test]
    fn every_layout_parses_and_covers_the_flash() {
        for p in PARTS {
            let l = Layout::parse(p.layout).unwrap();
            let pages = l.pages(0, u64::from(p.flash_size));
            let end = pages.last().map(|(_, s, z)| s + u64::from(*z)).unwrap();
            assert_eq!(end, u64::from(p.flash_size), "{}", p.name);
        }
        let pids: std::collections::HashSet<u16> = PARTS.iter().map(|p| p.pid).collect();
        assert_eq!(pids.len(), PARTS.len());
    }

    #[test]
    fn lookup_and_human() {
        assert_eq!(lookup(0x410).unwrap().flash_size, 128 * 1024);
        assert_eq!(lookup(0x999), None);
        assert_eq!(human(65536), "64 KiB");
        assert_eq!(human(2 << 20), "2 MiB");
        assert_eq!(human(1000), "1000 bytes");
    }
}
