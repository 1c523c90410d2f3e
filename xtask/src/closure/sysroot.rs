//! Path resolution inside a sysroot, with the sysroot taken as `/`.
//!
//! A path inside the sysroot ("inner path") is absolute, such as
//! `/usr/lib/x86_64-linux-gnu/libfoo.so.1`. Its host path is the sysroot
//! joined with it. Symlinks are followed component by component, and an
//! absolute symlink target restarts at the sysroot, never at the host's `/`.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

/// Maximum number of symlinks followed while resolving one path, as Linux's
/// MAXSYMLINKS (40) for path walks.
const MAX_SYMLINKS: usize = 40;

/// Failure to resolve a path inside the sysroot.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SysrootPathError {
    /// A `..` component, written in the path or in a symlink target, that
    /// would leave the sysroot.
    #[error("{}leads outside the sysroot", describe_link(link))]
    Escapes {
        /// Inner path of the symlink whose target escapes, or None when the
        /// `..` is in the path itself.
        link: Option<PathBuf>,
    },

    /// More than [`MAX_SYMLINKS`] symlinks, usually a loop.
    #[error("more than {MAX_SYMLINKS} symlinks, the last one {link}; the symlinks form a loop")]
    Loop { link: PathBuf },

    /// An I/O error other than "not found" while reading a component.
    #[error("cannot read {host_path}: {message}")]
    Io { host_path: PathBuf, message: String },
}

fn describe_link(link: &Option<PathBuf>) -> String {
    match link {
        Some(link) => format!("the symlink {} ", link.display()),
        None => "the path ".to_owned(),
    }
}

/// Returns the host path of `inner`, an absolute path inside the sysroot.
pub fn host_path(sysroot: &Path, inner: &Path) -> PathBuf {
    let relative = inner.strip_prefix("/").unwrap_or(inner);
    sysroot.join(relative)
}

/// Resolves every symlink of `inner` inside the sysroot and returns the real
/// inner path, or None when a component does not exist.
///
/// `inner` must be absolute. A component that is not a directory but is
/// followed by more components also yields None, as ENOTDIR does.
pub fn real_inner_path(sysroot: &Path, inner: &Path) -> Result<Option<PathBuf>, SysrootPathError> {
    let real = resolve_from(sysroot, PathBuf::from("/"), inner)?;
    Ok(real.map(|real| real.inner_path))
}

/// A path whose symlinks are resolved inside the sysroot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RealPath {
    /// The inner path, free of symlinks.
    pub inner_path: PathBuf,
    /// Whether it is a regular file.
    pub is_file: bool,
}

/// Resolves the name `name` in `real_dir`, an inner directory path free of
/// symlinks (as [`real_inner_path`] returns), or returns None when nothing
/// has that name.
///
/// It gives the same path as [`real_inner_path`] on the joined path, but
/// reads only the components from `real_dir` on.
pub fn real_path_in_dir(sysroot: &Path, real_dir: &Path, name: &str) -> Result<Option<RealPath>, SysrootPathError> {
    resolve_from(sysroot, real_dir.to_owned(), Path::new(name))
}

/// Resolves `path` component by component, starting at `resolved`, an inner
/// directory free of symlinks. An absolute `path` or symlink target starts
/// again at the sysroot.
fn resolve_from(sysroot: &Path, mut resolved: PathBuf, path: &Path) -> Result<Option<RealPath>, SysrootPathError> {
    let mut pending: VecDeque<OsString> = VecDeque::new();
    push_components(&mut pending, path);
    if path.is_absolute() {
        resolved = PathBuf::from("/");
    }
    let mut is_file = false;
    let mut last_link: Option<PathBuf> = None;
    let mut symlinks_followed = 0;

    while let Some(name) = pending.pop_front() {
        if name == ".." {
            if !resolved.pop() {
                return Err(SysrootPathError::Escapes { link: last_link });
            }
            is_file = false;
            continue;
        }

        let candidate = resolved.join(&name);
        let host = host_path(sysroot, &candidate);
        let metadata = match fs::symlink_metadata(&host) {
            Ok(metadata) => metadata,
            Err(error) if is_missing(&error) => return Ok(None),
            Err(error) => {
                return Err(SysrootPathError::Io {
                    host_path: host,
                    message: error.to_string(),
                })
            }
        };

        if metadata.file_type().is_symlink() {
            symlinks_followed += 1;
            if symlinks_followed > MAX_SYMLINKS {
                return Err(SysrootPathError::Loop { link: candidate });
            }

            let target = fs::read_link(&host).map_err(|error| SysrootPathError::Io {
                host_path: host.clone(),
                message: error.to_string(),
            })?;
            if target.is_absolute() {
                resolved = PathBuf::from("/");
                is_file = false;
            }
            let mut target_components = VecDeque::new();
            push_components(&mut target_components, &target);
            while let Some(component) = target_components.pop_back() {
                pending.push_front(component);
            }
            last_link = Some(candidate);
            continue;
        }

        if !pending.is_empty() && !metadata.is_dir() {
            return Ok(None);
        }
        is_file = metadata.is_file();
        resolved = candidate;
    }

    Ok(Some(RealPath {
        inner_path: resolved,
        is_file,
    }))
}

/// Appends the names of `path` to `pending`, with `..` kept as a name and
/// `/` and `.` dropped.
fn push_components(pending: &mut VecDeque<OsString>, path: &Path) {
    for component in path.components() {
        match component {
            Component::Normal(name) => pending.push_back(name.to_owned()),
            Component::ParentDir => pending.push_back(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
}

/// Returns true for ENOENT, and for ENOTDIR, which means that a component
/// before the last one is not a directory.
fn is_missing(error: &io::Error) -> bool {
    matches!(error.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn sysroot_with_lib_dir() -> tempfile::TempDir {
        let sysroot = tempfile::tempdir().unwrap();
        fs::create_dir_all(sysroot.path().join("usr/lib")).unwrap();
        fs::write(sysroot.path().join("usr/lib/libfoo.so.1.0"), b"library").unwrap();
        sysroot
    }

    #[test]
    fn real_path_of_regular_file_is_itself() {
        let sysroot = sysroot_with_lib_dir();

        let real = real_inner_path(sysroot.path(), Path::new("/usr/lib/libfoo.so.1.0")).unwrap();

        assert_eq!(real, Some(PathBuf::from("/usr/lib/libfoo.so.1.0")));
    }

    #[test]
    fn real_path_follows_relative_symlink() {
        let sysroot = sysroot_with_lib_dir();
        symlink("libfoo.so.1.0", sysroot.path().join("usr/lib/libfoo.so.1")).unwrap();

        let real = real_inner_path(sysroot.path(), Path::new("/usr/lib/libfoo.so.1")).unwrap();

        assert_eq!(real, Some(PathBuf::from("/usr/lib/libfoo.so.1.0")));
    }

    #[test]
    fn real_path_follows_absolute_symlink_inside_sysroot() {
        let sysroot = sysroot_with_lib_dir();
        symlink("/usr/lib/libfoo.so.1.0", sysroot.path().join("usr/lib/libfoo.so.1")).unwrap();
        symlink("/usr/lib", sysroot.path().join("lib")).unwrap();

        let real = real_inner_path(sysroot.path(), Path::new("/lib/libfoo.so.1")).unwrap();

        assert_eq!(real, Some(PathBuf::from("/usr/lib/libfoo.so.1.0")));
    }

    #[test]
    fn real_path_resolves_dotdot_after_symlinked_directory() {
        let sysroot = sysroot_with_lib_dir();
        fs::create_dir_all(sysroot.path().join("opt/stage/bin")).unwrap();
        symlink("/opt/stage/bin", sysroot.path().join("bin")).unwrap();

        let real = real_inner_path(sysroot.path(), Path::new("/bin/../bin")).unwrap();

        assert_eq!(real, Some(PathBuf::from("/opt/stage/bin")));
    }

    #[test]
    fn real_path_of_missing_file_is_none() {
        let sysroot = sysroot_with_lib_dir();

        let missing = real_inner_path(sysroot.path(), Path::new("/usr/lib/libbar.so.1")).unwrap();
        let under_file = real_inner_path(sysroot.path(), Path::new("/usr/lib/libfoo.so.1.0/x")).unwrap();

        assert_eq!(missing, None);
        assert_eq!(under_file, None);
    }

    #[test]
    fn real_path_rejects_symlink_escaping_sysroot() {
        let sysroot = sysroot_with_lib_dir();
        symlink("../../../etc/passwd", sysroot.path().join("usr/lib/libescape.so.1")).unwrap();

        let error = real_inner_path(sysroot.path(), Path::new("/usr/lib/libescape.so.1")).unwrap_err();

        assert_eq!(
            error,
            SysrootPathError::Escapes {
                link: Some(PathBuf::from("/usr/lib/libescape.so.1"))
            }
        );
        assert!(error.to_string().contains("leads outside the sysroot"));
    }

    #[test]
    fn real_path_rejects_dotdot_above_root() {
        let sysroot = sysroot_with_lib_dir();

        let error = real_inner_path(sysroot.path(), Path::new("/../usr/lib")).unwrap_err();

        assert_eq!(error, SysrootPathError::Escapes { link: None });
    }

    #[test]
    fn real_path_rejects_symlink_loop() {
        let sysroot = sysroot_with_lib_dir();
        symlink("libloop.so.b", sysroot.path().join("usr/lib/libloop.so.a")).unwrap();
        symlink("libloop.so.a", sysroot.path().join("usr/lib/libloop.so.b")).unwrap();

        let error = real_inner_path(sysroot.path(), Path::new("/usr/lib/libloop.so.a")).unwrap_err();

        assert!(
            matches!(error, SysrootPathError::Loop { .. }),
            "unexpected error: {error:?}"
        );
        assert!(error.to_string().contains("loop"));
    }

    #[test]
    fn path_in_dir_matches_full_resolution() {
        let sysroot = sysroot_with_lib_dir();
        fs::create_dir_all(sysroot.path().join("opt/lib")).unwrap();
        symlink(
            "../../usr/lib/libfoo.so.1.0",
            sysroot.path().join("opt/lib/libfoo.so.1"),
        )
        .unwrap();
        symlink("/usr/lib", sysroot.path().join("opt/lib/sub")).unwrap();

        let file = real_path_in_dir(sysroot.path(), Path::new("/opt/lib"), "libfoo.so.1").unwrap();
        let dir = real_path_in_dir(sysroot.path(), Path::new("/opt/lib"), "sub").unwrap();
        let missing = real_path_in_dir(sysroot.path(), Path::new("/opt/lib"), "libbar.so.1").unwrap();

        let full = real_inner_path(sysroot.path(), Path::new("/opt/lib/libfoo.so.1")).unwrap();
        assert_eq!(file.as_ref().map(|real| real.inner_path.clone()), full);
        assert_eq!(
            file,
            Some(RealPath {
                inner_path: PathBuf::from("/usr/lib/libfoo.so.1.0"),
                is_file: true
            })
        );
        assert_eq!(
            dir,
            Some(RealPath {
                inner_path: PathBuf::from("/usr/lib"),
                is_file: false
            })
        );
        assert_eq!(missing, None);
    }

    #[test]
    fn host_path_joins_inner_path_to_sysroot() {
        let host = host_path(Path::new("/tmp/sysroot"), Path::new("/opt/lib/libz.so.1"));

        assert_eq!(host, PathBuf::from("/tmp/sysroot/opt/lib/libz.so.1"));
    }
}
