//! `cargo xtask bench`: measures the build and writes BENCHMARKS.md.
//!
//! The numbers are wall times of real work on this machine, so they vary
//! from run to run and from machine to machine. The page records the
//! machine with them.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::build_layers::{self, Manifest};
use crate::build_root::{self, RootRecipe};
use crate::compile::{self, CompileTimings, Cross, Toolchain};
use crate::flags::{Arch, BenchArgs, Benchmark};
use crate::matrix::Definitions;
use crate::mirror::Mirrors;
use crate::{project_root, sources};

pub fn run(args: &BenchArgs) -> Result<()> {
    let project = project_root();
    let definitions = Definitions::load(&project.join("layers"))?;
    let cache_dir = args.common.cache_dir(&project);
    let out_dir = args.common.out_dir(&project);
    let path = project.join("BENCHMARKS.md");
    let old_page = fs::read_to_string(&path).unwrap_or_default();
    let mut page = if args.runs(Benchmark::Compile) {
        compile_page(args, &definitions, &cache_dir, &out_dir)?
    } else {
        render_header(args.common.jobs())
    };
    if args.runs(Benchmark::Runtime) {
        let manifest_path = out_dir.join(build_layers::MANIFEST_NAME);
        for (key, value) in crate::test::environment(&definitions, &out_dir, &cache_dir)? {
            // The isolated roots read these, as in `cargo xtask test`.
            std::env::set_var(key, value);
        }
        let figures = crate::bench_runtime::measure(&manifest_path)?;
        if !page.ends_with("\n\n") {
            page.push('\n');
        }
        page.push_str(&crate::bench_runtime::render(&figures));
    }
    if args.runs(Benchmark::Build) {
        let figures = crate::bench_build::measure(&definitions, &cache_dir, args.common.debian_mirror.as_deref())?;
        if !page.ends_with("\n\n") {
            page.push('\n');
        }
        page.push_str(&crate::bench_build::render(&figures));
    }
    if args.runs(Benchmark::Publish) {
        let figures = crate::bench_publish::measure(&cache_dir)?;
        if !page.ends_with("\n\n") {
            page.push('\n');
        }
        page.push_str(&crate::bench_publish::render(&figures));
    }
    let page = merge_sections(&old_page, &stamp_sections(&page, &run_stamp()));
    fs::write(&path, page).with_context(|| format!("failed to write {}", path.display()))?;
    eprintln!("bench: wrote {}", path.display());
    Ok(())
}

/// Compiles PHP for both architectures and returns the page with their
/// timings and the layer sizes.
fn compile_page(args: &BenchArgs, definitions: &Definitions, cache_dir: &Path, out_dir: &Path) -> Result<String> {
    let mirrors = Mirrors::discover(args.common.debian_mirror.as_deref())?;
    let host = build_root::host_arch()?;
    let jobs = args.common.jobs();
    let php = match args.php {
        Some(php) => php,
        None => *definitions
            .default_releases()
            .last()
            .context("no file under layers/php/ sets build_by_default = true: pass --php")?,
    };
    let release = definitions
        .php
        .get(&php)
        .with_context(|| format!("PHP {php} is not declared under layers/php/"))?;
    let tarball = sources::fetch(release, &mirrors, cache_dir, !args.common.no_release_urls)?;

    let mut timings = Vec::new();
    let mut native_header = None;
    for arch in [host, other_arch(host)] {
        let target = definitions.target(arch);
        let recipe = RootRecipe::new(&definitions.build_root, target, host)?;
        let root = build_root::ensure(&recipe, &mirrors, cache_dir)?;
        let cross = match (&target.cross, target.is_cross(host)) {
            (Some(spec), true) => Some(Cross {
                spec,
                build_triplet: &definitions.target(host).gnu_triplet,
                native_header: native_header.clone().context("the native build runs first")?,
            }),
            _ => None,
        };
        let toolchain = Toolchain { target, cross };

        // A directory of its own, so that the build cache is neither used
        // nor replaced.
        let dir = root
            .path
            .join("build")
            .join(format!("bench-php-{}-{arch}", release.version));
        let log = cache_dir.join("logs").join(format!("bench-compile-{arch}.log"));
        let result = compile::compile_into(definitions, release, &tarball, &root, &toolchain, &dir, &log, jobs)
            .with_context(|| format!("the benchmark compile for {arch} failed"))?;
        if !target.is_cross(host) {
            native_header = Some(compile::PhpBuild { dir: dir.clone() }.php_config_h());
        }
        timings.push((arch, result));
    }

    let manifest = read_manifest(&out_dir.join(build_layers::MANIFEST_NAME));
    let page = render(&release.version, jobs, &timings, manifest.as_ref());

    for arch in [host, other_arch(host)] {
        let target = definitions.target(arch);
        let recipe = RootRecipe::new(&definitions.build_root, target, host)?;
        if let Some(root) = build_root::find(&recipe, cache_dir) {
            let dir = root
                .path
                .join("build")
                .join(format!("bench-php-{}-{arch}", release.version));
            let _ = fs::remove_dir_all(dir);
        }
    }
    Ok(page)
}

fn other_arch(arch: Arch) -> Arch {
    match arch {
        Arch::X86_64 => Arch::Arm64,
        Arch::Arm64 => Arch::X86_64,
    }
}

fn read_manifest(path: &Path) -> Option<Manifest> {
    let text = fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

fn seconds(duration: Duration) -> String {
    format!("{:.1}", duration.as_secs_f64())
}

/// Returns the title, the introduction and the machine's description.
fn render_header(jobs: usize) -> String {
    let mut page = String::new();
    let _ = writeln!(page, "# Benchmarks\n");
    let _ = writeln!(
        page,
        "Written by `cargo xtask bench` (`--only compile`, `runtime`, `build` or\n\
         `publish` for one section): wall times on the machine below. Each\n\
         section names the day and commit of its run. Times vary from run to\n\
         run, so compare figures of the same run.\n"
    );
    let _ = writeln!(page, "## Machine\n");
    let _ = writeln!(page, "- CPU: {}", cpu_model());
    let _ = writeln!(
        page,
        "- cores: {}",
        std::thread::available_parallelism().map_or(1, |count| count.get())
    );
    let _ = writeln!(page, "- memory: {}", memory_total());
    let _ = writeln!(page, "- `make -j{jobs}`\n");
    page
}

/// Returns the line that dates the sections of this run: the day and the
/// commit, marked when the work tree has uncommitted changes.
fn run_stamp() -> String {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let day = &now[..10];
    let git = |args: &[&str]| -> Option<String> {
        let output = std::process::Command::new("git")
            .args(args)
            .current_dir(project_root())
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(commit) => {
            let changed =
                git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|status| !status.is_empty());
            let note = if changed { " with uncommitted changes" } else { "" };
            format!("Measured on {day} at commit {commit}{note}.")
        }
        None => format!("Measured on {day}."),
    }
}

/// Returns `page` with `stamp` as the first line of each section.
fn stamp_sections(page: &str, stamp: &str) -> String {
    let mut stamped = String::new();
    for line in page.split_inclusive('\n') {
        stamped.push_str(line);
        if line.starts_with("## ") {
            stamped.push_str(&format!("\n{stamp}\n"));
        }
    }
    stamped
}

/// Returns `new` with the sections (`## ` headings) of `old` that `new`
/// lacks, in `old`'s order. Sections match by heading, digits aside, so
/// "Compiling PHP 8.2.32" replaces "Compiling PHP 8.2.31".
fn merge_sections(old: &str, new: &str) -> String {
    fn split(page: &str) -> (String, Vec<(String, String)>) {
        let mut preamble = String::new();
        let mut sections: Vec<(String, String)> = Vec::new();
        for line in page.split_inclusive('\n') {
            if let Some(heading) = line.strip_prefix("## ") {
                let key: String = heading
                    .trim()
                    .chars()
                    .filter(|c| !c.is_ascii_digit() && *c != '.')
                    .collect();
                sections.push((key, String::new()));
            }
            match sections.last_mut() {
                Some((_, text)) => text.push_str(line),
                None => preamble.push_str(line),
            }
        }
        (preamble, sections)
    }
    let (_, old_sections) = split(old);
    let (preamble, mut new_sections) = split(new);
    let mut page = preamble;
    for (key, text) in &old_sections {
        match new_sections.iter().position(|(new_key, _)| new_key == key) {
            Some(index) => page.push_str(&new_sections.remove(index).1),
            None => page.push_str(text),
        }
        if !page.ends_with("\n\n") {
            page.push('\n');
        }
    }
    for (_, text) in new_sections {
        page.push_str(&text);
        if !page.ends_with("\n\n") {
            page.push('\n');
        }
    }
    page.trim_end().to_string() + "\n"
}

/// Returns the text of BENCHMARKS.md.
fn render(version: &str, jobs: usize, timings: &[(Arch, CompileTimings)], manifest: Option<&Manifest>) -> String {
    let mut page = render_header(jobs);
    let _ = writeln!(page, "## Compiling PHP {version}\n");
    let _ = writeln!(
        page,
        "Both architectures compiled one after the other in the same run, from the\n\
         same source and flags. arm64 is cross-compiled on the x86_64 machine, with\n\
         no emulation.\n"
    );
    let _ = writeln!(
        page,
        "| architecture | configure (s) | make (s) | configure + make (s) |"
    );
    let _ = writeln!(page, "|---|---:|---:|---:|");
    for (arch, timing) in timings {
        let _ = writeln!(
            page,
            "| {arch} | {} | {} | {} |",
            seconds(timing.configure),
            seconds(timing.make),
            seconds(timing.configure + timing.make)
        );
    }
    if let [(_, native), (_, cross)] = timings {
        let ratio = (cross.configure + cross.make).as_secs_f64() / (native.configure + native.make).as_secs_f64();
        let _ = writeln!(
            page,
            "\narm64 / x86_64 (configure + make): **{ratio:.2}x** (target: at most 1.30x)"
        );
    }

    if let Some(manifest) = manifest {
        let _ = writeln!(page, "\n## Layer sizes\n");
        let _ = writeln!(
            page,
            "| layer | architecture | zip (bytes) | unzipped (bytes) | bundled libraries |"
        );
        let _ = writeln!(page, "|---|---|---:|---:|---:|");
        for layer in &manifest.layers {
            let _ = writeln!(
                page,
                "| {} | {} | {} | {} | {} |",
                layer.name,
                layer.architecture,
                layer.zip_bytes,
                layer.unzipped_bytes,
                layer.libraries.len()
            );
        }
    }
    page
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

fn memory_total() -> String {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_follows_each_heading() {
        let page = "# B\n\nintro\n\n## Machine\n\n- cores: 2\n\n## Build\n\n1 ms\n";

        let stamped = stamp_sections(page, "Measured on 2026-12-05.");

        assert_eq!(
            stamped,
            "# B\n\nintro\n\n## Machine\n\nMeasured on 2026-12-05.\n\n- cores: 2\n\n## Build\n\nMeasured on 2026-12-05.\n\n1 ms\n"
        );
    }

    #[test]
    fn render_reports_ratio() {
        let timings = [
            (
                Arch::X86_64,
                CompileTimings {
                    configure: Duration::from_secs(20),
                    make: Duration::from_secs(300),
                },
            ),
            (
                Arch::Arm64,
                CompileTimings {
                    configure: Duration::from_secs(30),
                    make: Duration::from_secs(370),
                },
            ),
        ];
        let page = render("8.2.32", 2, &timings, None);
        assert!(page.contains("| x86_64 | 20.0 | 300.0 | 320.0 |"), "{page}");
        assert!(page.contains("**1.25x**"), "{page}");
    }

    #[test]
    fn merge_keeps_sections_not_measured() {
        let old = "# B\n\nold intro\n\n## Machine\n\nold cpu\n\n## Compiling PHP 8.2.31\n\n300 s\n\n## Runtime overhead\n\n1 ms\n";
        let new = "# B\n\nnew intro\n\n## Machine\n\nnew cpu\n\n## Runtime overhead\n\n0.5 ms\n";
        let merged = merge_sections(old, new);
        assert_eq!(
            merged,
            "# B\n\nnew intro\n\n## Machine\n\nnew cpu\n\n## Compiling PHP 8.2.31\n\n300 s\n\n## Runtime overhead\n\n0.5 ms\n"
        );
        let newer = "# B\n\n## Compiling PHP 8.2.32\n\n290 s\n\n## Layer sizes\n\n1\n";
        let merged = merge_sections(&merged, newer);
        assert!(merged.contains("## Compiling PHP 8.2.32\n\n290 s"), "{merged}");
        assert!(!merged.contains("8.2.31"), "{merged}");
        assert!(merged.ends_with("## Layer sizes\n\n1\n"), "{merged}");
    }
}
