//! The memory map of the simulated part: NOR flash (erased bytes read 0xFF, programming can only
//! clear bits), RAM, system memory (ROM) and the option bytes. No I/O, no protocol.

use super::Stm32SimConfig;

/// Where main flash starts on every STM32.
pub const FLASH_BASE: u32 = 0x0800_0000;
/// Where SRAM starts.
pub const RAM_BASE: u32 = 0x2000_0000;

/// A memory area of the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Region {
    /// Main flash (NOR).
    Flash,
    /// SRAM.
    Ram,
    /// System memory: the ROM bootloader and the part's signature (read only here).
    System,
    /// The option bytes (read only here).
    OptionBytes,
}

/// Why an access was refused (the bootloader answers NACK).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// No memory at the address.
    #[error("0x{0:08x} is not in flash, RAM or system memory")]
    Unmapped(u32),
    /// The access runs past the end of its region.
    #[error("{len} bytes at 0x{addr:08x} run past the end of {region:?}")]
    Range {
        /// Start.
        addr: u32,
        /// Length.
        len: usize,
        /// The region of `addr`.
        region: Region,
    },
    /// The bootloader does not write there (system memory, option bytes, its own RAM).
    #[error("0x{0:08x} is not writable through the bootloader")]
    ReadOnly(u32),
    /// A flash write that is not word (4-byte) aligned.
    #[error("flash write at 0x{0:08x} is not 4-byte aligned")]
    Unaligned(u32),
    /// Programming the byte needs a 0 → 1 bit change: the cell is not erased.
    #[error(
        "flash byte at 0x{addr:08x} holds 0x{old:02x}, cannot program 0x{new:02x} without an erase"
    )]
    NotErased {
        /// The byte's address.
        addr: u32,
        /// What it holds.
        old: u8,
        /// What was to be written.
        new: u8,
    },
    /// A page number past the end of flash.
    #[error("page {0} does not exist")]
    Page(u32),
    /// A bank the part does not have.
    #[error("bank {0} does not exist")]
    Bank(u8),
}

/// The part's memories.
#[derive(Debug)]
pub struct Memory {
    flash: Vec<u8>,
    page_size: usize,
    dual_bank: bool,
    ram: Vec<u8>,
    ram_reserved: usize,
    system_base: u32,
    system: Vec<u8>,
    option_base: u32,
    options: Vec<u8>,
}

/// F1 factory option bytes: RDP level 0 (0xA5), no write protection, each with its complement.
const F1_OPTION_BYTES: [u8; 16] = [
    0xA5, 0x5A, 0xFF, 0x00, 0xFF, 0x00, 0xFF, 0x00, 0xFF, 0x00, 0xFF, 0x00, 0xFF, 0x00, 0xFF, 0x00,
];
/// Where an F1 keeps its flash size (KiB, u16 little endian) and its 96-bit unique ID.
const F1_FLASH_SIZE_REG: u32 = 0x1FFF_F7E0;
const F1_UID_REG: u32 = 0x1FFF_F7E8;

impl Memory {
    /// Memories as `cfg` describes them: flash erased (or holding `initial_flash`), RAM zero,
    /// system memory a fixed pattern with the F1 signature where its addresses fall inside.
    pub fn new(cfg: &Stm32SimConfig) -> Self {
        let mut flash = vec![0xFF; cfg.flash_size];
        if let Some(init) = &cfg.initial_flash {
            flash[..init.len()].copy_from_slice(init);
        }
        let mut system: Vec<u8> = (0..cfg.system_size).map(|i| (i * 7 % 256) as u8).collect();
        let kib = u16::try_from(cfg.flash_size / 1024).unwrap_or(u16::MAX);
        let mut put = |addr: u32, bytes: &[u8]| {
            if let Some(off) = addr.checked_sub(cfg.system_base).map(|o| o as usize)
                && off + bytes.len() <= system.len()
            {
                system[off..off + bytes.len()].copy_from_slice(bytes);
            }
        };
        put(F1_FLASH_SIZE_REG, &kib.to_le_bytes());
        let uid: Vec<u8> = (0..12u8)
            .map(|i| i.wrapping_mul(17) ^ (cfg.pid as u8))
            .collect();
        put(F1_UID_REG, &uid);
        let mut options = F1_OPTION_BYTES.to_vec();
        options.resize(cfg.option_size, 0xFF);
        Self {
            flash,
            page_size: cfg.page_size,
            dual_bank: cfg.dual_bank,
            ram: vec![0; cfg.ram_size],
            ram_reserved: cfg.ram_reserved,
            system_base: cfg.system_base,
            system,
            option_base: cfg.option_base,
            options,
        }
    }

    /// The flash contents.
    pub fn flash(&self) -> &[u8] {
        &self.flash
    }

    /// The RAM contents.
    pub fn ram(&self) -> &[u8] {
        &self.ram
    }

    /// Flash pages.
    pub fn page_count(&self) -> usize {
        self.flash.len() / self.page_size
    }

    fn areas(&self) -> [(Region, u32, usize); 4] {
        [
            (Region::Flash, FLASH_BASE, self.flash.len()),
            (Region::Ram, RAM_BASE, self.ram.len()),
            (Region::System, self.system_base, self.system.len()),
            (Region::OptionBytes, self.option_base, self.options.len()),
        ]
    }

    /// The region holding `addr` and the offset of `addr` in it.
    pub fn locate(&self, addr: u32) -> Option<(Region, usize)> {
        self.areas().into_iter().find_map(|(region, base, len)| {
            let off = addr.checked_sub(base)? as usize;
            (off < len).then_some((region, off))
        })
    }

    /// Where the bootloader accepts a write memory command (checked at the address stage).
    pub fn check_write_start(&self, addr: u32) -> Result<Region, MemError> {
        match self.locate(addr) {
            None => Err(MemError::Unmapped(addr)),
            Some((Region::Flash, _)) if !addr.is_multiple_of(4) => Err(MemError::Unaligned(addr)),
            Some((Region::Ram, off)) if off < self.ram_reserved => Err(MemError::ReadOnly(addr)),
            Some((r @ (Region::Flash | Region::Ram), _)) => Ok(r),
            Some(_) => Err(MemError::ReadOnly(addr)),
        }
    }

    fn span(&self, addr: u32, len: usize) -> Result<(Region, usize), MemError> {
        let (region, off) = self.locate(addr).ok_or(MemError::Unmapped(addr))?;
        let size = self
            .areas()
            .iter()
            .find(|a| a.0 == region)
            .map_or(0, |a| a.2);
        if off + len > size {
            return Err(MemError::Range { addr, len, region });
        }
        Ok((region, off))
    }

    /// `len` bytes from `addr`, all in one region.
    pub fn read(&self, addr: u32, len: usize) -> Result<Vec<u8>, MemError> {
        let (region, off) = self.span(addr, len)?;
        let mem = match region {
            Region::Flash => &self.flash,
            Region::Ram => &self.ram,
            Region::System => &self.system,
            Region::OptionBytes => &self.options,
        };
        Ok(mem[off..off + len].to_vec())
    }

    /// Writes `data` at `addr`. In flash a byte can only clear bits (NOR); bytes are programmed
    /// in order and the first one that needs a 0 → 1 change stops the write (what came before
    /// it stays programmed, as on the part).
    pub fn write(&mut self, addr: u32, data: &[u8]) -> Result<(), MemError> {
        self.check_write_start(addr)?;
        let (region, off) = self.span(addr, data.len())?;
        match region {
            Region::Flash => {
                for (i, &new) in data.iter().enumerate() {
                    let cell = &mut self.flash[off + i];
                    if *cell & new != new {
                        return Err(MemError::NotErased {
                            addr: addr + i as u32,
                            old: *cell,
                            new,
                        });
                    }
                    *cell = new;
                }
            }
            Region::Ram => self.ram[off..off + data.len()].copy_from_slice(data),
            _ => return Err(MemError::ReadOnly(addr)),
        }
        Ok(())
    }

    /// Checks page numbers without erasing.
    pub fn check_pages(&self, pages: &[u32]) -> Result<(), MemError> {
        match pages.iter().find(|&&p| p as usize >= self.page_count()) {
            Some(&p) => Err(MemError::Page(p)),
            None => Ok(()),
        }
    }

    /// Erases the pages (checked first: nothing is erased when one does not exist).
    pub fn erase_pages(&mut self, pages: &[u32]) -> Result<(), MemError> {
        self.check_pages(pages)?;
        for &p in pages {
            let start = p as usize * self.page_size;
            self.flash[start..start + self.page_size].fill(0xFF);
        }
        Ok(())
    }

    /// Erases all of flash.
    pub fn mass_erase(&mut self) {
        self.flash.fill(0xFF);
    }

    /// Erases bank 1 (the lower half) or bank 2 (the upper half) of a dual-bank part.
    /// Returns the pages erased.
    pub fn erase_bank(&mut self, bank: u8) -> Result<usize, MemError> {
        let half = self.flash.len() / 2;
        let range = match (self.dual_bank, bank) {
            (true, 1) => 0..half,
            (true, 2) => half..self.flash.len(),
            _ => return Err(MemError::Bank(bank)),
        };
        self.flash[range].fill(0xFF);
        Ok(self.page_count() / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> Memory {
        Memory::new(&Stm32SimConfig::default())
    }

    #[test]
    fn nor_rules() {
        let mut m = mem();
        assert_eq!(m.read(FLASH_BASE, 4).unwrap(), [0xFF; 4]);
        m.write(FLASH_BASE, &[0x12, 0x34, 0xFF, 0xFF]).unwrap();
        // Clearing more bits is fine; setting one is not.
        m.write(FLASH_BASE, &[0x10, 0x34, 0xFF, 0xFF]).unwrap();
        assert_eq!(
            m.write(FLASH_BASE, &[0x11, 0, 0, 0]),
            Err(MemError::NotErased {
                addr: FLASH_BASE,
                old: 0x10,
                new: 0x11
            })
        );
        assert_eq!(
            m.write(FLASH_BASE + 2, &[0]),
            Err(MemError::Unaligned(FLASH_BASE + 2))
        );
        m.erase_pages(&[0]).unwrap();
        assert_eq!(m.read(FLASH_BASE, 4).unwrap(), [0xFF; 4]);
        assert_eq!(m.erase_pages(&[64]), Err(MemError::Page(64)));
    }

    #[test]
    fn map_and_signature() {
        let m = mem();
        assert_eq!(m.locate(0x0801_FFFF), Some((Region::Flash, 0x1FFFF)));
        assert_eq!(m.locate(0x0802_0000), None);
        assert!(matches!(
            m.read(0x0801_FFFE, 4),
            Err(MemError::Range { .. })
        ));
        assert_eq!(m.read(F1_FLASH_SIZE_REG, 2).unwrap(), [128, 0]);
        assert_eq!(m.read(0x1FFF_F800, 2).unwrap(), [0xA5, 0x5A]);
        assert_eq!(
            m.check_write_start(0x1FFF_F000),
            Err(MemError::ReadOnly(0x1FFF_F000))
        );
        assert_eq!(
            m.check_write_start(RAM_BASE),
            Err(MemError::ReadOnly(RAM_BASE))
        );
        assert_eq!(m.check_write_start(RAM_BASE + 0x200), Ok(Region::Ram));
    }
}
