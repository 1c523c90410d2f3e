//! Shared-library closure of a set of ELF roots, resolved inside a sysroot.
//!
//! The roots are the PHP binaries and every extension `.so`. Each extension
//! is its own root because PHP loads it with dlopen. The closure reads
//! DT_NEEDED, DT_RPATH and DT_RUNPATH with goblin and searches the sysroot the
//! way glibc's ld.so searches `/`. It never runs ldd or the target's loader,
//! and it never looks at the host's own library directories. Every object
//! found is checked against the [`TargetPolicy`] of the Lambda runtime.

mod elf;
mod resolve;
mod search;
mod sysroot;

#[cfg(test)]
mod fixtures;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Serialize;

/// CPU architecture of the target, as recorded in an ELF header's e_machine.
///
/// Every target is 64-bit little-endian.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ElfMachine {
    /// AMD64, e_machine EM_X86_64 (62).
    X86_64,
    /// 64-bit ARM, e_machine EM_AARCH64 (183).
    Aarch64,
}

impl ElfMachine {
    /// Returns the e_machine value of the architecture.
    pub fn e_machine(self) -> u16 {
        match self {
            ElfMachine::X86_64 => goblin::elf::header::EM_X86_64,
            ElfMachine::Aarch64 => goblin::elf::header::EM_AARCH64,
        }
    }

    /// Returns the ELF kind that every object of this target must have.
    pub fn expected_kind(self) -> ElfKind {
        ElfKind {
            machine: self.e_machine(),
            is_64: true,
            little_endian: true,
        }
    }
}

impl fmt::Display for ElfMachine {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElfMachine::X86_64 => formatter.write_str("x86_64"),
            ElfMachine::Aarch64 => formatter.write_str("aarch64"),
        }
    }
}

/// Header fields that decide whether an ELF object can load on a target:
/// e_machine, class (EI_CLASS) and byte order (EI_DATA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ElfKind {
    /// e_machine of the header.
    pub machine: u16,
    /// True for ELFCLASS64, false for ELFCLASS32.
    pub is_64: bool,
    /// True for ELFDATA2LSB, false for ELFDATA2MSB.
    pub little_endian: bool,
}

impl Default for ElfKind {
    /// Returns EM_NONE, 64-bit little-endian.
    fn default() -> Self {
        ElfKind {
            machine: goblin::elf::header::EM_NONE,
            is_64: true,
            little_endian: true,
        }
    }
}

impl fmt::Display for ElfKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let class = if self.is_64 { "64-bit" } else { "32-bit" };
        let byte_order = if self.little_endian {
            "little-endian"
        } else {
            "big-endian"
        };
        let name = goblin::elf::header::machine_to_str(self.machine);
        write!(
            formatter,
            "EM_{name} (e_machine {}), {class} {byte_order}",
            self.machine
        )
    }
}

/// A glibc release, such as 2.34.
///
/// The order is numeric: 2.9 < 2.34.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GlibcVersion {
    /// Major version, 2 for every glibc release since 1997.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

impl FromStr for GlibcVersion {
    type Err = ParseGlibcVersionError;

    /// Parses `major.minor`, such as "2.34".
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || ParseGlibcVersionError { text: text.to_owned() };

        let (major, minor) = text.split_once('.').ok_or_else(invalid)?;
        let is_number = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
        if !is_number(major) || !is_number(minor) {
            return Err(invalid());
        }

        Ok(GlibcVersion {
            major: major.parse().map_err(|_| invalid())?,
            minor: minor.parse().map_err(|_| invalid())?,
        })
    }
}

impl fmt::Display for GlibcVersion {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}.{}", self.major, self.minor)
    }
}

/// Error of [`GlibcVersion::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid glibc version {text:?}: expected major.minor, such as \"2.34\"")]
pub struct ParseGlibcVersionError {
    /// The rejected input.
    pub text: String,
}

/// Architecture, glibc release and library search path of the target
/// platform, against which every object is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetPolicy {
    /// Architecture that every root and library must be built for.
    pub machine: ElfMachine,
    /// Newest glibc release that the target ships. An object that needs a
    /// symbol version of a newer release does not load.
    pub glibc_max: GlibcVersion,
    /// Sonames the target's glibc provides (libc.so.6, libm.so.6, ld-linux-x86-64.so.2, ...): never bundled, and not followed further.
    pub system_sonames: BTreeSet<String>,
    /// Default library directories of the target, as absolute paths inside the sysroot, in search order (e.g. "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib", "/usr/lib").
    pub search_dirs: Vec<PathBuf>,
}

/// A library that the layer must ship in `/opt/lib`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BundledLibrary {
    /// Name the objects ask for in DT_NEEDED, and the file name to install it under.
    pub soname: String,
    /// Host path of the file found under the soname (may be a symlink), e.g. <sysroot>/usr/lib/x86_64-linux-gnu/libcurl.so.4
    ///
    /// Every directory in it is a real directory, but the last component may
    /// be a symlink whose target is only valid inside the sysroot. Read the
    /// library from `real_path`.
    pub path: PathBuf,
    /// Host path after following symlinks inside the sysroot, e.g. <sysroot>/usr/lib/x86_64-linux-gnu/libcurl.so.4.7.0
    pub real_path: PathBuf,
    /// Objects (roots or bundled libraries, host paths) whose DT_NEEDED names this soname; sorted.
    ///
    /// A root appears under the path the caller passed, a bundled library
    /// under its `path`.
    pub needed_by: Vec<PathBuf>,
}

/// Libraries that the roots need and the target does not provide.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Closure {
    /// One entry per soname, sorted by soname.
    pub libraries: Vec<BundledLibrary>,
}

/// One reason why the closure of a set of roots cannot be shipped.
///
/// Each message names the file concerned and the fix.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
pub enum Problem {
    /// A root whose path is not inside the sysroot.
    #[error(
        "root {root} is outside the sysroot {sysroot}; pass the path of the \
         file inside the sysroot"
    )]
    RootOutsideSysroot { root: PathBuf, sysroot: PathBuf },

    /// A root or library that could not be read.
    #[error(
        "cannot read {file}{}: {message}; check that the file exists and is \
         readable",
        describe_needed_by(needed_by)
    )]
    Unreadable {
        file: PathBuf,
        needed_by: Vec<PathBuf>,
        message: String,
    },

    /// A root or library that is not a valid ELF object, such as a text file
    /// or a truncated library.
    #[error(
        "{file}{} is not a valid ELF object: {reason}; rebuild or reinstall \
         it, and check that it was not truncated",
        describe_needed_by(needed_by)
    )]
    InvalidElf {
        file: PathBuf,
        needed_by: Vec<PathBuf>,
        reason: String,
    },

    /// A DT_NEEDED soname found in no directory of the search path.
    #[error(
        "{needed_by} needs {soname}, which is not in {} (inside the sysroot \
         {sysroot}); install the package that ships {soname} in the build \
         root, or add {soname} to the policy's system libraries if the target \
         platform provides it",
        describe_dirs(searched)
    )]
    NotFound {
        needed_by: PathBuf,
        soname: String,
        searched: Vec<PathBuf>,
        sysroot: PathBuf,
    },

    /// A DT_NEEDED entry that is a path (it contains a slash). ld.so opens
    /// such a path as written, so the copy in the layer's /opt/lib is not used.
    #[error(
        "{needed_by} needs {name}, a path that ld.so opens as written on the \
         target instead of searching /opt/lib; link against the library by \
         soname (-lNAME or the library file without a path)"
    )]
    PathNeeded { needed_by: PathBuf, name: String },

    /// A path inside the sysroot whose symlinks loop or lead outside the sysroot.
    #[error(
        "{}cannot follow {path} inside the sysroot {sysroot}: {reason}; fix the \
         symlink so that it stays inside the sysroot",
        describe_lookup(needed_by, soname)
    )]
    BadPath {
        /// Object whose DT_NEEDED led to the path, if any.
        needed_by: Option<PathBuf>,
        /// The DT_NEEDED name looked up, if any.
        soname: Option<String>,
        /// Path inside the sysroot, such as /usr/lib/x86_64-linux-gnu/libfoo.so.1.
        path: PathBuf,
        sysroot: PathBuf,
        reason: String,
    },

    /// An entry of DT_RPATH or DT_RUNPATH that cannot be mapped into the sysroot.
    #[error(
        "{file} has the {tag} entry {entry:?}, which the closure cannot \
         resolve: {reason}; use an absolute directory or one that starts with \
         $ORIGIN"
    )]
    UnsupportedSearchPath {
        file: PathBuf,
        /// "DT_RPATH" or "DT_RUNPATH".
        tag: String,
        entry: String,
        reason: String,
    },

    /// A library built for another machine, class or byte order than the
    /// target, or a root built so.
    #[error(
        "{}{file}{} is {found}, but the target needs {expected}; {}",
        describe_root(needed_by),
        describe_needed_by(needed_by),
        describe_architecture_fix(needed_by)
    )]
    WrongArchitecture {
        file: PathBuf,
        /// Objects that need the file, empty for a root.
        needed_by: Vec<PathBuf>,
        found: ElfKind,
        expected: ElfKind,
    },

    /// An object that needs a symbol version of a glibc newer than the target's.
    #[error(
        "{file} needs {} from {library}, but the target's glibc is {glibc_max}; \
         build against an older glibc (the build root)",
        describe_versioned_symbol(symbol, version)
    )]
    GlibcTooNew {
        file: PathBuf,
        /// Highest glibc version name the object needs, such as GLIBC_2.35.
        version: String,
        /// One undefined symbol bound to that version, such as hypot.
        symbol: Option<String>,
        /// Library named by the version need (vn_file), such as libm.so.6.
        library: String,
        glibc_max: GlibcVersion,
    },

    /// An object with a DT_RUNPATH entry.
    #[error(
        "{file} has DT_RUNPATH {runpath:?}; ld.so searches a DT_RUNPATH after \
         LD_LIBRARY_PATH, so the Lambda base image's libraries would shadow the \
         bundled ones; link it with -Wl,--disable-new-dtags to get a DT_RPATH"
    )]
    Runpath { file: PathBuf, runpath: String },

    /// One soname that two objects resolve to two different files, while the
    /// layer can ship only one of them.
    #[error(
        "{soname} is two different files: {first} for {first_needed_by} and \
         {second} for {second_needed_by}; the layer's /opt/lib can hold only \
         one, so remove one copy or give both objects the same DT_RPATH"
    )]
    ConflictingSoname {
        soname: String,
        first: PathBuf,
        first_needed_by: PathBuf,
        second: PathBuf,
        second_needed_by: PathBuf,
    },
}

fn describe_needed_by(needed_by: &[PathBuf]) -> String {
    if needed_by.is_empty() {
        return String::new();
    }
    format!(" (needed by {})", join_paths(needed_by))
}

fn describe_dirs(dirs: &[PathBuf]) -> String {
    if dirs.is_empty() {
        return "any directory (the search path is empty)".to_owned();
    }
    join_paths(dirs)
}

fn describe_lookup(needed_by: &Option<PathBuf>, soname: &Option<String>) -> String {
    match (needed_by, soname) {
        (Some(needed_by), Some(soname)) => {
            format!("{} needs {soname}, but ", needed_by.display())
        }
        (Some(needed_by), None) => format!("{}: ", needed_by.display()),
        (None, _) => String::new(),
    }
}

fn describe_root(needed_by: &[PathBuf]) -> &'static str {
    if needed_by.is_empty() {
        return "root ";
    }
    ""
}

fn describe_architecture_fix(needed_by: &[PathBuf]) -> &'static str {
    if needed_by.is_empty() {
        return "build it with the target's compiler in the build root";
    }
    "install the library's build for the target architecture in the build \
     root and remove this file from the search path (ld.so would skip this \
     file and load the next match, but the closure does not rely on that)"
}

fn describe_versioned_symbol(symbol: &Option<String>, version: &str) -> String {
    match symbol {
        Some(symbol) => format!("{symbol}@{version}"),
        None => format!("{version} (no undefined symbol is bound to it)"),
    }
}

fn join_paths(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|path| path.display().to_string()).collect();
    names.join(", ")
}

/// Every problem found while computing a closure.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ClosureError {
    /// Sorted and without duplicates.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ClosureError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        let noun = if count == 1 { "problem" } else { "problems" };
        write!(formatter, "the shared-library closure has {count} {noun}:")?;
        for problem in &self.problems {
            write!(formatter, "\n  - {problem}")?;
        }
        Ok(())
    }
}

/// Computes the libraries that `roots` need and the target does not provide,
/// resolving every DT_NEEDED inside `sysroot`.
///
/// `roots` are host paths of ELF files inside the sysroot. Each is resolved
/// on its own, as a dlopen'ed extension is. The search order is that of
/// glibc's ld.so: the DT_RPATH of the object and of its loaders (unless the
/// object has a DT_RUNPATH), then the DT_RUNPATH, then
/// `policy.search_dirs`. Every absolute path, symlink targets included, is
/// taken inside the sysroot.
///
/// Returns every problem of the run at once: missing or invalid libraries,
/// foreign architectures, glibc symbol versions above `policy.glibc_max` and
/// DT_RUNPATH entries.
pub fn resolve_closure(sysroot: &Path, roots: &[PathBuf], policy: &TargetPolicy) -> Result<Closure, ClosureError> {
    let mut outcome = resolve::walk(sysroot, roots, policy);

    outcome.problems.sort();
    outcome.problems.dedup();
    if !outcome.problems.is_empty() {
        return Err(ClosureError {
            problems: outcome.problems,
        });
    }

    Ok(outcome.closure)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_version_parses_major_minor() {
        let version: GlibcVersion = "2.34".parse().unwrap();

        assert_eq!(version, GlibcVersion { major: 2, minor: 34 });
        assert_eq!(version.to_string(), "2.34");
    }

    #[test]
    fn glibc_version_rejects_invalid_text() {
        for text in ["", "2", "2.", ".34", "2.34.1", "2.x", "v2.34", " 2.34", "2.-1"] {
            let error = text.parse::<GlibcVersion>().unwrap_err();
            assert_eq!(error.text, text, "input {text:?}");
            assert!(
                error.to_string().contains("major.minor"),
                "message for {text:?}: {error}"
            );
        }
    }

    #[test]
    fn glibc_version_orders_numerically() {
        let old: GlibcVersion = "2.9".parse().unwrap();
        let new: GlibcVersion = "2.34".parse().unwrap();

        assert!(old < new);
    }

    #[test]
    fn elf_kind_display_names_machine_and_class() {
        let kind = ElfKind {
            machine: goblin::elf::header::EM_AARCH64,
            is_64: false,
            little_endian: true,
        };

        assert_eq!(kind.to_string(), "EM_AARCH64 (e_machine 183), 32-bit little-endian");
    }

    #[test]
    fn closure_error_lists_every_problem() {
        let error = ClosureError {
            problems: vec![
                Problem::Runpath {
                    file: PathBuf::from("/sysroot/bin/php"),
                    runpath: "/opt/lib".to_owned(),
                },
                Problem::NotFound {
                    needed_by: PathBuf::from("/sysroot/bin/php"),
                    soname: "libzip.so.4".to_owned(),
                    searched: vec![PathBuf::from("/opt/lib"), PathBuf::from("/usr/lib")],
                    sysroot: PathBuf::from("/sysroot"),
                },
            ],
        };

        let message = error.to_string();

        assert!(message.starts_with("the shared-library closure has 2 problems:"));
        assert!(message.contains("\n  - /sysroot/bin/php has DT_RUNPATH \"/opt/lib\""));
        assert!(message.contains("\n  - /sysroot/bin/php needs libzip.so.4, which is not in /opt/lib, /usr/lib"));
    }
}
