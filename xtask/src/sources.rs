//! PHP source tarballs: fetched once, verified against the pinned sha256,
//! kept in the cache.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::host;
use crate::matrix::{DebianSource, PhpRelease};
use crate::mirror::Mirrors;
use crate::process;

/// Returns the path of the verified tarball of `release` in `cache_dir`,
/// downloading it first when the cache has no valid copy.
///
/// The URLs of the release are tried in order, then its Debian source
/// package. A download whose sha256 differs from the pinned one is deleted
/// and reported: it is never used and never tried from another source,
/// since a wrong file means the pin or the source must be looked at.
/// With `use_urls` false, the release's URLs are skipped: only the sources
/// directory and the Debian mirror are used.
pub fn fetch(release: &PhpRelease, mirrors: &Mirrors, cache_dir: &Path, use_urls: bool) -> Result<PathBuf> {
    let dir = cache_dir.join("sources");
    fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let target = dir.join(release.tarball_name());

    if target.exists() {
        let actual = sha256_file(&target)?;
        if actual == release.sha256 {
            eprintln!("source php-{}: cached", release.version);
            return Ok(target);
        }
        // A copy put there by hand is kept for a look, not deleted.
        let aside = dir.join(format!("{}.bad", release.tarball_name()));
        fs::rename(&target, &aside).with_context(|| format!("failed to move {} aside", target.display()))?;
        eprintln!(
            "warning: {} has sha256 {actual}, not {}; moved to {}, fetching the source again",
            target.display(),
            release.sha256,
            aside.display()
        );
    }

    let mut failures = Vec::new();
    let urls: &[String] = if use_urls { &release.urls } else { &[] };
    for url in urls {
        eprintln!("source php-{}: downloading {url}", release.version);
        match download(url, &dir) {
            Ok(download) => return install(download, &target, &release.sha256, url),
            Err(error) => {
                eprintln!("source php-{}: {url} failed: {error:#}", release.version);
                failures.push(format!("{url}: {error:#}"));
            }
        }
    }

    if let Some(debian) = &release.debian_source {
        let origin = format!("Debian source package {}={}", debian.package, debian.version);
        eprintln!("source php-{}: fetching the {origin}", release.version);
        match download_debian_source(debian, mirrors, cache_dir) {
            Ok(download) => return install(download, &target, &release.sha256, &origin),
            Err(error) => failures.push(format!("{origin}: {error:#}")),
        }
    }

    if !use_urls && !release.urls.is_empty() {
        failures.push(format!("{}: skipped (--no-release-urls)", release.urls.join(", ")));
    }
    if failures.is_empty() {
        failures.push("layers/php/ declares no URL and no Debian source package".to_string());
    }
    bail!(
        "cannot fetch the source of PHP {}:\n  {}\nput php-{}.tar.xz (sha256 {}) into the sources directory {}, \
         which is checked first, and run again",
        release.version,
        failures.join("\n  "),
        release.version,
        release.sha256,
        dir.display()
    )
}

/// Checks the digest of a downloaded file and moves it into place; a file
/// with the wrong digest is deleted.
fn install(download: tempfile::TempPath, target: &Path, expected: &str, origin: &str) -> Result<PathBuf> {
    if let Err(error) = verify(&download, expected) {
        drop(download);
        return Err(error.context(format!("the file downloaded from {origin} was deleted")));
    }
    download
        .persist(target)
        .with_context(|| format!("failed to move the download to {}", target.display()))?;
    Ok(target.to_path_buf())
}

/// Fails unless the sha256 of `path` is `expected`; a mismatch deletes the file.
pub fn verify(path: &Path, expected: &str) -> Result<()> {
    let actual = sha256_file(path)?;
    if actual != expected {
        let _ = fs::remove_file(path);
        bail!(
            "checksum mismatch for {}: expected sha256 {expected}, got {actual}",
            path.display()
        );
    }
    Ok(())
}

/// Returns the lowercase hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("failed to open {}", path.display()))?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).with_context(|| format!("failed to read {}", path.display()))?;
    Ok(hex(&hasher.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Downloads `url` into a temporary file in `dir`.
fn download(url: &str, dir: &Path) -> Result<tempfile::TempPath> {
    let config = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(15)))
        .timeout_recv_body(Some(Duration::from_secs(300)))
        .build();
    let agent = ureq::Agent::new_with_config(config);
    let response = agent.get(url).call()?;
    let mut reader = response.into_body().into_reader();

    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    let mut buffer = vec![0; 1 << 16];
    loop {
        let count = reader.read(&mut buffer)?;
        if count == 0 {
            break;
        }
        file.write_all(&buffer[..count])?;
    }
    file.flush()?;
    Ok(file.into_temp_path())
}

/// Downloads the `.orig` tarball of a Debian source package with apt-get,
/// using an apt state of our own under the cache so that the host's apt
/// configuration is never changed.
fn download_debian_source(debian: &DebianSource, mirrors: &Mirrors, cache_dir: &Path) -> Result<tempfile::TempPath> {
    host::ensure(&[host::APT_GET])?;
    let apt_dir = cache_dir.join("apt-sources");
    let lists = apt_dir.join("lists");
    let archives = apt_dir.join("cache");
    fs::create_dir_all(lists.join("partial"))?;
    fs::create_dir_all(archives.join("archives/partial"))?;

    let source_list = apt_dir.join("sources.list");
    fs::write(&source_list, deb_src_lines(debian, mirrors)?)?;

    let options = [
        format!("Dir::Etc::SourceList={}", source_list.display()),
        "Dir::Etc::SourceParts=/nonexistent".to_string(),
        format!("Dir::State::Lists={}", lists.display()),
        format!("Dir::Cache={}", archives.display()),
        "Debug::NoLocking=1".to_string(),
    ];
    let apt = |subcommand: &[&str]| {
        let mut command = Command::new("apt-get");
        for option in &options {
            command.arg("-o").arg(option);
        }
        command.args(subcommand);
        command
    };

    let log = cache_dir.join("logs").join("debian-source.log");
    process::run_logged(apt(&["update", "--quiet"]), &log)?;

    let work = tempfile::tempdir_in(&apt_dir)?;
    let spec = format!("{}={}", debian.package, debian.version);
    let mut download = apt(&["source", "--download-only", "--quiet", &spec]);
    download.current_dir(work.path());
    process::run_logged(download, &log)?;

    let file = work.path().join(&debian.file);
    if !file.exists() {
        bail!(
            "the source package {spec} has no {}; check `file` in the PHP release definition",
            debian.file
        );
    }
    let destination = tempfile::NamedTempFile::new_in(cache_dir.join("sources"))?.into_temp_path();
    fs::rename(&file, &destination)?;
    Ok(destination)
}

fn deb_src_lines(debian: &DebianSource, mirrors: &Mirrors) -> Result<String> {
    let mut lines = String::new();
    for suite in &debian.suites {
        let Some(uri) = mirrors.uri_for(suite) else {
            eprintln!("note: no mirror known for {suite}; skipping it");
            continue;
        };
        lines.push_str(&format!(
            "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {uri} {suite} main\n"
        ));
    }
    if lines.is_empty() {
        bail!("no mirror known for any of the suites {:?}", debian.suites);
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::thread;

    /// Serves `body` on 127.0.0.1 for paths ending in `.tar.xz` and 404
    /// for the rest, counting requests.
    fn serve(body: &'static [u8]) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                counter.fetch_add(1, Ordering::SeqCst);
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                reader.read_line(&mut request_line).unwrap();
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap() <= 2 {
                        break;
                    }
                }
                let found = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("")
                    .ends_with(".tar.xz");
                let (status, payload): (&str, &[u8]) = if found {
                    ("200 OK", body)
                } else {
                    ("404 Not Found", b"")
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    payload.len()
                );
                stream.write_all(head.as_bytes()).unwrap();
                stream.write_all(payload).unwrap();
            }
        });
        (format!("http://{address}"), requests)
    }

    fn release(urls: Vec<String>, sha256: String) -> PhpRelease {
        PhpRelease {
            minor: "8.2".parse().unwrap(),
            version: "8.2.99".into(),
            sha256,
            urls,
            debian_source: None,
            build_by_default: true,
            configure: Default::default(),
        }
    }

    fn sha256_of(bytes: &[u8]) -> String {
        hex(&Sha256::digest(bytes))
    }

    fn mirrors() -> Mirrors {
        Mirrors::discover(Some("http://127.0.0.1:9/debian")).unwrap()
    }

    #[test]
    fn fetch_falls_back_to_next_url() {
        let (base, requests) = serve(b"php source");
        let cache = tempfile::tempdir().unwrap();
        let urls = vec![format!("{base}/missing"), format!("{base}/php-8.2.99.tar.xz")];

        let path = fetch(&release(urls, sha256_of(b"php source")), &mirrors(), cache.path(), true).unwrap();

        assert_eq!(fs::read(&path).unwrap(), b"php source");
        assert_eq!(path, cache.path().join("sources/php-8.2.99.tar.xz"));
        assert_eq!(requests.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn fetch_reuses_verified_cache() {
        let (base, requests) = serve(b"php source");
        let cache = tempfile::tempdir().unwrap();
        let release = release(vec![format!("{base}/php-8.2.99.tar.xz")], sha256_of(b"php source"));

        fetch(&release, &mirrors(), cache.path(), true).unwrap();
        fetch(&release, &mirrors(), cache.path(), true).unwrap();

        assert_eq!(requests.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn checksum_mismatch_names_digests_and_deletes() {
        let (base, _) = serve(b"tampered source");
        let cache = tempfile::tempdir().unwrap();
        let expected = sha256_of(b"php source");
        let release = release(vec![format!("{base}/php-8.2.99.tar.xz")], expected.clone());

        let error = format!("{:#}", fetch(&release, &mirrors(), cache.path(), true).unwrap_err());

        assert!(error.contains("checksum mismatch"), "{error}");
        assert!(error.contains(&expected), "{error}");
        assert!(error.contains(&sha256_of(b"tampered source")), "{error}");
        let left: Vec<_> = fs::read_dir(cache.path().join("sources")).unwrap().collect();
        assert!(left.is_empty(), "the bad download was kept: {left:?}");
    }

    #[test]
    fn corrupted_cache_is_downloaded_again() {
        let (base, requests) = serve(b"php source");
        let cache = tempfile::tempdir().unwrap();
        let release = release(vec![format!("{base}/php-8.2.99.tar.xz")], sha256_of(b"php source"));
        fs::create_dir_all(cache.path().join("sources")).unwrap();
        fs::write(cache.path().join("sources/php-8.2.99.tar.xz"), b"truncated").unwrap();

        let path = fetch(&release, &mirrors(), cache.path(), true).unwrap();

        assert_eq!(fs::read(path).unwrap(), b"php source");
        assert_eq!(requests.load(Ordering::SeqCst), 1);
        // The wrong copy is kept aside for a look.
        let aside = cache.path().join("sources/php-8.2.99.tar.xz.bad");
        assert_eq!(fs::read(aside).unwrap(), b"truncated");
    }

    #[test]
    fn all_sources_failing_says_where_to_put_tarball() {
        let (base, _) = serve(b"");
        let cache = tempfile::tempdir().unwrap();
        let release = release(vec![format!("{base}/nothing-here")], "0".repeat(64));

        let error = format!("{:#}", fetch(&release, &mirrors(), cache.path(), true).unwrap_err());

        assert!(error.contains("404"), "{error}");
        let directory = cache.path().join("sources");
        assert!(
            error.contains(&format!(
                "put php-8.2.99.tar.xz (sha256 {}) into the sources directory {}",
                "0".repeat(64),
                directory.display()
            )),
            "{error}"
        );
    }
}
