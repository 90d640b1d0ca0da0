//! What a binary needs at run time: its ELF interpreter (the dynamic loader) and the shared
//! libraries the loader resolves for it on this machine.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

/// `e_machine` of x86-64: the images say `amd64`.
const EM_X86_64: u16 = 62;
const PT_INTERP: u32 = 3;

/// What a dynamically linked binary loads before `main`, as absolute paths on this machine.
#[derive(Debug, PartialEq, Eq)]
pub struct Needed {
    /// The dynamic loader (`PT_INTERP`).
    pub interpreter: PathBuf,
    /// Every shared library the loader resolves for the binary (`ld.so --list`), loader excluded.
    pub libraries: Vec<PathBuf>,
}

/// What `binary` needs at run time; `None` for a static binary. An unresolved library, a binary
/// for another architecture or a non-ELF file are errors.
pub fn needed(binary: &Path) -> anyhow::Result<Option<Needed>> {
    let bytes = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let Some(interp) = interpreter(&bytes).with_context(|| format!("{} is not a usable ELF", binary.display()))? else {
        return Ok(None);
    };
    let out = Command::new(&interp)
        .arg("--list")
        .arg(binary)
        .output()
        .with_context(|| format!("running {interp} --list {}", binary.display()))?;
    ensure!(
        out.status.success(),
        "{interp} --list {} failed: {}",
        binary.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let interpreter = PathBuf::from(interp);
    let libraries = parse_list(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("the libraries of {}", binary.display()))?
        .into_iter()
        .filter(|l| *l != interpreter)
        .collect();
    Ok(Some(Needed { interpreter, libraries }))
}

/// The ELF interpreter (`PT_INTERP`) of a 64-bit little-endian x86-64 ELF file, `None` if it is
/// statically linked.
pub fn interpreter(elf: &[u8]) -> anyhow::Result<Option<String>> {
    ensure!(elf.get(..4) == Some(b"\x7fELF"), "not an ELF file");
    ensure!(
        elf.get(4) == Some(&2) && elf.get(5) == Some(&1),
        "not a 64-bit little-endian ELF"
    );
    let machine = u16_at(elf, 0x12)?;
    ensure!(machine == EM_X86_64, "built for machine {machine}, not x86-64");
    let phoff = u64_at(elf, 0x20)?;
    let phentsize = u64::from(u16_at(elf, 0x36)?);
    let phnum = u64::from(u16_at(elf, 0x38)?);
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i * phentsize)
            .and_then(|o| usize::try_from(o).ok())
            .context("program header offset out of range")?;
        if u32_at(elf, ph)? != PT_INTERP {
            continue;
        }
        let offset = usize::try_from(u64_at(elf, ph + 8)?)?;
        let size = usize::try_from(u64_at(elf, ph + 32)?)?;
        let raw = offset
            .checked_add(size)
            .and_then(|end| elf.get(offset..end))
            .context("PT_INTERP out of the file")?;
        let path = raw.split(|&b| b == 0).next().unwrap_or_default();
        let path = std::str::from_utf8(path).context("PT_INTERP is not UTF-8")?;
        ensure!(path.starts_with('/'), "interpreter {path:?} is not an absolute path");
        return Ok(Some(path.to_owned()));
    }
    Ok(None)
}

/// The absolute paths in `ld.so --list` output (glibc's, what `ldd` prints): `name => /path (0x…)`
/// and the loader's own `/path (0x…)`; the vDSO has no file and is left out. `name => not found` is
/// an error naming the library.
pub fn parse_list(out: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let target = match line.split_once(" => ") {
            Some((name, target)) => {
                if target.trim() == "not found" {
                    bail!("{name} is not found by the dynamic loader");
                }
                target
            }
            None => line,
        };
        // Strip the load address.
        let path = target.rsplit_once(" (0x").map_or(target, |(path, _)| path).trim();
        if path.starts_with('/') {
            let path = PathBuf::from(path);
            if !paths.contains(&path) {
                paths.push(path);
            }
        } else {
            ensure!(
                !path.contains(' ') && path.starts_with("linux-"),
                "unexpected line from the dynamic loader: {line:?}"
            );
        }
    }
    Ok(paths)
}

fn bytes_at<const N: usize>(elf: &[u8], at: usize) -> anyhow::Result<[u8; N]> {
    at.checked_add(N)
        .and_then(|end| elf.get(at..end))
        .and_then(|b| b.try_into().ok())
        .context("ELF file truncated")
}

fn u16_at(elf: &[u8], at: usize) -> anyhow::Result<u16> {
    bytes_at(elf, at).map(u16::from_le_bytes)
}

fn u32_at(elf: &[u8], at: usize) -> anyhow::Result<u32> {
    bytes_at(elf, at).map(u32::from_le_bytes)
}

fn u64_at(elf: &[u8], at: usize) -> anyhow::Result<u64> {
    bytes_at(elf, at).map(u64::from_le_bytes)
}
