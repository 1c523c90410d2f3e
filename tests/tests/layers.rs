//! Acceptance tests of every built layer, in isolated roots.
//!
//! They need the zips and manifest.json from `cargo xtask build-layers`,
//! so they are ignored by a plain `cargo test`; `cargo xtask test` builds
//! the layers and runs them.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use layer_tests::manifest::{workspace_root, xtask};
use layer_tests::{fastcgi, Layer, LayerRoot, Manifest};

fn php_script(name: &str) -> Vec<u8> {
    fs::read(workspace_root().join("tests/php").join(name)).unwrap()
}

fn root_for(layer: &Layer) -> LayerRoot {
    LayerRoot::new(layer).unwrap_or_else(|error| panic!("cannot build the test root of {}: {error:#}", layer.name))
}

/// Parses `php -m` into its two sections.
fn parse_modules(output: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut php = BTreeSet::new();
    let mut zend = BTreeSet::new();
    let mut section = None;
    for line in output.lines().map(str::trim).filter(|line| !line.is_empty()) {
        match line {
            "[PHP Modules]" => section = Some(&mut php),
            "[Zend Modules]" => section = Some(&mut zend),
            name => {
                let section = section
                    .as_mut()
                    .unwrap_or_else(|| panic!("module {name:?} before any section"));
                section.insert(name.to_string());
            }
        }
    }
    (php, zend)
}

#[test]
#[ignore = "needs built layers: run `cargo xtask test`"]
fn php_reports_version() {
    for layer in &Manifest::load().layers {
        let root = root_for(layer);
        let output = root.run("/opt/bin/php", &["-v"]);
        assert!(output.success(), "{}: php -v failed\n{output}", layer.name);
        let expected = format!("PHP {} (cli)", layer.php_version);
        assert!(
            output.stdout.starts_with(&expected),
            "{}: expected {expected:?}\n{output}",
            layer.name
        );
        assert_eq!(output.stderr, "", "{}: php -v wrote to stderr", layer.name);
        assert!(
            !root.decoys.is_empty(),
            "{}: no decoy libraries were installed",
            layer.name
        );
    }
}

#[test]
#[ignore = "needs built layers: run `cargo xtask test`"]
fn php_modules_match_manifest() {
    for layer in &Manifest::load().layers {
        let root = root_for(layer);
        let output = root.run("/opt/bin/php", &["-m"]);
        assert!(output.success(), "{}: php -m failed\n{output}", layer.name);
        let (php, zend) = parse_modules(&output.stdout);
        let expected_php: BTreeSet<String> = layer.modules.php.iter().cloned().collect();
        let expected_zend: BTreeSet<String> = layer.modules.zend.iter().cloned().collect();
        assert_eq!(php, expected_php, "{}: [PHP Modules] differ", layer.name);
        assert_eq!(zend, expected_zend, "{}: [Zend Modules] differ", layer.name);
    }
}

#[test]
#[ignore = "needs built layers: run `cargo xtask test`"]
fn disabled_extensions_enable_through_conf_d() {
    for layer in &Manifest::load().layers {
        let root = root_for(layer);
        let ini: String = layer
            .disabled_extensions
            .values()
            .map(|file| format!("extension={}\n", file.trim_end_matches(".so")))
            .collect();
        assert!(
            !ini.is_empty(),
            "{}: the manifest lists no disabled extension",
            layer.name
        );

        let before = root.run("/opt/bin/php", &["-m"]);
        let (php_before, _) = parse_modules(&before.stdout);
        root.add_task_file("php/conf.d/50-extensions.ini", ini.as_bytes());
        let after = root.run("/opt/bin/php", &["-m"]);

        assert!(after.success(), "{}: php -m failed\n{after}", layer.name);
        assert_eq!(after.stderr, "", "{}: loading the extensions warned", layer.name);
        let (php_after, _) = parse_modules(&after.stdout);
        for name in layer.disabled_extensions.keys() {
            assert!(
                !php_before.contains(name),
                "{}: {name} is loaded by default",
                layer.name
            );
            assert!(
                php_after.contains(name),
                "{}: {name} not loaded by the conf.d ini\n{after}",
                layer.name
            );
        }
    }
}

#[test]
#[ignore = "needs built layers: run `cargo xtask test`"]
fn extensions_work_with_bundled_libraries() {
    let expected_checks = [
        "curl-uses-openssl",
        "curl-has-http2",
        "ca-bundle-present",
        "tls-server-listens",
        "curl-https-verified",
        "intl-number-format",
        "intl-collation",
        "intl-transliteration",
        "sodium-sealed-box",
        "mbstring-case",
        "mbstring-regex",
        "pdo-sqlite",
        "zip-create",
        "zip-read",
        "simplexml-xpath",
        "opcache-enabled",
        "iconv-translit",
        "iconv-gconv-module",
    ];
    for layer in &Manifest::load().layers {
        let root = root_for(layer);
        root.add_task_file("extensions.php", &php_script("extensions.php"));
        root.add_task_file("php/conf.d/50-intl.ini", b"extension=intl\n");

        let output = root.run("/opt/bin/php", &["/var/task/extensions.php"]);

        assert!(output.success(), "{}: extensions.php failed\n{output}", layer.name);
        let passed: Vec<&str> = output
            .stdout
            .lines()
            .filter_map(|line| line.strip_prefix("ok "))
            .collect();
        assert_eq!(passed, expected_checks, "{}: checks that passed\n{output}", layer.name);
        assert!(
            output.stdout.ends_with("all checks passed\n"),
            "{}\n{output}",
            layer.name
        );
    }
}

/// Stops the sandboxed php-fpm when the test ends, even on a panic.
struct RunningFpm(Child);

impl Drop for RunningFpm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "needs built layers: run `cargo xtask test`"]
fn fpm_serves_fastcgi_request() {
    let manifest = Manifest::load();
    let layers: Vec<&Layer> = manifest.of_kind("fpm").collect();
    assert!(!layers.is_empty(), "the manifest lists no fpm layer");
    for layer in layers {
        let root = root_for(layer);
        root.add_task_file("index.php", &php_script("fpm-index.php"));
        fs::create_dir_all(root.tmp.join(".php-fpm")).unwrap();
        let socket = root.tmp.join(".php-fpm/php-fpm.sock");

        let child = root
            .command(
                "/opt/bin/php-fpm",
                &[
                    "--nodaemonize",
                    "--force-stderr",
                    "--fpm-config",
                    "/opt/bref/etc/php-fpm.conf",
                ],
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("failed to start bwrap");
        let mut fpm = RunningFpm(child);
        wait_for_socket(&socket, &mut fpm, &layer.name);

        let params = [
            ("GATEWAY_INTERFACE", "FastCGI/1.0"),
            ("REQUEST_METHOD", "POST"),
            ("SCRIPT_FILENAME", "/var/task/index.php"),
            ("SCRIPT_NAME", "/index.php"),
            ("REQUEST_URI", "/index.php?name=lambda"),
            ("QUERY_STRING", "name=lambda"),
            ("CONTENT_TYPE", "text/plain"),
            ("CONTENT_LENGTH", "9"),
            ("SERVER_PROTOCOL", "HTTP/1.1"),
            ("SERVER_NAME", "localhost"),
            ("SERVER_PORT", "80"),
            ("REMOTE_ADDR", "127.0.0.1"),
        ];
        let response = fastcgi::request(&socket, &params, b"some body").unwrap();
        let text = response.stdout_text();

        assert_eq!(response.app_status, 0, "{}: {text}", layer.name);
        assert!(text.contains("X-Layer-Test: served\r\n"), "{}: {text}", layer.name);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        assert_eq!(
            body, "method=POST\nquery=lambda\nbody=some body\nsapi=fpm-fcgi\nopcache=yes\n",
            "{}",
            layer.name
        );
    }
}

fn wait_for_socket(socket: &Path, fpm: &mut RunningFpm, layer: &str) {
    let started = Instant::now();
    while !socket.exists() {
        if let Some(status) = fpm.0.try_wait().unwrap() {
            let mut stderr = String::new();
            fpm.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
            panic!("{layer}: php-fpm exited ({status}) before creating its socket:\n{stderr}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{layer}: php-fpm did not create {} within 20 s",
            socket.display()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs built layers: run `cargo xtask test`"]
fn missing_bundled_library_fails_php() {
    for layer in &Manifest::load().layers {
        let victim = layer
            .libraries
            .iter()
            .find(|library| !library.shadows_base_image && library.soname.starts_with("libonig"))
            .or_else(|| layer.libraries.iter().find(|library| !library.shadows_base_image))
            .unwrap_or_else(|| panic!("{}: no bundled library without a base-image copy", layer.name));
        let root = root_for(layer);
        root.remove_library(&victim.soname);

        let output = root.run("/opt/bin/php", &["-v"]);

        assert_eq!(
            output.code,
            Some(127),
            "{}: php ran without {}\n{output}",
            layer.name,
            victim.soname
        );
        assert!(output.stderr.contains(&victim.soname), "{}\n{output}", layer.name);
    }
}

#[test]
#[ignore = "needs built layers: run `cargo xtask test`"]
fn decoy_is_loaded_without_bundled_copy() {
    for layer in &Manifest::load().layers {
        let root = root_for(layer);
        let decoy = root
            .decoys
            .iter()
            .find(|soname| soname.starts_with("libcurl"))
            .or_else(|| root.decoys.first())
            .unwrap_or_else(|| panic!("{}: no decoy", layer.name))
            .clone();
        root.remove_library(&decoy);

        let output = root.run("/opt/bin/php", &["-v"]);

        // With the bundled copy gone, the loader finds the decoy in /lib64,
        // which lacks every symbol PHP needs. So the decoys are on the search
        // path, and the other tests passing proves that the bundled copies win.
        assert!(
            !output.success(),
            "{}: php ran with the {decoy} decoy\n{output}",
            layer.name
        );
        assert!(output.stderr.contains(&decoy), "{}\n{output}", layer.name);
        // "cannot open" would mean the loader skipped the decoy, for
        // example one built for the wrong architecture.
        assert!(
            !output.stderr.contains("cannot open shared object file"),
            "{}: the {decoy} decoy was not loaded\n{output}",
            layer.name
        );
    }
}

#[test]
#[ignore = "needs built layers: run `cargo xtask test`"]
fn zips_keep_modes_and_symlinks() {
    for layer in &Manifest::load().layers {
        let file = fs::File::open(layer.zip_path()).unwrap();
        let mut archive = zip::ZipArchive::new(file).unwrap();
        let mode = |archive: &mut zip::ZipArchive<fs::File>, name: &str| {
            let entry = archive
                .by_name(name)
                .unwrap_or_else(|_| panic!("{}: no {name}", layer.name));
            entry.unix_mode().unwrap() & 0o777
        };
        assert_eq!(mode(&mut archive, "bin/php"), 0o755, "{}", layer.name);
        assert_eq!(mode(&mut archive, "bootstrap"), 0o755, "{}", layer.name);
        assert_eq!(
            mode(&mut archive, "bref/etc/php/conf.d/10-layer.ini"),
            0o644,
            "{}",
            layer.name
        );

        let mut symlinks = 0;
        for index in 0..archive.len() {
            let entry = archive.by_index(index).unwrap();
            if entry.is_symlink() {
                symlinks += 1;
                let name = entry.name().unwrap();
                assert!(name.starts_with("lib/"), "{}: unexpected symlink {name}", layer.name);
            }
        }
        assert!(symlinks > 0, "{}: no library symlink was kept", layer.name);
    }
}

#[test]
#[ignore = "needs built layers: run `cargo xtask test`"]
fn elf_files_fit_target_glibc() {
    for layer in &Manifest::load().layers {
        let root = root_for(layer);
        let mut checked = 0;
        for path in walk(&root.opt) {
            let bytes = fs::read(&path).unwrap();
            if !bytes.starts_with(b"\x7fELF") {
                continue;
            }
            let name = path.strip_prefix(&root.opt).unwrap().display().to_string();
            let elf = goblin::elf::Elf::parse(&bytes).unwrap_or_else(|error| panic!("{name}: {error}"));
            assert_eq!(
                elf.header.e_machine,
                expected_machine(&layer.architecture),
                "{}: {name} machine",
                layer.name
            );
            assert!(elf.is_64, "{}: {name} is not 64-bit", layer.name);
            assert!(
                elf.dynamic.is_some(),
                "{}: {name} is not dynamically linked",
                layer.name
            );
            assert!(elf.runpaths.is_empty(), "{}: {name} has a DT_RUNPATH", layer.name);
            if name.starts_with("bin/") || name.starts_with("bref/extensions/") {
                assert_eq!(elf.rpaths, ["/opt/lib"], "{}: {name} RPATH", layer.name);
            }
            for version in glibc_versions(&elf) {
                assert!(
                    version <= (2, 34),
                    "{}: {name} needs GLIBC_{}.{}",
                    layer.name,
                    version.0,
                    version.1
                );
            }
            checked += 1;
        }
        assert!(checked > 10, "{}: only {checked} ELF files found", layer.name);
    }
}

fn expected_machine(architecture: &str) -> u16 {
    match architecture {
        "x86_64" => goblin::elf::header::EM_X86_64,
        "arm64" => goblin::elf::header::EM_AARCH64,
        other => panic!("unknown architecture {other}"),
    }
}

fn glibc_versions(elf: &goblin::elf::Elf) -> Vec<(u32, u32)> {
    let mut versions = Vec::new();
    let Some(verneed) = &elf.verneed else { return versions };
    for need in verneed.iter() {
        for aux in need.iter() {
            let name = elf.dynstrtab.get_at(aux.vna_name).unwrap_or("");
            let Some(number) = name.strip_prefix("GLIBC_") else {
                continue;
            };
            let mut parts = number.split('.').map(|part| part.parse::<u32>());
            if let (Some(Ok(major)), Some(Ok(minor))) = (parts.next(), parts.next()) {
                versions.push((major, minor));
            }
        }
    }
    versions
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                files.push(entry.path());
            }
        }
    }
    files.sort();
    files
}

#[test]
fn modules_parse_by_section() {
    let (php, zend) = parse_modules("[PHP Modules]\nCore\ndate\n\n[Zend Modules]\nZend OPcache\n\n");
    assert_eq!(php, BTreeSet::from(["Core".to_string(), "date".to_string()]));
    assert_eq!(zend, BTreeSet::from(["Zend OPcache".to_string()]));
}

#[test]
#[ignore = "needs built layers: run `cargo xtask test`"]
fn killed_build_leaves_no_layer_behind() {
    use std::os::unix::process::CommandExt;

    let manifest = Manifest::load();
    let php82 = manifest.layers.iter().find(|layer| layer.name == "php-82").unwrap();
    let cache_dir = std::env::var_os(layer_tests::manifest::CACHE_DIR_VAR)
        .expect("LAYERS_CACHE_DIR names the build cache; run `cargo xtask test`");
    let out_dir = tempfile::tempdir().unwrap();
    let build = || {
        let mut command = xtask("build-layers");
        command
            .args(["--arch", "x86_64", "--layer", "function", "--out-dir"])
            .arg(out_dir.path())
            .arg("--cache-dir")
            .arg(&cache_dir);
        command
    };
    let names = || -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(out_dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };

    // The build runs in a process group of its own (`cargo run` would
    // start xtask as a child), which is killed once the zip is being written.
    let mut child = build()
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !names().iter().any(|name| name.starts_with(".partial-")) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "build-layers ended before writing a zip"
        );
        assert!(Instant::now() < deadline, "no zip was started within 300 s");
        thread::sleep(Duration::from_millis(5));
    }
    let group = format!("-{}", child.id());
    let killed = std::process::Command::new("kill")
        .args(["-KILL", "--", &group])
        .status()
        .unwrap();
    assert!(killed.success(), "kill failed");
    child.wait().unwrap();

    // Nothing is left under a final name: no zip, no manifest.
    let left = names();
    assert!(!left.is_empty(), "the partial zip vanished");
    assert!(left.iter().all(|name| name.starts_with(".partial-")), "{left:?}");

    // The next run builds the layer again and removes the partial file.
    let output = build().output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("removed 1 partial file that an interrupted run left"),
        "{stderr}"
    );
    assert!(!stderr.contains("layer php-82: cached"), "{stderr}");
    assert_eq!(names(), ["manifest.json", "php-82.zip"]);
    assert!(
        fs::read(out_dir.path().join("php-82.zip")).unwrap() == fs::read(php82.zip_path()).unwrap(),
        "the rebuilt zip differs from dist/php-82.zip"
    );
}

#[test]
#[ignore = "needs built layers: run `cargo xtask test`"]
fn rebuilt_zips_are_identical() {
    let manifest = Manifest::load();
    let cache_dir = std::env::var_os(layer_tests::manifest::CACHE_DIR_VAR)
        .expect("LAYERS_CACHE_DIR names the build cache; run `cargo xtask test`");
    let out_dir = tempfile::tempdir().unwrap();

    // Everything after the compile runs again: closure, assembly, zip.
    let status = xtask("build-layers")
        .arg("--out-dir")
        .arg(out_dir.path())
        .arg("--cache-dir")
        .arg(&cache_dir)
        .status()
        .unwrap();
    assert!(status.success(), "the second build-layers failed");

    for layer in &manifest.layers {
        let first = fs::read(layer.zip_path()).unwrap();
        let second = fs::read(out_dir.path().join(&layer.zip)).unwrap();
        assert!(first == second, "{}: the second build gave a different zip", layer.name);
    }

    // Nothing changed: every layer is kept as it is, zip untouched.
    let modified = |name: &str| fs::metadata(out_dir.path().join(name)).unwrap().modified().unwrap();
    let before: Vec<_> = manifest.layers.iter().map(|layer| modified(&layer.zip)).collect();
    let build = |extra: &[&str]| {
        let output = xtask("build-layers")
            .args(extra)
            .arg("--out-dir")
            .arg(out_dir.path())
            .arg("--cache-dir")
            .arg(&cache_dir)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "{stderr}");
        stderr
    };
    let again = build(&[]);
    for (layer, before) in manifest.layers.iter().zip(&before) {
        assert!(again.contains(&format!("layer {}: cached", layer.name)), "{again}");
        assert_eq!(modified(&layer.zip), *before, "{} was written again", layer.name);
    }
    // The arm64 cross compile takes the x86_64 build made earlier in the
    // run. Alone, arm64 takes that build from the cache and prints why.
    assert_eq!(again.matches("compile php-8.2.32 (x86_64)").count(), 1, "{again}");
    let alone = build(&["--arch", "arm64", "--until", "php"]);
    assert!(
        alone.contains("compile php-8.2.32 (arm64): the php_config.h check needs the x86_64 build"),
        "{alone}"
    );
    assert!(alone.contains("compile php-8.2.32 (x86_64): cached"), "{alone}");

    // --force layers assembles and zips again, without compiling.
    let forced = build(&["--force", "layers", "--arch", "x86_64", "--layer", "function"]);
    let php82 = manifest.layers.iter().find(|layer| layer.name == "php-82").unwrap();
    assert!(!forced.contains("layer php-82: cached"), "{forced}");
    let zipped = format!("layer php-82: {} libraries, zipped to", php82.libraries.len());
    assert!(forced.contains(&zipped), "{forced}");
    assert!(forced.contains("compile php-8.2.32 (x86_64): cached"), "{forced}");
    assert_eq!(
        fs::read(out_dir.path().join(&php82.zip)).unwrap(),
        fs::read(php82.zip_path()).unwrap()
    );

    // --until php stops before the layers.
    let until = build(&["--until", "php"]);
    assert!(!until.contains("layer php-82"), "{until}");
    assert!(until.contains("compile php-8.2.32 (x86_64): cached"), "{until}");
}

#[test]
#[ignore = "needs built layers: run `cargo xtask test`"]
fn failed_architecture_keeps_other_layers() {
    let real_cache = std::path::PathBuf::from(
        std::env::var_os(layer_tests::manifest::CACHE_DIR_VAR)
            .expect("LAYERS_CACHE_DIR names the build cache; run `cargo xtask test`"),
    );
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let out_dir = work.path().join("dist");

    // A cache with the source and the finished x86_64 build roots only, so
    // that the arm64 root must be created, from a mirror that refuses
    // connections.
    fs::create_dir_all(cache.join("roots")).unwrap();
    std::os::unix::fs::symlink(real_cache.join("sources"), cache.join("sources")).unwrap();
    let mut linked = 0;
    for entry in fs::read_dir(real_cache.join("roots")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.contains("-amd64-") && !name.ends_with(".partial") {
            std::os::unix::fs::symlink(real_cache.join("roots").join(&name), cache.join("roots").join(&name)).unwrap();
            linked += 1;
        }
    }
    assert!(linked > 0, "no x86_64 build root in {}", real_cache.display());

    let output = xtask("build-layers")
        .args(["--debian-mirror", "http://127.0.0.1:9/debian", "--out-dir"])
        .arg(&out_dir)
        .arg("--cache-dir")
        .arg(&cache)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert!(
        !output.status.success(),
        "build-layers succeeded without an arm64 root\n{stderr}"
    );
    assert!(stderr.contains("1 of 2 architectures failed"), "{stderr}");
    assert!(
        stderr.contains("arm64: failed to prepare the arm64 build root"),
        "{stderr}"
    );
    assert!(out_dir.join("php-82.zip").is_file(), "{stderr}");
    assert!(out_dir.join("php-82-fpm.zip").is_file(), "{stderr}");
    assert!(!out_dir.join("arm-php-82.zip").exists(), "{stderr}");
    let manifest = fs::read_to_string(out_dir.join("manifest.json")).unwrap();
    assert!(manifest.contains("\"name\": \"php-82\""), "{manifest}");
    assert!(!manifest.contains("arm-php-82"), "{manifest}");
}

#[test]
#[ignore = "runs cargo xtask: run `cargo xtask test`"]
fn unavailable_release_fails_before_any_build() {
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let output = xtask("build-layers")
        .args([
            "--php",
            "8.4",
            "--no-release-urls",
            "--debian-mirror",
            "http://127.0.0.1:9/debian",
        ])
        .arg("--out-dir")
        .arg(work.path().join("dist"))
        .arg("--cache-dir")
        .arg(&cache)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("cannot fetch the source of PHP 8.4."), "{stderr}");
    let directory = cache.join("sources");
    assert!(
        stderr.contains(&format!("into the sources directory {}", directory.display())),
        "{stderr}"
    );
    // Failing early: before any build root, so before any compile.
    assert!(!cache.join("roots").exists(), "a build root was started:\n{stderr}");
}

#[test]
#[ignore = "needs the compiled PHP: run `cargo xtask test`"]
fn stage_php_checks_compiled_binaries() {
    let cache_dir = std::env::var_os(layer_tests::manifest::CACHE_DIR_VAR)
        .expect("LAYERS_CACHE_DIR names the build cache; run `cargo xtask test`");
    let out_dir = tempfile::tempdir().unwrap();
    let output = xtask("test")
        .args(["--stage", "php", "--out-dir"])
        .arg(out_dir.path())
        .arg("--cache-dir")
        .arg(&cache_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert!(output.status.success(), "{stderr}");
    for arch in ["x86_64", "arm64"] {
        assert!(
            stderr.contains(&format!("({arch}): php and php-fpm report the release")),
            "{stderr}"
        );
    }
    assert!(!stderr.contains("layer php-82"), "layers were assembled:\n{stderr}");
    assert_eq!(fs::read_dir(out_dir.path()).unwrap().count(), 0, "{stderr}");
}
