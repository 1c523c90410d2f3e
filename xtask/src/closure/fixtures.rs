//! Test fixtures: small sysroots in a temporary directory, with ELF objects
//! compiled by the host's `cc`.
//!
//! The objects are built for the host, so the policies here use the host's
//! machine and Debian multiarch directory.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use tempfile::TempDir;

use super::sysroot::host_path;
use super::{ElfMachine, TargetPolicy};

/// C source of a library that calls hypot(), which needs GLIBC_2.35 from
/// libm.so.6 when built against glibc 2.35 or newer on x86_64.
pub const HYPOT_SOURCE: &str = "#include <math.h>\ndouble distance(double x, double y) { return hypot(x, y); }\n";

/// Returns the machine of the host that runs the tests.
pub fn host_machine() -> ElfMachine {
    if cfg!(target_arch = "aarch64") {
        ElfMachine::Aarch64
    } else {
        ElfMachine::X86_64
    }
}

/// Returns a machine other than the host's.
pub fn foreign_machine() -> ElfMachine {
    match host_machine() {
        ElfMachine::X86_64 => ElfMachine::Aarch64,
        ElfMachine::Aarch64 => ElfMachine::X86_64,
    }
}

/// Returns the Debian multiarch triplet of the host.
pub fn multiarch() -> &'static str {
    match host_machine() {
        ElfMachine::X86_64 => "x86_64-linux-gnu",
        ElfMachine::Aarch64 => "aarch64-linux-gnu",
    }
}

/// Returns the inner path of the sysroot's multiarch library directory,
/// /usr/lib/<triplet>.
pub fn lib_dir() -> String {
    format!("/usr/lib/{}", multiarch())
}

/// A sysroot in a temporary directory, removed when dropped.
pub struct Sysroot {
    dir: TempDir,
}

impl Sysroot {
    /// Creates an empty sysroot.
    pub fn new() -> Sysroot {
        Sysroot {
            dir: tempfile::tempdir().expect("create the temporary sysroot"),
        }
    }

    /// Returns the host path of the sysroot.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Returns the host path of `inner`, an absolute path inside the sysroot.
    pub fn host(&self, inner: &str) -> PathBuf {
        host_path(self.path(), Path::new(inner))
    }

    /// Compiles `source` into a shared library at `inner` with DT_SONAME
    /// `soname`, and returns its host path. `args` follow the source file on
    /// the cc command line, so they may name libraries to link.
    pub fn library(&self, inner: &str, soname: &str, source: &str, args: &[String]) -> PathBuf {
        let output = self.host(inner);
        let mut command_args = vec![
            "-shared".to_owned(),
            "-fPIC".to_owned(),
            format!("-Wl,-soname,{soname}"),
        ];
        command_args.extend(args.iter().cloned());
        self.compile(&output, source, &command_args);
        output
    }

    /// Compiles `source` into an executable at `inner` and returns its host
    /// path. `args` follow the source file on the cc command line.
    pub fn executable(&self, inner: &str, source: &str, args: &[String]) -> PathBuf {
        let output = self.host(inner);
        self.compile(&output, source, args);
        output
    }

    /// Creates the symlink `inner_link` with the target `target`, written
    /// as given (an absolute target is meant inside the sysroot).
    pub fn symlink(&self, inner_link: &str, target: &str) {
        let link = self.host(inner_link);
        fs::create_dir_all(link.parent().unwrap()).unwrap();
        symlink(target, &link).unwrap_or_else(|error| panic!("create symlink {}: {error}", link.display()));
    }

    /// Writes `bytes` to `inner` and returns its host path.
    pub fn write(&self, inner: &str, bytes: &[u8]) -> PathBuf {
        let path = self.host(inner);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, bytes).unwrap();
        path
    }

    /// Returns a policy for the host's machine with glibc 2.34, libc.so.6
    /// and libm.so.6 as system sonames, and Debian's multiarch search path.
    pub fn policy(&self) -> TargetPolicy {
        TargetPolicy {
            machine: host_machine(),
            glibc_max: "2.34".parse().unwrap(),
            system_sonames: BTreeSet::from(["libc.so.6".to_owned(), "libm.so.6".to_owned()]),
            search_dirs: vec![
                PathBuf::from(format!("/lib/{}", multiarch())),
                PathBuf::from(lib_dir()),
                PathBuf::from("/lib"),
                PathBuf::from("/usr/lib"),
            ],
        }
    }

    fn compile(&self, output: &Path, source: &str, args: &[String]) {
        static NEXT_SOURCE: AtomicUsize = AtomicUsize::new(0);
        let source_dir = self.path().join("fixture-sources");
        fs::create_dir_all(&source_dir).unwrap();
        let source_path = source_dir.join(format!("{}.c", NEXT_SOURCE.fetch_add(1, Ordering::Relaxed)));
        fs::write(&source_path, source).unwrap();
        fs::create_dir_all(output.parent().unwrap()).unwrap();

        // ld checks the DT_NEEDED libraries of the libraries it links
        // against, and -rpath-link lets it find them inside the sysroot.
        let rpath_link = [lib_dir(), "/opt/lib".to_owned(), "/build/stage/lib".to_owned()]
            .iter()
            .map(|inner| format!("-Wl,-rpath-link,{}", self.host(inner).display()))
            .collect::<Vec<_>>();

        let result = Command::new("cc")
            .arg("-o")
            .arg(output)
            .arg(&source_path)
            .arg("-Wl,--no-as-needed")
            .args(&rpath_link)
            .args(args)
            .output()
            .expect("run cc; the closure tests need a C compiler");
        assert!(
            result.status.success(),
            "cc failed for {}: {}",
            output.display(),
            String::from_utf8_lossy(&result.stderr)
        );
    }
}

/// Host paths of the objects of [`standard_sysroot`].
pub struct StandardObjects {
    /// /build/stage/bin/php: needs libmid.so.2 and libfoo.so.1, DT_RPATH /opt/lib.
    pub php: PathBuf,
    /// /usr/lib/<triplet>/libmid.so.2: needs libbase.so.1.
    pub libmid: PathBuf,
}

/// Builds a sysroot with a root executable and three libraries:
///
/// - /usr/lib/<triplet>/libbase.so.1.2.3, soname libbase.so.1, with the
///   relative symlink libbase.so.1 -> libbase.so.1.2.3,
/// - /usr/lib/<triplet>/libmid.so.2, needing libbase.so.1,
/// - /usr/lib/<triplet>/libfoo.so.1.0, soname libfoo.so.1, with the
///   absolute symlink libfoo.so.1 -> /usr/lib/<triplet>/libfoo.so.1.0,
/// - /build/stage/bin/php, needing libmid.so.2, libfoo.so.1 and libc.so.6,
///   linked with DT_RPATH /opt/lib.
pub fn standard_sysroot() -> (Sysroot, StandardObjects) {
    let sysroot = Sysroot::new();
    let lib_dir = lib_dir();

    let libbase = sysroot.library(
        &format!("{lib_dir}/libbase.so.1.2.3"),
        "libbase.so.1",
        "int base(void) { return 1; }\n",
        &[],
    );
    sysroot.symlink(&format!("{lib_dir}/libbase.so.1"), "libbase.so.1.2.3");

    let libmid = sysroot.library(
        &format!("{lib_dir}/libmid.so.2"),
        "libmid.so.2",
        "int base(void);\nint mid(void) { return base() + 1; }\n",
        &[libbase.display().to_string()],
    );

    let libfoo = sysroot.library(
        &format!("{lib_dir}/libfoo.so.1.0"),
        "libfoo.so.1",
        "int foo(void) { return 2; }\n",
        &[],
    );
    sysroot.symlink(&format!("{lib_dir}/libfoo.so.1"), &format!("{lib_dir}/libfoo.so.1.0"));

    let php = sysroot.executable(
        "/build/stage/bin/php",
        "int mid(void);\nint foo(void);\nint main(void) { return mid() + foo(); }\n",
        &[
            libmid.display().to_string(),
            libfoo.display().to_string(),
            "-Wl,--disable-new-dtags".to_owned(),
            "-Wl,-rpath,/opt/lib".to_owned(),
        ],
    );

    (sysroot, StandardObjects { php, libmid })
}

/// Overwrites e_machine (bytes 18..20, little-endian) of the ELF file at
/// `path` with `machine`.
pub fn set_e_machine(path: &Path, machine: ElfMachine) {
    let mut bytes = fs::read(path).unwrap();
    bytes[18..20].copy_from_slice(&machine.e_machine().to_le_bytes());
    fs::write(path, bytes).unwrap();
}
