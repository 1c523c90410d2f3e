//! Checks of the `main/php_config.h` that configure writes: corrections for
//! the results a cross configure cannot find out, and the comparison of a
//! cross-compiled build's header with the native one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use anyhow::{bail, Result};

/// The state of one macro in the header: `Some(value)` for
/// `#define NAME value`, `None` for configure's `/* #undef NAME */`.
pub type Macros = BTreeMap<String, Option<String>>;

/// Returns every macro that the header defines or leaves undefined.
pub fn parse(header: &str) -> Macros {
    let mut macros = Macros::new();
    for line in header.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("#define ") {
            let (name, value) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            macros.insert(name.to_string(), Some(value.trim().to_string()));
        } else if let Some(rest) = line.strip_prefix("/* #undef ") {
            let name = rest.trim_end_matches("*/").trim();
            macros.insert(name.to_string(), None);
        }
    }
    macros
}

/// Returns `header` with each macro of `corrections` defined to its value.
///
/// Every corrected macro must already appear in the header, defined or
/// undefined: a name that configure never wrote is a typo or a sign that
/// the PHP version changed, so it is an error.
pub fn apply_corrections(header: &str, corrections: &BTreeMap<String, String>) -> Result<String> {
    let mut seen = BTreeSet::new();
    let mut output = String::with_capacity(header.len());
    for line in header.lines() {
        let trimmed = line.trim();
        let name = trimmed
            .strip_prefix("#define ")
            .map(|rest| rest.split_whitespace().next().unwrap_or(""))
            .or_else(|| {
                trimmed
                    .strip_prefix("/* #undef ")
                    .map(|rest| rest.trim_end_matches("*/").trim())
            });
        match name.and_then(|name| corrections.get_key_value(name)) {
            Some((name, value)) => {
                seen.insert(name.clone());
                output.push_str(&format!("#define {name} {value}"));
            }
            None => output.push_str(line),
        }
        output.push('\n');
    }

    let missing: Vec<&String> = corrections.keys().filter(|name| !seen.contains(*name)).collect();
    if !missing.is_empty() {
        bail!("php_config.h has no macro {missing:?} to correct; check the [cross.php_config_h] names of the target");
    }
    Ok(output)
}

/// A macro whose state differs between two headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub name: String,
    pub native: Option<Option<String>>,
    pub cross: Option<Option<String>>,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let describe = |state: &Option<Option<String>>| match state {
            None => "absent".to_string(),
            Some(None) => "undefined".to_string(),
            Some(Some(value)) => format!("defined as {value}"),
        };
        write!(
            f,
            "{}: {} in the native build, {} in the cross build",
            self.name,
            describe(&self.native),
            describe(&self.cross)
        )
    }
}

/// Returns the macros that differ between the native and the cross header,
/// except those in `allowed` (reviewed as architecture-specific).
pub fn compare(native: &Macros, cross: &Macros, allowed: &BTreeSet<String>) -> Vec<Difference> {
    let names: BTreeSet<&String> = native.keys().chain(cross.keys()).collect();
    names
        .into_iter()
        .filter(|name| !allowed.contains(*name))
        .filter_map(|name| {
            let native_state = native.get(name).cloned();
            let cross_state = cross.get(name).cloned();
            (native_state != cross_state).then(|| Difference {
                name: name.clone(),
                native: native_state,
                cross: cross_state,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NATIVE: &str = "\
/* Define to 1 if you have the `pread' function. */
#define HAVE_PREAD 1

/* #undef HAVE_AARCH64_CRC32 */
#define HAVE_CPUID_H 1
#define SIZEOF_INTMAX_T 8
#define PHP_UNAME \"Linux\"
#define ICONV_BROKEN_IGNORE 1
";

    /// Header of a plain cross configure of the same source for aarch64.
    const CROSS: &str = "\
/* Define to 1 if you have the `pread' function. */
/* #undef HAVE_PREAD */

#define HAVE_AARCH64_CRC32 1
/* #undef HAVE_CPUID_H */
/* #undef SIZEOF_INTMAX_T */
#define PHP_UNAME \"Linux\"
#define ICONV_BROKEN_IGNORE 0
";

    fn allowed() -> BTreeSet<String> {
        ["HAVE_AARCH64_CRC32", "HAVE_CPUID_H"].map(String::from).into()
    }

    #[test]
    fn parse_reads_defines_and_undefs() {
        let macros = parse(NATIVE);
        assert_eq!(macros["HAVE_PREAD"], Some("1".to_string()));
        assert_eq!(macros["HAVE_AARCH64_CRC32"], None);
        assert_eq!(macros["PHP_UNAME"], Some("\"Linux\"".to_string()));
        assert_eq!(macros.len(), 6);
    }

    #[test]
    fn wrong_cross_header_is_caught() {
        let differences = compare(&parse(NATIVE), &parse(CROSS), &allowed());
        let names: Vec<&str> = differences.iter().map(|difference| difference.name.as_str()).collect();
        assert_eq!(names, ["HAVE_PREAD", "ICONV_BROKEN_IGNORE", "SIZEOF_INTMAX_T"]);
        assert_eq!(
            differences[0].to_string(),
            "HAVE_PREAD: defined as 1 in the native build, undefined in the cross build"
        );
    }

    #[test]
    fn corrected_cross_header_matches() {
        let corrections: BTreeMap<String, String> = [
            ("HAVE_PREAD", "1"),
            ("SIZEOF_INTMAX_T", "8"),
            ("ICONV_BROKEN_IGNORE", "1"),
        ]
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .into();
        let corrected = apply_corrections(CROSS, &corrections).unwrap();
        assert!(corrected.contains("#define HAVE_PREAD 1\n"), "{corrected}");
        assert!(compare(&parse(NATIVE), &parse(&corrected), &allowed()).is_empty());
    }

    #[test]
    fn unknown_correction_is_rejected() {
        let corrections: BTreeMap<String, String> = [("HAVE_PREADD".to_string(), "1".to_string())].into();
        let error = apply_corrections(CROSS, &corrections).unwrap_err().to_string();
        assert!(error.contains("HAVE_PREADD"), "{error}");
    }

    #[test]
    fn macro_missing_on_one_side_differs() {
        let native = parse("#define ONLY_NATIVE 1\n");
        let cross = parse("");
        let differences = compare(&native, &cross, &BTreeSet::new());
        assert_eq!(
            differences[0].to_string(),
            "ONLY_NATIVE: defined as 1 in the native build, absent in the cross build"
        );
    }
}
