//! Dynamic-linking facts of one ELF object, read with goblin, and the checks
//! of those facts against the target policy.

use std::borrow::Cow;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use goblin::container::Ctx;
use goblin::elf::dynamic::Dynamic;
use goblin::elf::dynamic::{DT_NEEDED, DT_RPATH, DT_RUNPATH, DT_SONAME};
use goblin::elf::program_header::{ProgramHeader, PT_DYNAMIC, PT_LOAD};
use goblin::elf::section_header::{SectionHeader, SHN_UNDEF, SHT_DYNSYM, SHT_GNU_VERNEED, SHT_GNU_VERSYM};
use goblin::elf::sym::{Sym, Symtab};
use goblin::elf::symver::VerneedSection;
use goblin::elf::Elf;

use super::{ElfKind, Problem, TargetPolicy};

/// The ELF magic bytes, e_ident[0..4].
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// Dynamic-linking facts of one ELF object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ElfObject {
    /// Machine, class and byte order of the header.
    pub kind: ElfKind,
    /// DT_SONAME, if the object has one.
    pub soname: Option<String>,
    /// DT_NEEDED entries in the order of the dynamic section.
    pub needed: Vec<String>,
    /// DT_RPATH strings as written, each a colon-separated list.
    pub rpath: Vec<String>,
    /// DT_RUNPATH strings as written, each a colon-separated list.
    pub runpath: Vec<String>,
    /// One entry per version that the object needs (SHT_GNU_VERNEED).
    pub version_needs: Vec<VersionNeed>,
}

/// A symbol version that an object needs from a library, with the
/// undefined symbols bound to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionNeed {
    /// Library named by the entry (vn_file), such as libm.so.6.
    pub library: String,
    /// Version name (vna_name), such as GLIBC_2.35.
    pub version: String,
    /// The first by name of the undefined dynamic symbols whose versym index
    /// is this version, the one a report names. None when no symbol is.
    pub first_symbol: Option<String>,
}

/// A failure to read or parse an object.
#[derive(Debug)]
pub enum ParseError {
    /// Reading the file failed.
    Unreadable(io::Error),
    /// The bytes are not a valid ELF object, with the reason.
    Invalid(String),
}

/// Parses the dynamic-linking facts of the ELF object in `bytes`.
///
/// Returns the reason when `bytes` is not an ELF object, is truncated or has
/// a dynamic section that points outside the file. A part that ends past the
/// end is reported, and a goblin error or panic also becomes an error.
#[cfg(test)]
pub fn parse_object(bytes: &[u8]) -> Result<ElfObject, String> {
    parse_from(&bytes, &|_| true).map_err(|error| match error {
        ParseError::Unreadable(error) => error.to_string(),
        ParseError::Invalid(reason) => reason,
    })
}

/// Reads and parses the ELF object in `file`. Only the needs whose version
/// name `reported` accepts, those a report may show, get their first symbol.
///
/// Only the parts the closure needs are read, with `pread`: the headers, the
/// dynamic section and the dynamic symbol, string and version tables. Mapping
/// the file would cost page faults, and unmapping it in a threaded process
/// interrupts the other CPUs that run its threads to flush their TLBs.
pub fn read_object(file: &File, reported: &dyn Fn(&str) -> bool) -> Result<ElfObject, ParseError> {
    let source = FileSource::new(file).map_err(ParseError::Unreadable)?;
    parse_from(&source, reported)
}

/// The bytes of an object: a slice in memory, or a file read at offsets.
trait Source {
    /// Returns the size of the object in bytes.
    fn size(&self) -> u64;

    /// Returns the `length` bytes at `offset`, which the caller checked to
    /// be inside the object.
    fn bytes_at(&self, offset: u64, length: usize) -> io::Result<Cow<'_, [u8]>>;
}

impl Source for &[u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn bytes_at(&self, offset: u64, length: usize) -> io::Result<Cow<'_, [u8]>> {
        let start = offset as usize;
        Ok(Cow::Borrowed(&self[start..start + length]))
    }
}

/// A file, with its first page read at once: it contains the ELF header and,
/// in practice, the program headers.
struct FileSource<'a> {
    file: &'a File,
    size: u64,
    start: Vec<u8>,
}

/// Bytes read from the start of each file. A larger first read costs more
/// in copying than it saves in reads, even for small libraries.
const FILE_START_BYTES: u64 = 4096;

impl<'a> FileSource<'a> {
    fn new(file: &'a File) -> io::Result<FileSource<'a>> {
        let size = file.metadata()?.len();
        let mut start = vec![0; size.min(FILE_START_BYTES) as usize];
        file.read_exact_at(&mut start, 0)?;
        Ok(FileSource { file, size, start })
    }
}

impl Source for FileSource<'_> {
    fn size(&self) -> u64 {
        self.size
    }

    fn bytes_at(&self, offset: u64, length: usize) -> io::Result<Cow<'_, [u8]>> {
        let start = offset as usize;
        if let Some(bytes) = self.start.get(start..start + length) {
            return Ok(Cow::Borrowed(bytes));
        }
        let mut bytes = vec![0; length];
        self.file.read_exact_at(&mut bytes, offset)?;
        Ok(Cow::Owned(bytes))
    }
}

/// Returns the `length` bytes at `offset` of `source`, or an error naming
/// `part` when they are not all in the object.
fn read_part<'s>(source: &'s impl Source, part: &str, offset: u64, length: u64) -> Result<Cow<'s, [u8]>, ParseError> {
    if length == 0 {
        return Ok(Cow::Borrowed(&[]));
    }
    let size = source.size();
    let inside = offset.checked_add(length).is_some_and(|end| end <= size);
    if !inside {
        return Err(ParseError::Invalid(format!(
            "the file ({size} bytes) is too short for the {part} at offset {offset} ({length} bytes), \
             so it is truncated or corrupt"
        )));
    }
    source.bytes_at(offset, length as usize).map_err(ParseError::Unreadable)
}

/// Turns a goblin error into the reason the object is invalid.
fn goblin<T>(result: goblin::error::Result<T>) -> Result<T, ParseError> {
    result.map_err(|error| ParseError::Invalid(format!("goblin cannot parse it: {error}")))
}

/// Parses the object in `source`: checks the magic bytes, then reads and
/// parses its parts. A panic inside goblin becomes an error.
fn parse_from(source: &impl Source, reported: &dyn Fn(&str) -> bool) -> Result<ElfObject, ParseError> {
    let magic_length = source.size().min(ELF_MAGIC.len() as u64);
    if *source
        .bytes_at(0, magic_length as usize)
        .map_err(ParseError::Unreadable)?
        != *ELF_MAGIC
    {
        return Err(ParseError::Invalid(
            "the file does not start with the ELF magic bytes 7f 45 4c 46".to_owned(),
        ));
    }

    match panic::catch_unwind(AssertUnwindSafe(|| parse_dynamic_parts(source, reported))) {
        Ok(parsed) => parsed,
        Err(_) => Err(ParseError::Invalid("goblin panicked while parsing it".to_owned())),
    }
}

/// Reads and parses only what the closure needs: the program and section
/// headers, the dynamic section, the dynamic symbol table (read one symbol at
/// a time later) and the version sections. Each part is read on its own and
/// parsed at offset 0, so every header offset into it is rebased.
fn parse_dynamic_parts(source: &impl Source, reported: &dyn Fn(&str) -> bool) -> Result<ElfObject, ParseError> {
    let header_bytes = source
        .bytes_at(0, source.size().min(64) as usize)
        .map_err(ParseError::Unreadable)?;
    let header = goblin(Elf::parse_header(&header_bytes))?;
    let ctx = Ctx::new(goblin(header.container())?, goblin(header.endianness())?);

    let phdr_size = ProgramHeader::size(ctx) as u64;
    let phdr_bytes = read_part(
        source,
        "program headers",
        header.e_phoff,
        u64::from(header.e_phnum) * phdr_size,
    )?;
    let program_headers = goblin(ProgramHeader::parse(&phdr_bytes, 0, header.e_phnum.into(), ctx))?;
    check_segments_in_file(&program_headers, source.size())?;

    let section_headers = read_section_headers(source, header.e_shoff, header.e_shnum.into(), ctx)?;

    let mut dynamic = None;
    if let Some(segment) = program_headers.iter().find(|phdr| phdr.p_type == PT_DYNAMIC) {
        let bytes = read_part(source, "dynamic section", segment.p_offset, segment.p_filesz)?;
        let mut rebased = program_headers.clone();
        if let Some(rebased_segment) = rebased.iter_mut().find(|phdr| phdr.p_type == PT_DYNAMIC) {
            rebased_segment.p_offset = 0;
        }
        dynamic = goblin(Dynamic::parse(&bytes, &rebased, ctx))?;
    }

    // The table is cut to the file: a string past its end is reported as
    // outside the table.
    let strings = match &dynamic {
        Some(dynamic) if (dynamic.info.strtab as u64) < source.size() => {
            let offset = dynamic.info.strtab as u64;
            let length = (dynamic.info.strsz as u64).min(source.size() - offset);
            DynamicStrings {
                table: read_part(source, "dynamic string table", offset, length)?,
            }
        }
        _ => DynamicStrings {
            table: Cow::Borrowed(&[]),
        },
    };

    let mut dynsym = None;
    if let Some(section) = section_headers.iter().find(|shdr| shdr.sh_type == SHT_DYNSYM) {
        let count = section.sh_size.checked_div(section.sh_entsize).unwrap_or(0);
        if count > 0 {
            let length = count.saturating_mul(Sym::size(ctx.container) as u64);
            let bytes = read_part(source, "dynamic symbol table", section.sh_offset, length)?;
            dynsym = Some((bytes, count as usize));
        }
    }

    let mut versym = Cow::Borrowed(&[][..]);
    if let Some(section) = section_headers.iter().find(|shdr| shdr.sh_type == SHT_GNU_VERSYM) {
        versym = read_part(source, "symbol version table", section.sh_offset, section.sh_size)?;
    }
    let mut verneed = None;
    if let Some(section) = section_headers.iter().find(|shdr| shdr.sh_type == SHT_GNU_VERNEED) {
        let bytes = read_part(source, "version needs", section.sh_offset, section.sh_size)?;
        let mut rebased = section.clone();
        rebased.sh_offset = 0;
        verneed = Some((bytes, rebased));
    }

    let kind = ElfKind {
        machine: header.e_machine,
        is_64: ctx.container.is_big(),
        little_endian: ctx.le.is_little(),
    };
    let mut object = ElfObject {
        kind,
        ..ElfObject::default()
    };
    read_dynamic_strings(dynamic.as_ref(), &strings, &mut object)?;
    let symbols = match &dynsym {
        Some((bytes, count)) => Some(goblin(Symtab::parse(bytes, 0, *count, ctx))?),
        None => None,
    };
    let verneed = match &verneed {
        Some((bytes, section)) => goblin(VerneedSection::parse(bytes, std::slice::from_ref(section), ctx))?,
        None => None,
    };
    object.version_needs = read_version_needs(verneed.as_ref(), symbols.as_ref(), &versym, ctx, &strings, reported)
        .map_err(ParseError::Invalid)?;
    Ok(object)
}

/// Reads the section headers at `offset`. As in goblin, offset 0 means no
/// section headers, and a count of 0 is taken from the first header's
/// sh_size (the form for more than SHN_LORESERVE sections).
fn read_section_headers(
    source: &impl Source,
    offset: u64,
    count: usize,
    ctx: Ctx,
) -> Result<Vec<SectionHeader>, ParseError> {
    if offset == 0 {
        return Ok(Vec::new());
    }
    let size = SectionHeader::size(ctx) as u64;
    let mut count = count as u64;
    if count == 0 {
        let first = read_part(source, "section headers", offset, size)?;
        count = goblin(SectionHeader::parse_from(&first, 0, 1, ctx))?[0].sh_size;
    }
    let bytes = read_part(source, "section headers", offset, count.saturating_mul(size))?;
    goblin(SectionHeader::parse_from(&bytes, 0, count as usize, ctx))
}

/// The dynamic string table, read one string at a time: goblin's
/// `Strtab::parse` checks and splits every string of it first.
struct DynamicStrings<'a> {
    table: Cow<'a, [u8]>,
}

impl DynamicStrings<'_> {
    /// Returns the NUL-terminated UTF-8 string at `offset`.
    fn get(&self, offset: usize) -> Option<&str> {
        std::str::from_utf8(self.get_bytes(offset)?).ok()
    }

    /// Returns the bytes of the NUL-terminated string at `offset`.
    fn get_bytes(&self, offset: usize) -> Option<&[u8]> {
        let rest = self.table.get(offset..)?;
        let end = rest.iter().position(|&byte| byte == 0)?;
        Some(&rest[..end])
    }
}

/// Rejects a file whose PT_LOAD segments end past the end of the file, the
/// sign of a truncated copy.
fn check_segments_in_file(program_headers: &[ProgramHeader], file_size: u64) -> Result<(), ParseError> {
    for (index, header) in program_headers.iter().enumerate() {
        if header.p_type != PT_LOAD {
            continue;
        }

        let end = header.p_offset.checked_add(header.p_filesz);
        let fits = end.is_some_and(|end| end <= file_size);
        if !fits {
            return Err(ParseError::Invalid(format!(
                "program header {index} (PT_LOAD, offset {}, size {}) ends past the end of \
                 the file ({file_size} bytes), so the file is truncated",
                header.p_offset, header.p_filesz
            )));
        }
    }
    Ok(())
}

/// Reads DT_SONAME, DT_NEEDED, DT_RPATH and DT_RUNPATH from the dynamic
/// section into `object`.
///
/// goblin skips an entry whose string offset is outside the dynamic string
/// table, so the dynamic section is walked here to report such an entry.
fn read_dynamic_strings(
    dynamic: Option<&Dynamic>,
    strings: &DynamicStrings,
    object: &mut ElfObject,
) -> Result<(), ParseError> {
    let Some(dynamic) = dynamic else {
        return Ok(());
    };

    for entry in &dynamic.dyns {
        let tag = entry.d_tag;
        if tag != DT_NEEDED && tag != DT_SONAME && tag != DT_RPATH && tag != DT_RUNPATH {
            continue;
        }

        let Some(text) = usize::try_from(entry.d_val).ok().and_then(|offset| strings.get(offset)) else {
            return Err(ParseError::Invalid(format!(
                "the {} entry points to offset {} outside the dynamic string table",
                goblin::elf::dynamic::tag_to_str(tag),
                entry.d_val
            )));
        };

        let text = text.to_owned();
        match tag {
            DT_NEEDED => object.needed.push(text),
            DT_SONAME => object.soname = Some(text),
            DT_RPATH => object.rpath.push(text),
            _ => object.runpath.push(text),
        }
    }
    Ok(())
}

/// Reads the version needs (SHT_GNU_VERNEED) and finds for each need whose
/// version `reported` accepts the first undefined dynamic symbol whose
/// SHT_GNU_VERSYM entry names it.
fn read_version_needs(
    verneed: Option<&VerneedSection>,
    symbols: Option<&Symtab>,
    versym: &[u8],
    ctx: Ctx,
    strings: &DynamicStrings,
    reported: &dyn Fn(&str) -> bool,
) -> Result<Vec<VersionNeed>, String> {
    let Some(verneed) = verneed else {
        return Ok(Vec::new());
    };

    let mut needs = Vec::new();
    // The version indexes of an object are small numbers from 2 up, so
    // they index a table of needs.
    let mut need_by_index: Vec<Option<usize>> = Vec::new();
    for need in verneed {
        let library = dynamic_string(strings, need.vn_file, "vn_file")?;
        for aux in &need {
            let version = dynamic_string(strings, aux.vna_name, "vna_name")?;
            if reported(&version) {
                let index = usize::from(aux.vna_other & goblin::elf::symver::VERSYM_VERSION);
                if need_by_index.len() <= index {
                    need_by_index.resize(index + 1, None);
                }
                need_by_index[index] = Some(needs.len());
            }
            needs.push(VersionNeed {
                library: library.clone(),
                version,
                first_symbol: None,
            });
        }
    }

    // An object that meets the policy has no reported need, so its symbols
    // are not read at all.
    let symbols = symbols.filter(|_| !need_by_index.is_empty());
    if let Some(symbols) = symbols {
        // Only the symbols whose version is a reported need are parsed:
        // most symbols of a library are its own definitions.
        let mut first_symbols: Vec<Option<&[u8]>> = vec![None; needs.len()];
        for (index, entry) in versym.chunks_exact(2).take(symbols.len()).enumerate() {
            let entry = [entry[0], entry[1]];
            let value = if ctx.le.is_little() {
                u16::from_le_bytes(entry)
            } else {
                u16::from_be_bytes(entry)
            };
            let version = usize::from(value & goblin::elf::symver::VERSYM_VERSION);
            let Some(&Some(need)) = need_by_index.get(version) else {
                continue;
            };
            let Some(symbol) = symbols.get(index) else {
                break;
            };
            if symbol.st_shndx != SHN_UNDEF as usize {
                continue;
            }
            let Some(name) = strings.get_bytes(symbol.st_name) else {
                return Err(outside_strings("st_name", symbol.st_name));
            };
            if first_symbols[need].is_none_or(|first| name < first) {
                first_symbols[need] = Some(name);
            }
        }
        // Only the name a report shows is decoded, lossily: the names are
        // compared as bytes, as ld.so does.
        for (need, first) in needs.iter_mut().zip(first_symbols) {
            need.first_symbol = first.map(|name| String::from_utf8_lossy(name).into_owned());
        }
    }

    Ok(needs)
}

fn dynamic_string(strings: &DynamicStrings, offset: usize, field: &str) -> Result<String, String> {
    match strings.get(offset) {
        Some(text) => Ok(text.to_owned()),
        None => Err(outside_strings(field, offset)),
    }
}

fn outside_strings(field: &str, offset: usize) -> String {
    format!("a {field} points to offset {offset} outside the dynamic string table")
}

/// A glibc release as (major, minor, patch), such as (2, 2, 5) for GLIBC_2.2.5.
pub type GlibcRelease = (u32, u32, u32);

/// Returns the glibc release that introduced the symbol version
/// `version_name`, or None for a name that is not a glibc release version.
///
/// GLIBC_<major>.<minor>[.<patch>] maps to that release. GLIBC_ABI_DT_RELR
/// maps to 2.36, the release that added DT_RELR support (glibc 2.36 NEWS),
/// because an object that needs it does not load on an older glibc. Other
/// names, such as GLIBC_PRIVATE, return None.
pub fn glibc_release(version_name: &str) -> Option<GlibcRelease> {
    if version_name == "GLIBC_ABI_DT_RELR" {
        return Some((2, 36, 0));
    }

    let numbers = version_name.strip_prefix("GLIBC_")?;
    let mut parts = Vec::new();
    for part in numbers.split('.') {
        if part.is_empty() || !part.bytes().all(|byte| byte.is_ascii_digit()) {
            return None;
        }
        parts.push(part.parse::<u32>().ok()?);
    }

    match parts[..] {
        [major, minor] => Some((major, minor, 0)),
        [major, minor, patch] => Some((major, minor, patch)),
        _ => None,
    }
}

/// Returns whether the version name `version_name` is a glibc release above
/// `policy.glibc_max`, which [`check_object`] reports.
pub fn above_glibc_max(version_name: &str, policy: &TargetPolicy) -> bool {
    glibc_release(version_name).is_some_and(|release| release > glibc_ceiling(policy))
}

/// Returns `policy.glibc_max` as a release, patch 0.
fn glibc_ceiling(policy: &TargetPolicy) -> GlibcRelease {
    (policy.glibc_max.major, policy.glibc_max.minor, 0)
}

/// Checks one object against the policy and returns its problems.
///
/// `file` is the object's host path and `needed_by` the objects that need
/// it, empty for a root. An object of the wrong machine, class or byte order
/// gets only that problem. Otherwise a DT_RUNPATH is a problem, and so is a
/// version need above `policy.glibc_max`, reported once with the highest
/// version.
pub fn check_object(file: &Path, needed_by: &[PathBuf], object: &ElfObject, policy: &TargetPolicy) -> Vec<Problem> {
    let expected = policy.machine.expected_kind();
    if object.kind != expected {
        return vec![Problem::WrongArchitecture {
            file: file.to_owned(),
            needed_by: needed_by.to_vec(),
            found: object.kind,
            expected,
        }];
    }

    let mut problems = Vec::new();

    if !object.runpath.is_empty() {
        problems.push(Problem::Runpath {
            file: file.to_owned(),
            runpath: object.runpath.join(":"),
        });
    }

    if let Some(problem) = check_glibc_versions(file, object, policy) {
        problems.push(problem);
    }

    problems
}

/// Returns a problem naming the highest glibc version above
/// `policy.glibc_max` that `object` needs, if any.
fn check_glibc_versions(file: &Path, object: &ElfObject, policy: &TargetPolicy) -> Option<Problem> {
    let too_new = object
        .version_needs
        .iter()
        .filter_map(|need| Some((glibc_release(&need.version)?, need)))
        .filter(|(release, _)| *release > glibc_ceiling(policy));

    // Highest release first. Among needs of the same release, the first
    // library by name wins, so that the message does not depend on section order.
    let (_, need) = too_new.min_by(|(left_release, left), (right_release, right)| {
        right_release
            .cmp(left_release)
            .then_with(|| left.library.cmp(&right.library))
            .then_with(|| left.first_symbol.is_none().cmp(&right.first_symbol.is_none()))
    })?;

    Some(Problem::GlibcTooNew {
        file: file.to_owned(),
        version: need.version.clone(),
        symbol: need.first_symbol.clone(),
        library: need.library.clone(),
        glibc_max: policy.glibc_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::closure::fixtures::{self, Sysroot};
    use crate::closure::{ElfMachine, GlibcVersion};

    fn policy(glibc_max: &str) -> TargetPolicy {
        TargetPolicy {
            machine: fixtures::host_machine(),
            glibc_max: glibc_max.parse().unwrap(),
            system_sonames: Default::default(),
            search_dirs: Vec::new(),
        }
    }

    fn host_object() -> ElfObject {
        ElfObject {
            kind: fixtures::host_machine().expected_kind(),
            ..ElfObject::default()
        }
    }

    #[test]
    fn parse_reads_soname_needed_and_rpath() {
        let sysroot = Sysroot::new();
        let base = sysroot.library(
            "/usr/lib/libbase.so.1",
            "libbase.so.1",
            "int base(void) { return 1; }",
            &[],
        );
        let mid = sysroot.library(
            "/usr/lib/libmid.so.2",
            "libmid.so.2",
            "int base(void); int mid(void) { return base(); }",
            &[
                base.display().to_string(),
                "-Wl,--disable-new-dtags".to_owned(),
                "-Wl,-rpath,/opt/lib:$ORIGIN/../lib".to_owned(),
            ],
        );

        let object = parse_object(&std::fs::read(mid).unwrap()).unwrap();

        assert_eq!(object.kind, fixtures::host_machine().expected_kind());
        assert_eq!(object.soname.as_deref(), Some("libmid.so.2"));
        assert!(
            object.needed.contains(&"libbase.so.1".to_owned()),
            "needed: {:?}",
            object.needed
        );
        assert_eq!(object.rpath, vec!["/opt/lib:$ORIGIN/../lib".to_owned()]);
        assert!(object.runpath.is_empty());
    }

    #[test]
    fn parse_reads_runpath() {
        let sysroot = Sysroot::new();
        let library = sysroot.library(
            "/usr/lib/librun.so.1",
            "librun.so.1",
            "int run(void) { return 1; }",
            &["-Wl,--enable-new-dtags".to_owned(), "-Wl,-rpath,/opt/lib".to_owned()],
        );

        let object = parse_object(&std::fs::read(library).unwrap()).unwrap();

        assert_eq!(object.runpath, vec!["/opt/lib".to_owned()]);
        assert!(object.rpath.is_empty());
    }

    #[test]
    fn parse_binds_symbols_to_version_needs() {
        let sysroot = Sysroot::new();
        let library = sysroot.library(
            "/usr/lib/libhypot.so.1",
            "libhypot.so.1",
            fixtures::HYPOT_SOURCE,
            &["-lm".to_owned()],
        );

        let object = parse_object(&std::fs::read(library).unwrap()).unwrap();

        let hypot_need = object
            .version_needs
            .iter()
            .find(|need| need.first_symbol.as_deref() == Some("hypot"))
            .unwrap_or_else(|| panic!("no need binds hypot: {:?}", object.version_needs));
        assert_eq!(hypot_need.library, "libm.so.6");
        assert!(
            hypot_need.version.starts_with("GLIBC_2."),
            "version {}",
            hypot_need.version
        );
    }

    /// Builds a library in /usr/lib of `sysroot` that calls libm's hypot and
    /// has the DT_RPATH /opt/lib.
    fn hypot_library_with_rpath(sysroot: &Sysroot, soname: &str) -> PathBuf {
        sysroot.library(
            &format!("/usr/lib/{soname}"),
            soname,
            fixtures::HYPOT_SOURCE,
            &[
                "-lm".to_owned(),
                "-Wl,--disable-new-dtags".to_owned(),
                "-Wl,-rpath,/opt/lib".to_owned(),
            ],
        )
    }

    #[test]
    fn read_object_matches_parse_object() {
        let sysroot = Sysroot::new();
        let library = hypot_library_with_rpath(&sysroot, "libread.so.1");
        let bytes = std::fs::read(&library).unwrap();
        assert!(
            bytes.len() as u64 > FILE_START_BYTES,
            "the fixture fits in the first read"
        );

        let from_file = read_object(&File::open(&library).unwrap(), &|_| true).unwrap();

        assert_eq!(from_file, parse_object(&bytes).unwrap());
        assert_eq!(from_file.rpath, ["/opt/lib"]);
        assert!(from_file
            .version_needs
            .iter()
            .any(|need| need.first_symbol.as_deref() == Some("hypot")));
    }

    #[test]
    fn read_object_finds_symbols_of_reported_needs_only() {
        let sysroot = Sysroot::new();
        let library = hypot_library_with_rpath(&sysroot, "libm2.so.1");
        let file = File::open(&library).unwrap();

        let all = read_object(&file, &|_| true).unwrap();
        let left_out = all.version_needs[0].version.clone();
        let some = read_object(&file, &|version| version != left_out).unwrap();
        let none = read_object(&file, &|_| false).unwrap();

        let versions = |object: &ElfObject| -> Vec<String> {
            object.version_needs.iter().map(|need| need.version.clone()).collect()
        };
        assert_eq!(versions(&none), versions(&all));
        assert!(none.version_needs.iter().all(|need| need.first_symbol.is_none()));
        assert!(all.version_needs.iter().all(|need| need.first_symbol.is_some()));
        assert!(all.version_needs.len() >= 2, "{:?}", all.version_needs);
        for (need, full) in some.version_needs.iter().zip(&all.version_needs) {
            if need.version == left_out {
                assert_eq!(need.first_symbol, None, "{need:?}");
            } else {
                assert_eq!(need.first_symbol, full.first_symbol, "{need:?}");
            }
        }
    }

    #[test]
    fn read_object_rejects_truncated_file() {
        let sysroot = Sysroot::new();
        let library = sysroot.library(
            "/usr/lib/libcut.so.1",
            "libcut.so.1",
            "int cut(void) { return 1; }",
            &[],
        );
        let bytes = std::fs::read(&library).unwrap();
        std::fs::write(&library, &bytes[..bytes.len() - 100]).unwrap();

        let error = read_object(&File::open(&library).unwrap(), &|_| true).unwrap_err();

        let ParseError::Invalid(reason) = error else {
            panic!("expected an invalid object: {error:?}");
        };
        assert!(reason.contains("too short"), "reason: {reason}");
    }

    #[test]
    fn parse_rejects_text_file() {
        let error = parse_object(b"#!/bin/sh\necho php\n").unwrap_err();

        assert!(error.contains("ELF magic"), "error: {error}");
    }

    #[test]
    fn parse_rejects_truncated_library() {
        let sysroot = Sysroot::new();
        let library = sysroot.library(
            "/usr/lib/libcut.so.1",
            "libcut.so.1",
            "int cut(void) { return 1; }",
            &[],
        );
        let bytes = std::fs::read(library).unwrap();

        let at_100_bytes = parse_object(&bytes[..100]);
        let at_half = parse_object(&bytes[..bytes.len() / 2]);

        assert!(at_100_bytes.is_err(), "parsed 100 bytes: {at_100_bytes:?}");
        assert!(at_half.is_err(), "parsed half the file: {at_half:?}");
    }

    #[test]
    fn parse_survives_every_truncation_and_corruption() {
        let sysroot = Sysroot::new();
        let library = hypot_library_with_rpath(&sysroot, "libfuzz.so.1");
        let bytes = std::fs::read(library).unwrap();

        // Every prefix length up to the end of the headers, then a coarser step.
        let lengths = (0..bytes.len().min(4096)).chain((4096..bytes.len()).step_by(61));
        for length in lengths {
            let _ = parse_object(&bytes[..length]);
        }

        // Overwrite single bytes with values that break offsets and counts.
        // A simple linear congruential generator keeps the positions reproducible.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..3000 {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let position = (state >> 33) as usize % bytes.len();
            let mut corrupt = bytes.clone();
            corrupt[position] = [0x00, 0xff, 0x7f, 0x80][(state >> 20) as usize % 4];
            let _ = parse_object(&corrupt);
        }
    }

    #[test]
    fn glibc_release_parses_version_names() {
        let cases = [
            ("GLIBC_2.34", Some((2, 34, 0))),
            ("GLIBC_2.2.5", Some((2, 2, 5))),
            ("GLIBC_ABI_DT_RELR", Some((2, 36, 0))),
            ("GLIBC_PRIVATE", None),
            ("GLIBC_2", None),
            ("GLIBC_2.34.1.1", None),
            ("GLIBC_2..3", None),
            ("GCC_3.0", None),
            ("OPENSSL_3.0.0", None),
        ];

        for (name, expected) in cases {
            assert_eq!(glibc_release(name), expected, "version name {name}");
        }
    }

    #[test]
    fn check_rejects_foreign_machine() {
        let object = ElfObject {
            kind: ElfKind {
                machine: ElfMachine::Aarch64.e_machine(),
                is_64: true,
                little_endian: true,
            },
            ..ElfObject::default()
        };
        let mut policy = policy("2.34");
        policy.machine = ElfMachine::X86_64;
        let needer = PathBuf::from("/sysroot/bin/php");

        let problems = check_object(
            Path::new("/sysroot/lib/libz.so.1"),
            std::slice::from_ref(&needer),
            &object,
            &policy,
        );

        assert_eq!(
            problems,
            vec![Problem::WrongArchitecture {
                file: PathBuf::from("/sysroot/lib/libz.so.1"),
                needed_by: vec![needer],
                found: object.kind,
                expected: ElfMachine::X86_64.expected_kind(),
            }]
        );
    }

    #[test]
    fn check_rejects_32_bit_class() {
        let mut object = host_object();
        object.kind.is_64 = false;

        let problems = check_object(Path::new("/sysroot/lib/libz.so.1"), &[], &object, &policy("2.34"));

        assert_eq!(problems.len(), 1, "problems: {problems:?}");
        let message = problems[0].to_string();
        assert!(message.contains("32-bit"), "message: {message}");
        assert!(message.contains("root /sysroot/lib/libz.so.1"), "message: {message}");
    }

    #[test]
    fn check_reports_highest_glibc_version() {
        let mut object = host_object();
        object.version_needs = vec![
            VersionNeed {
                library: "libc.so.6".to_owned(),
                version: "GLIBC_2.35".to_owned(),
                first_symbol: Some("pthread_create".to_owned()),
            },
            VersionNeed {
                library: "libm.so.6".to_owned(),
                version: "GLIBC_2.38".to_owned(),
                first_symbol: Some("fmaximum".to_owned()),
            },
            VersionNeed {
                library: "libc.so.6".to_owned(),
                version: "GLIBC_PRIVATE".to_owned(),
                first_symbol: Some("__libc_secure".to_owned()),
            },
        ];

        let problems = check_object(Path::new("/sysroot/bin/php"), &[], &object, &policy("2.34"));

        assert_eq!(
            problems,
            vec![Problem::GlibcTooNew {
                file: PathBuf::from("/sysroot/bin/php"),
                version: "GLIBC_2.38".to_owned(),
                symbol: Some("fmaximum".to_owned()),
                library: "libm.so.6".to_owned(),
                glibc_max: GlibcVersion { major: 2, minor: 34 },
            }]
        );
    }

    #[test]
    fn check_accepts_versions_up_to_glibc_max() {
        let mut object = host_object();
        object.version_needs = vec![VersionNeed {
            library: "libc.so.6".to_owned(),
            version: "GLIBC_2.34".to_owned(),
            first_symbol: Some("__libc_start_main".to_owned()),
        }];

        let problems = check_object(Path::new("/sysroot/bin/php"), &[], &object, &policy("2.34"));

        assert_eq!(problems, Vec::new());
    }

    #[test]
    fn check_counts_patch_release_above_minor() {
        let mut object = host_object();
        object.version_needs = vec![VersionNeed {
            library: "libc.so.6".to_owned(),
            version: "GLIBC_2.2.5".to_owned(),
            first_symbol: Some("malloc".to_owned()),
        }];

        let problems = check_object(Path::new("/sysroot/bin/php"), &[], &object, &policy("2.2"));

        assert_eq!(problems.len(), 1, "problems: {problems:?}");
        assert!(problems[0].to_string().contains("malloc@GLIBC_2.2.5"));
    }

    #[test]
    fn check_reports_runpath() {
        let mut object = host_object();
        object.runpath = vec!["/opt/lib".to_owned(), "$ORIGIN".to_owned()];

        let problems = check_object(Path::new("/sysroot/bin/php"), &[], &object, &policy("2.34"));

        assert_eq!(
            problems,
            vec![Problem::Runpath {
                file: PathBuf::from("/sysroot/bin/php"),
                runpath: "/opt/lib:$ORIGIN".to_owned(),
            }]
        );
    }
}
