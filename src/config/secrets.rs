//! Secrets in the configuration file: `${VAR}` from the environment and `${file:PATH}` from a
//! file, expanded once at load time; errors name the field, never the value.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::model::FieldError;

/// A resolved secret: `Debug` prints `Secret(<redacted>)`.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Clone)]
enum Vars {
    Process,
    Fixed(HashMap<String, String>),
}

/// Where `${VAR}` and `${file:PATH}` come from: environment variables (the process's own, or
/// a fixed set) and a base directory for relative file paths.
///
/// `Debug` shows variable names, never values.
#[derive(Clone)]
pub struct SecretSource {
    vars: Vars,
    base_dir: PathBuf,
}

impl SecretSource {
    /// Variables from the process environment; files relative to `base_dir`.
    pub fn process_env(base_dir: impl Into<PathBuf>) -> Self {
        Self {
            vars: Vars::Process,
            base_dir: base_dir.into(),
        }
    }

    /// A fixed set of variables (the process environment is not read); files relative to
    /// `base_dir`.
    pub fn from_vars<I, K, V>(vars: I, base_dir: impl Into<PathBuf>) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self {
            vars: Vars::Fixed(
                vars.into_iter()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect(),
            ),
            base_dir: base_dir.into(),
        }
    }

    /// The directory relative file paths are resolved against.
    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    /// Expands every `${VAR}` and `${file:PATH}` in `text`. An error names `field` and never
    /// contains the text or a secret.
    pub fn expand(&self, field: &str, text: &str) -> Result<Secret, FieldError> {
        self.expand_inner(text)
            .map(Secret)
            .map_err(|m| FieldError::new(field, m))
    }

    fn expand_inner(&self, text: &str) -> Result<String, String> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| "unterminated `${` (close it with `}`)".to_owned())?;
            let inner = &after[..end];
            if let Some(path) = inner.strip_prefix("file:") {
                out.push_str(&self.read_file(path)?);
            } else {
                out.push_str(&self.var(inner)?);
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    fn var(&self, name: &str) -> Result<String, String> {
        if name.is_empty() {
            return Err("empty variable name in `${}`".to_owned());
        }
        let valid = name
            .bytes()
            .enumerate()
            .all(|(i, b)| b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit()));
        if !valid {
            // The text between the braces is not shown: it may be a misplaced secret.
            return Err(
                "invalid variable name in `${...}`: use letters, digits and _, not starting with a digit"
                    .to_owned(),
            );
        }
        // A conventional name (UPPER_CASE) is shown; anything else may be a key pasted
        // between the braces, so it is not.
        let shown = |name: &str| {
            if name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            {
                name.to_owned()
            } else {
                "(its name is not shown: it is not UPPER_CASE)".to_owned()
            }
        };
        match &self.vars {
            Vars::Process => std::env::var(name).map_err(|e| match e {
                std::env::VarError::NotPresent => {
                    format!("environment variable {} is not set", shown(name))
                }
                std::env::VarError::NotUnicode(_) => {
                    format!("environment variable {} is not valid UTF-8", shown(name))
                }
            }),
            Vars::Fixed(map) => map
                .get(name)
                .cloned()
                .ok_or_else(|| format!("environment variable {} is not set", shown(name))),
        }
    }

    fn read_file(&self, path: &str) -> Result<String, String> {
        if path.is_empty() {
            return Err("empty file path in `${file:}`".to_owned());
        }
        let full = self.base_dir.join(path);
        let mut text = std::fs::read_to_string(&full)
            .map_err(|e| format!("cannot read secret file {}: {e}", full.display()))?;
        if text.ends_with("\r\n") {
            text.truncate(text.len() - 2);
        } else if text.ends_with('\n') {
            text.truncate(text.len() - 1);
        }
        Ok(text)
    }
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("SecretSource");
        match &self.vars {
            Vars::Process => d.field("vars", &format_args!("<process environment>")),
            Vars::Fixed(map) => {
                let mut names: Vec<&str> = map.keys().map(String::as_str).collect();
                names.sort_unstable();
                d.field("vars", &names)
            }
        };
        d.field("base_dir", &self.base_dir).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> SecretSource {
        SecretSource::from_vars(
            [
                ("KEY", "sk-123"),
                ("EMPTY", ""),
                ("A_1", "a"),
                ("DOLLAR", "${KEY}"),
            ],
            std::env::temp_dir(),
        )
    }

    #[test]
    fn expansion() {
        let ok: &[(&str, &str)] = &[
            ("", ""),
            ("plain", "plain"),
            ("${KEY}", "sk-123"),
            ("Bearer ${KEY}", "Bearer sk-123"),
            ("${KEY}${A_1}", "sk-123a"),
            ("[${EMPTY}]", "[]"),
            ("$KEY", "$KEY"),
            ("$", "$"),
            ("a$b$", "a$b$"),
            ("$${KEY}", "$sk-123"),
            ("}${A_1}}", "}a}"),
            // Expanded text is not expanded again.
            ("${DOLLAR}", "${KEY}"),
        ];
        for (input, want) in ok {
            let got = source().expand("f", input);
            assert_eq!(got.as_ref().map(Secret::expose), Ok(*want), "{input:?}");
        }
        let bad: &[(&str, &str)] = &[
            ("${", "unterminated"),
            ("Bearer ${KEY", "unterminated"),
            ("${KEY}${", "unterminated"),
            ("${}", "empty variable name"),
            ("${MISSING}", "environment variable MISSING is not set"),
            ("${1X}", "invalid variable name"),
            ("${sk-literal}", "invalid variable name"),
            ("${a b}", "invalid variable name"),
            ("${file:}", "empty file path"),
            ("${file:no-such-file-5e3f9a7c}", "cannot read secret file"),
        ];
        for (input, want) in bad {
            let err = source().expand("keys[0].key", input).unwrap_err();
            assert_eq!(err.field(), "keys[0].key", "{input:?}");
            assert!(err.message().contains(want), "{input:?}: {err}");
        }
        // The text inside an invalid reference is never echoed.
        let err = source().expand("f", "${sk-literal}").unwrap_err();
        assert!(!err.to_string().contains("sk-literal"), "{err}");
    }

    #[test]
    fn file_secrets_trim_one_newline() {
        let dir =
            std::env::temp_dir().join(format!("tower-gateway-config-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cases = [
            ("lf", "s1\n", "s1"),
            ("crlf", "s2\r\n", "s2"),
            ("two", "s3\n\n", "s3\n"),
            ("none", "s4", "s4"),
            ("cr", "s5\r", "s5\r"),
        ];
        for (name, contents, _) in cases {
            std::fs::write(dir.join(name), contents).unwrap();
        }
        let src = SecretSource::from_vars([] as [(&str, &str); 0], &dir);
        for (name, _, want) in cases {
            let got = src.expand("f", &format!("${{file:{name}}}")).unwrap();
            assert_eq!(got.expose(), want, "{name}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn debug_hides_values() {
        let s = source();
        let dbg = format!("{s:?}");
        assert!(dbg.contains("KEY") && !dbg.contains("sk-123"), "{dbg}");
        let secret = s.expand("f", "${KEY}").unwrap();
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
    }
}
