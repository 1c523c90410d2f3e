//! The Debian mirrors of the host's apt configuration, so that the build
//! root and the source packages come from wherever this host gets its
//! packages, with no mirror written into the code.

use std::fs;
use std::path::Path;

use anyhow::{bail, Result};

/// One `deb` or `deb-src` source: a URI and the suites it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSource {
    pub uri: String,
    pub suites: Vec<String>,
    pub components: Vec<String>,
}

/// The mirrors the build may use.
#[derive(Debug, Clone)]
pub struct Mirrors {
    sources: Vec<AptSource>,
    /// Set by --debian-mirror: used for every suite that is not a security suite.
    explicit: Option<String>,
}

impl Mirrors {
    /// Reads the host's apt sources, unless `explicit` names a mirror.
    pub fn discover(explicit: Option<&str>) -> Result<Mirrors> {
        let sources = read_host_sources(Path::new("/etc/apt"));
        let mirrors = Mirrors {
            sources,
            explicit: explicit.map(|uri| uri.trim_end_matches('/').to_string()),
        };
        if mirrors.explicit.is_none() && mirrors.main_archive().is_none() {
            bail!(
                "no Debian mirror found in /etc/apt/sources.list or /etc/apt/sources.list.d/*.sources; \
                 pass one with --debian-mirror http://HOST/debian"
            );
        }
        Ok(mirrors)
    }

    /// Returns the mirror to use for `suite`, or `None` when neither the
    /// host nor --debian-mirror provides one.
    pub fn uri_for(&self, suite: &str) -> Option<String> {
        let is_security = suite.ends_with("-security");
        if let (Some(explicit), false) = (&self.explicit, is_security) {
            return Some(explicit.clone());
        }
        let listed = self
            .sources
            .iter()
            .find(|source| source.suites.iter().any(|listed| listed == suite));
        if let Some(source) = listed {
            return Some(source.uri.clone());
        }
        if is_security {
            return None;
        }
        self.main_archive()
    }

    /// The host's main Debian archive: the first source of a release suite
    /// (one without a `-updates` or `-security` suffix) with `main`.
    fn main_archive(&self) -> Option<String> {
        self.sources
            .iter()
            .find(|source| {
                source.components.iter().any(|component| component == "main")
                    && source.suites.iter().any(|suite| !suite.contains('-'))
            })
            .map(|source| source.uri.clone())
    }
}

fn read_host_sources(apt_dir: &Path) -> Vec<AptSource> {
    let mut sources = Vec::new();
    if let Ok(text) = fs::read_to_string(apt_dir.join("sources.list")) {
        sources.extend(parse_one_line_format(&text));
    }
    let Ok(entries) = fs::read_dir(apt_dir.join("sources.list.d")) else {
        return sources;
    };
    let mut paths: Vec<_> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .collect();
    paths.sort();
    for path in paths {
        let Ok(text) = fs::read_to_string(&path) else { continue };
        match path.extension().and_then(|extension| extension.to_str()) {
            Some("sources") => sources.extend(parse_deb822_format(&text)),
            Some("list") => sources.extend(parse_one_line_format(&text)),
            _ => {}
        }
    }
    sources
}

/// Parses `deb [options] URI SUITE COMPONENT...` lines.
pub fn parse_one_line_format(text: &str) -> Vec<AptSource> {
    let mut sources = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let rest = rest.trim_start();
        let rest = match rest.strip_prefix('[') {
            Some(options) => options.split_once(']').map_or("", |(_, rest)| rest),
            None => rest,
        };
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        sources.push(AptSource {
            uri: uri.trim_end_matches('/').to_string(),
            suites: vec![suite.to_string()],
            components: words.map(String::from).collect(),
        });
    }
    sources
}

/// Parses deb822 stanzas (`Types: deb`, `URIs:`, `Suites:`, `Components:`).
pub fn parse_deb822_format(text: &str) -> Vec<AptSource> {
    let mut sources = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| -> Vec<String> {
            stanza
                .lines()
                .filter(|line| !line.starts_with('#'))
                .find_map(|line| {
                    let (key, value) = line.split_once(':')?;
                    key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_string())
                })
                .map(|value| value.split_whitespace().map(String::from).collect())
                .unwrap_or_default()
        };
        let enabled = field("Enabled").first().is_none_or(|value| value != "no");
        if !enabled || !field("Types").iter().any(|kind| kind == "deb") {
            continue;
        }
        for uri in field("URIs") {
            sources.push(AptSource {
                uri: uri.trim_end_matches('/').to_string(),
                suites: field("Suites"),
                components: field("Components"),
            });
        }
    }
    sources
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "\
Types: deb
# a comment
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main
";

    fn mirrors(explicit: Option<&str>) -> Mirrors {
        Mirrors {
            sources: parse_deb822_format(DEB822),
            explicit: explicit.map(String::from),
        }
    }

    #[test]
    fn deb822_stanzas_parse() {
        let sources = parse_deb822_format(DEB822);
        assert_eq!(sources.len(), 2);
        assert_eq!(sources[0].uri, "http://mirror.example/debian");
        assert_eq!(sources[0].suites, ["bookworm", "bookworm-updates"]);
        assert_eq!(sources[1].suites, ["bookworm-security"]);
    }

    #[test]
    fn one_line_format_parses_options() {
        let text = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main contrib\ndeb-src http://m.example/debian bookworm main\n";
        let sources = parse_one_line_format(text);
        assert_eq!(
            sources,
            [AptSource {
                uri: "http://m.example/debian".into(),
                suites: vec!["bookworm".into()],
                components: vec!["main".into(), "contrib".into()],
            }]
        );
    }

    #[test]
    fn other_release_uses_main_archive() {
        let mirrors = mirrors(None);
        assert_eq!(
            mirrors.uri_for("bullseye").as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(
            mirrors.uri_for("bookworm-security").as_deref(),
            Some("http://security.example/debian-security")
        );
        assert_eq!(mirrors.uri_for("bullseye-security"), None);
    }

    #[test]
    fn explicit_mirror_wins_except_security() {
        let mirrors = mirrors(Some("http://flag.example/debian"));
        assert_eq!(
            mirrors.uri_for("bookworm").as_deref(),
            Some("http://flag.example/debian")
        );
        assert_eq!(
            mirrors.uri_for("bookworm-security").as_deref(),
            Some("http://security.example/debian-security")
        );
    }
}
