//! `cargo xtask test --stage php`: checks the compiled PHP of each cell
//! without assembling layers. The binaries run inside their build root
//! (through qemu for a cross-compiled target): `php -v` and `php-fpm -v`
//! report the release, and `php -m` with every shared extension loaded
//! lists exactly the modules of extensions.toml.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::build_root::BuildRoot;
use crate::compile::PhpBuild;
use crate::matrix::{Definitions, ModuleList, PhpRelease};

/// Path of the host's qemu inside the build root, for a cross-compiled target.
const QEMU_INSIDE: &str = "/usr/bin/qemu-aarch64-static";

/// Runs the checks of one compiled PHP, and returns a one-line summary.
pub fn check(
    definitions: &Definitions,
    release: &PhpRelease,
    build: &PhpBuild,
    root: &BuildRoot,
    cross: bool,
) -> Result<String> {
    let prefix = inside(root, &build.prefix())?;
    let extension_dir = inside(root, &build.extension_dir()?)?;
    let run = |binary: &str, args: &[String]| -> Result<String> {
        let program = format!("{prefix}/{binary}");
        let mut command = if cross {
            root.command(QEMU_INSIDE)
                .bind_ro(&which_qemu()?, QEMU_INSIDE)
                .arg(program.clone())
        } else {
            root.command(&program)
        };
        command = command.args(args.iter().map(String::as_str));
        let output = command
            .build()
            .output()
            .with_context(|| format!("failed to start {program}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            bail!(
                "`{binary} {}` failed with {}:\n{stdout}{}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(stdout)
    };

    for (binary, sapi) in [("bin/php", "cli"), ("sbin/php-fpm", "fpm-fcgi")] {
        let version = run(binary, &["-n".to_string(), "-v".to_string()])?;
        let expected = format!("PHP {} ({sapi})", release.version);
        if !version.starts_with(&expected) {
            bail!("`{binary} -v` does not start with {expected:?}:\n{version}");
        }
    }

    // Every shared extension loaded, the shared-off ones included.
    let mut args = vec![
        "-n".to_string(),
        "-d".to_string(),
        format!("extension_dir={extension_dir}"),
    ];
    let mut all_shared = Vec::new();
    for extension in definitions.extensions.shared() {
        let file = extension.file.as_deref().unwrap_or_default();
        let directive = if extension.zend { "zend_extension" } else { "extension" };
        args.push("-d".to_string());
        args.push(format!("{directive}={file}"));
        all_shared.push(extension.name.as_str());
    }
    args.push("-m".to_string());
    let listed = parse_modules(&run("bin/php", &args)?);
    let expected = definitions.extensions.expected_modules(&all_shared);
    compare_modules(&expected, &listed)?;
    Ok(format!(
        "php {} ({}): php and php-fpm report the release, {} modules as declared",
        release.version,
        root.arch,
        listed.php_modules.len()
    ))
}

/// Returns `path` as seen inside the root.
fn inside(root: &BuildRoot, path: &Path) -> Result<String> {
    let relative = path
        .strip_prefix(&root.path)
        .with_context(|| format!("{} is not inside the build root", path.display()))?;
    Ok(format!("/{}", relative.display()))
}

fn which_qemu() -> Result<std::path::PathBuf> {
    crate::host::ensure(&[crate::host::QEMU_AARCH64])?;
    let path = std::path::PathBuf::from("/usr/bin/qemu-aarch64-static");
    if !path.is_file() {
        bail!("{} is missing", path.display());
    }
    Ok(path)
}

/// Splits the output of `php -m` into its two sections.
pub fn parse_modules(output: &str) -> ModuleList {
    let mut php_modules = BTreeSet::new();
    let mut zend_modules = BTreeSet::new();
    let mut in_zend = false;
    for line in output.lines().map(str::trim).filter(|line| !line.is_empty()) {
        match line {
            "[PHP Modules]" => in_zend = false,
            "[Zend Modules]" => in_zend = true,
            module if in_zend => {
                zend_modules.insert(module.to_string());
            }
            module => {
                php_modules.insert(module.to_string());
            }
        }
    }
    ModuleList {
        php_modules,
        zend_modules,
    }
}

/// Fails with the missing and unexpected modules when the lists differ.
pub fn compare_modules(expected: &ModuleList, listed: &ModuleList) -> Result<()> {
    let mut problems = Vec::new();
    for (section, expected, listed) in [
        ("PHP", &expected.php_modules, &listed.php_modules),
        ("Zend", &expected.zend_modules, &listed.zend_modules),
    ] {
        let missing: Vec<&String> = expected.difference(listed).collect();
        let unexpected: Vec<&String> = listed.difference(expected).collect();
        if !missing.is_empty() {
            problems.push(format!("{section} modules missing: {missing:?}"));
        }
        if !unexpected.is_empty() {
            problems.push(format!("{section} modules not in extensions.toml: {unexpected:?}"));
        }
    }
    if !problems.is_empty() {
        bail!("`php -m` differs from extensions.toml: {}", problems.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_parse_into_sections() {
        let listed = parse_modules("[PHP Modules]\nCore\ncurl\nZend OPcache\n\n[Zend Modules]\nZend OPcache\n");
        assert_eq!(listed.php_modules.len(), 3);
        assert_eq!(listed.zend_modules, BTreeSet::from(["Zend OPcache".to_string()]));
    }

    #[test]
    fn module_differences_are_named() {
        let expected = parse_modules("[PHP Modules]\nCore\ncurl\n[Zend Modules]\n");
        compare_modules(&expected, &expected.clone()).unwrap();
        let listed = parse_modules("[PHP Modules]\nCore\nxml\n[Zend Modules]\n");
        let error = compare_modules(&expected, &listed).unwrap_err().to_string();
        assert!(error.contains("PHP modules missing: [\"curl\"]"), "{error}");
        assert!(error.contains("not in extensions.toml: [\"xml\"]"), "{error}");
    }
}
