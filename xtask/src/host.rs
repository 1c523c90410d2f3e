//! Host tools the build needs, installed with apt-get when missing.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};

use crate::process;

/// A program on the host and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub program: &'static str,
    pub package: &'static str,
    /// Use of the tool in the build, shown when it gets installed.
    pub purpose: &'static str,
}

pub const DEBOOTSTRAP: Tool = Tool {
    program: "debootstrap",
    package: "debootstrap",
    purpose: "creates the Debian build root",
};

pub const BWRAP: Tool = Tool {
    program: "bwrap",
    package: "bubblewrap",
    purpose: "runs commands inside the build root and the test roots",
};

pub const XZ: Tool = Tool {
    program: "xz",
    package: "xz-utils",
    purpose: "unpacks the PHP source tarball",
};

pub const QEMU_AARCH64: Tool = Tool {
    program: "qemu-aarch64-static",
    package: "qemu-user-static",
    purpose: "runs the arm64 layers in the acceptance tests",
};

pub const PYTHON3: Tool = Tool {
    program: "python3",
    package: "python3-venv",
    purpose: "installs moto, the AWS emulator the publish tests use",
};

pub const ZIP: Tool = Tool {
    program: "zip",
    package: "zip",
    purpose: "Info-ZIP, which `cargo xtask bench` compares the layer zips with",
};

pub const APT_GET: Tool = Tool {
    program: "apt-get",
    package: "apt",
    purpose: "downloads Debian source packages",
};

/// Makes sure every tool is on PATH, installing the missing ones with
/// apt-get when running as root on a Debian-like host.
pub fn ensure(tools: &[Tool]) -> Result<()> {
    let missing: Vec<&Tool> = tools
        .iter()
        .filter(|tool| find_program(tool.program).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }

    let mut packages: Vec<&str> = missing.iter().map(|tool| tool.package).collect();
    packages.sort_unstable();
    packages.dedup();
    let install_command = format!("apt-get install --yes --no-install-recommends {}", packages.join(" "));

    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| output.stdout.trim_ascii() == b"0");
    if !is_root || find_program("apt-get").is_none() {
        bail!(
            "missing host tools: {}; install them as root with: {install_command}",
            describe(&missing)
        );
    }

    eprintln!("installing host packages: {}", describe(&missing));
    let mut update = Command::new("apt-get");
    update.args(["update", "--quiet"]);
    process::run_visible(update)?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "--yes", "--quiet", "--no-install-recommends"])
        .args(&packages)
        .env("DEBIAN_FRONTEND", "noninteractive");
    process::run_visible(install)?;

    let still_missing: Vec<&Tool> = missing
        .into_iter()
        .filter(|tool| find_program(tool.program).is_none())
        .collect();
    if !still_missing.is_empty() {
        bail!(
            "{} still missing after installing their packages; check PATH",
            describe(&still_missing)
        );
    }
    Ok(())
}

fn describe(tools: &[&Tool]) -> String {
    let parts: Vec<String> = tools
        .iter()
        .map(|tool| format!("{} (package {}, {})", tool.program, tool.package, tool.purpose))
        .collect();
    parts.join(", ")
}

/// Returns the path of `program` in PATH, or in the sbin directories that
/// a non-login root shell may lack.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_program_finds_sh() {
        assert!(find_program("sh").is_some());
    }

    #[test]
    fn find_program_misses_unknown() {
        assert!(find_program("no-such-program-for-xtask").is_none());
    }
}
