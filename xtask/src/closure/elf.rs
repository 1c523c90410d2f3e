//! Dynamic-linking facts of one ELF object, read with goblin, and the checks
//! of those facts against the target policy.

use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use goblin::container::Ctx;
use goblin::elf::dynamic::Dynamic;
use goblin::elf::dynamic::{DT_NEEDED, DT_RPATH, DT_RUNPATH, DT_SONAME};
use goblin::elf::program_header::ProgramHeader;
use goblin::elf::program_header::PT_LOAD;
use goblin::elf::section_header::SHN_UNDEF;
use goblin::elf::section_header::{SectionHeader, SHT_DYNSYM};
use goblin::elf::sym::Symtab;
use goblin::elf::symver::{VerneedSection, VersymSection};
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
    /// Undefined dynamic symbols whose versym index is this version, sorted.
    pub symbols: Vec<String>,
}

/// Parses the dynamic-linking facts of the ELF object in `bytes`.
///
/// Returns the reason when `bytes` is not an ELF object, is truncated or has
/// a dynamic section that points outside the file. goblin returns errors for
/// reads past the end, and a panic inside goblin also becomes an error.
pub fn parse_object(bytes: &[u8]) -> Result<ElfObject, String> {
    if !bytes.starts_with(ELF_MAGIC) {
        return Err("the file does not start with the ELF magic bytes 7f 45 4c 46".to_owned());
    }

    let parsed = panic::catch_unwind(AssertUnwindSafe(|| parse_dynamic_parts(bytes)));
    let elf = match parsed {
        Ok(Ok(elf)) => elf,
        Ok(Err(error)) => return Err(format!("goblin cannot parse it: {error}")),
        Err(_) => return Err("goblin panicked while parsing it".to_owned()),
    };

    check_segments_in_file(&elf, bytes.len())?;

    let kind = ElfKind {
        machine: elf.header.e_machine,
        is_64: elf.is_64,
        little_endian: elf.little_endian,
    };
    let mut object = ElfObject {
        kind,
        ..ElfObject::default()
    };
    let strings = DynamicStrings::of(&elf, bytes);
    read_dynamic_strings(&elf, &strings, &mut object)?;
    object.version_needs = read_version_needs(&elf, &strings)?;
    Ok(object)
}

/// Parses only what the closure reads: the program and section headers,
/// the dynamic section, the dynamic symbol table (read one symbol at a
/// time later) and the version sections. `Elf::parse` also parses every
/// relocation and symbol, most of its time on the PHP tree's libraries.
fn parse_dynamic_parts(bytes: &[u8]) -> goblin::error::Result<Elf<'_>> {
    let header = Elf::parse_header(bytes)?;
    let ctx = Ctx::new(header.container()?, header.endianness()?);
    let mut elf = Elf::lazy_parse(header)?;
    elf.program_headers = ProgramHeader::parse(bytes, header.e_phoff as usize, header.e_phnum as usize, ctx)?;
    elf.section_headers = SectionHeader::parse(bytes, header.e_shoff as usize, header.e_shnum as usize, ctx)?;
    elf.dynamic = Dynamic::parse(bytes, &elf.program_headers, ctx)?;
    if let Some(dynsym) = elf.section_headers.iter().find(|shdr| shdr.sh_type == SHT_DYNSYM) {
        let count = dynsym.sh_size.checked_div(dynsym.sh_entsize).unwrap_or(0);
        elf.dynsyms = Symtab::parse(bytes, dynsym.sh_offset as usize, count as usize, ctx)?;
    }
    elf.versym = VersymSection::parse(bytes, &elf.section_headers, ctx)?;
    elf.verneed = VerneedSection::parse(bytes, &elf.section_headers, ctx)?;
    Ok(elf)
}

/// The dynamic string table, read one string at a time: goblin's
/// `Strtab::parse` checks and splits every string of it first.
struct DynamicStrings<'a> {
    table: &'a [u8],
}

impl<'a> DynamicStrings<'a> {
    /// Returns the table that DT_STRTAB and DT_STRSZ name, cut to the
    /// file: a string past its end is reported as outside the table.
    fn of(elf: &Elf, bytes: &'a [u8]) -> DynamicStrings<'a> {
        let table = elf
            .dynamic
            .as_ref()
            .and_then(|dynamic| {
                let start = dynamic.info.strtab;
                let end = start.checked_add(dynamic.info.strsz)?.min(bytes.len());
                bytes.get(start..end)
            })
            .unwrap_or_default();
        DynamicStrings { table }
    }

    /// Returns the NUL-terminated UTF-8 string at `offset`.
    fn get(&self, offset: usize) -> Option<&'a str> {
        let rest = self.table.get(offset..)?;
        let end = rest.iter().position(|&byte| byte == 0)?;
        std::str::from_utf8(&rest[..end]).ok()
    }
}

/// Rejects a file whose PT_LOAD segments end past the end of the file, the
/// sign of a truncated copy.
fn check_segments_in_file(elf: &Elf, file_size: usize) -> Result<(), String> {
    for (index, header) in elf.program_headers.iter().enumerate() {
        if header.p_type != PT_LOAD {
            continue;
        }

        let end = header.p_offset.checked_add(header.p_filesz);
        let fits = end.is_some_and(|end| end <= file_size as u64);
        if !fits {
            return Err(format!(
                "program header {index} (PT_LOAD, offset {}, size {}) ends past the end of \
                 the file ({file_size} bytes), so the file is truncated",
                header.p_offset, header.p_filesz
            ));
        }
    }
    Ok(())
}

/// Reads DT_SONAME, DT_NEEDED, DT_RPATH and DT_RUNPATH from the dynamic
/// section into `object`.
///
/// goblin skips an entry whose string offset is outside the dynamic string
/// table, so the dynamic section is walked here to report such an entry.
fn read_dynamic_strings(elf: &Elf, strings: &DynamicStrings, object: &mut ElfObject) -> Result<(), String> {
    let Some(dynamic) = &elf.dynamic else {
        return Ok(());
    };

    for entry in &dynamic.dyns {
        let tag = entry.d_tag;
        if tag != DT_NEEDED && tag != DT_SONAME && tag != DT_RPATH && tag != DT_RUNPATH {
            continue;
        }

        let Some(text) = usize::try_from(entry.d_val).ok().and_then(|offset| strings.get(offset)) else {
            return Err(format!(
                "the {} entry points to offset {} outside the dynamic string table",
                goblin::elf::dynamic::tag_to_str(tag),
                entry.d_val
            ));
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

/// Reads the version needs (SHT_GNU_VERNEED) and binds to each the undefined
/// dynamic symbols whose SHT_GNU_VERSYM entry names it.
fn read_version_needs(elf: &Elf, strings: &DynamicStrings) -> Result<Vec<VersionNeed>, String> {
    let Some(verneed) = &elf.verneed else {
        return Ok(Vec::new());
    };

    let mut needs = Vec::new();
    let mut need_by_index: BTreeMap<u16, usize> = BTreeMap::new();
    for need in verneed {
        let library = dynamic_string(strings, need.vn_file, "vn_file")?;
        for aux in &need {
            let version = dynamic_string(strings, aux.vna_name, "vna_name")?;
            need_by_index.insert(aux.vna_other & goblin::elf::symver::VERSYM_VERSION, needs.len());
            needs.push(VersionNeed {
                library: library.clone(),
                version,
                symbols: Vec::new(),
            });
        }
    }

    if let Some(versym) = &elf.versym {
        // Only the symbols whose version is a need are parsed: most
        // symbols of a library are its own definitions.
        for index in 0..elf.dynsyms.len() {
            let Some(entry) = versym.get_at(index) else {
                break;
            };
            let Some(&need) = need_by_index.get(&entry.version()) else {
                continue;
            };
            let Some(symbol) = elf.dynsyms.get(index) else {
                break;
            };
            if symbol.st_shndx != SHN_UNDEF as usize {
                continue;
            }
            let name = dynamic_string(strings, symbol.st_name, "st_name")?;
            needs[need].symbols.push(name);
        }
    }

    for need in &mut needs {
        need.symbols.sort();
        need.symbols.dedup();
    }
    Ok(needs)
}

fn dynamic_string(strings: &DynamicStrings, offset: usize, field: &str) -> Result<String, String> {
    match strings.get(offset) {
        Some(text) => Ok(text.to_owned()),
        None => Err(format!(
            "a {field} points to offset {offset} outside the dynamic string table"
        )),
    }
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
    let max = (policy.glibc_max.major, policy.glibc_max.minor, 0);

    let too_new = object
        .version_needs
        .iter()
        .filter_map(|need| Some((glibc_release(&need.version)?, need)))
        .filter(|(release, _)| *release > max);

    // Highest release first. Among needs of the same release, the first
    // library by name wins, so that the message does not depend on section order.
    let (_, need) = too_new.min_by(|(left_release, left), (right_release, right)| {
        right_release
            .cmp(left_release)
            .then_with(|| left.library.cmp(&right.library))
            .then_with(|| left.symbols.is_empty().cmp(&right.symbols.is_empty()))
    })?;

    Some(Problem::GlibcTooNew {
        file: file.to_owned(),
        version: need.version.clone(),
        symbol: need.symbols.first().cloned(),
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
            .find(|need| need.symbols.contains(&"hypot".to_owned()))
            .unwrap_or_else(|| panic!("no need binds hypot: {:?}", object.version_needs));
        assert_eq!(hypot_need.library, "libm.so.6");
        assert!(
            hypot_need.version.starts_with("GLIBC_2."),
            "version {}",
            hypot_need.version
        );
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
        let library = sysroot.library(
            "/usr/lib/libfuzz.so.1",
            "libfuzz.so.1",
            fixtures::HYPOT_SOURCE,
            &[
                "-lm".to_owned(),
                "-Wl,--disable-new-dtags".to_owned(),
                "-Wl,-rpath,/opt/lib".to_owned(),
            ],
        );
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
                symbols: vec!["pthread_create".to_owned()],
            },
            VersionNeed {
                library: "libm.so.6".to_owned(),
                version: "GLIBC_2.38".to_owned(),
                symbols: vec!["fmaximum".to_owned(), "fminimum".to_owned()],
            },
            VersionNeed {
                library: "libc.so.6".to_owned(),
                version: "GLIBC_PRIVATE".to_owned(),
                symbols: vec!["__libc_secure".to_owned()],
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
            symbols: vec!["__libc_start_main".to_owned()],
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
            symbols: vec!["malloc".to_owned()],
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
