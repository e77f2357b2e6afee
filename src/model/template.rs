//! Header templates: an injected header value with placeholders (`{subject}`, `{team}`,
//! `{key_id}`) filled per request from the caller's [`Principal`]. See
//! [`crate::inject`] for how they are used.

use std::fmt;

use bytes::{Bytes, BytesMut};
use http::HeaderValue;

use super::Principal;

/// A placeholder in a [`HeaderTemplate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplateVar {
    /// `{subject}`: the principal's subject.
    Subject,
    /// `{team}`: the first of the principal's teams.
    Team,
    /// `{key_id}`: the label of the caller's key.
    KeyId,
}

impl TemplateVar {
    const ALL: [(&'static str, TemplateVar); 3] = [
        ("{subject}", TemplateVar::Subject),
        ("{team}", TemplateVar::Team),
        ("{key_id}", TemplateVar::KeyId),
    ];

    /// The placeholder as written, e.g. `{team}`.
    pub fn placeholder(self) -> &'static str {
        match self {
            TemplateVar::Subject => "{subject}",
            TemplateVar::Team => "{team}",
            TemplateVar::KeyId => "{key_id}",
        }
    }
}

#[derive(Clone)]
enum Part {
    Literal(Bytes),
    Var(TemplateVar),
}

/// A header value with placeholders, filled per request. `Debug` never shows the literal
/// parts (they may hold a secret).
#[derive(Clone)]
pub struct HeaderTemplate {
    parts: Vec<Part>,
    sensitive: bool,
}

impl HeaderTemplate {
    /// Parses `value`; `None` if it holds no placeholder.
    pub fn parse(value: &HeaderValue) -> Option<Self> {
        let bytes = value.as_bytes();
        let mut parts = Vec::new();
        let mut literal_start = 0;
        let mut i = 0;
        while i < bytes.len() {
            let found = (bytes[i] == b'{')
                .then(|| {
                    TemplateVar::ALL
                        .iter()
                        .find(|(p, _)| bytes[i..].starts_with(p.as_bytes()))
                })
                .flatten();
            if let Some((placeholder, var)) = found {
                if literal_start < i {
                    parts.push(Part::Literal(Bytes::copy_from_slice(
                        &bytes[literal_start..i],
                    )));
                }
                parts.push(Part::Var(*var));
                i += placeholder.len();
                literal_start = i;
            } else {
                i += 1;
            }
        }
        if !parts.iter().any(|p| matches!(p, Part::Var(_))) {
            return None;
        }
        if literal_start < bytes.len() {
            parts.push(Part::Literal(Bytes::copy_from_slice(
                &bytes[literal_start..],
            )));
        }
        Some(Self {
            parts,
            sensitive: value.is_sensitive(),
        })
    }

    /// The placeholders this template uses.
    pub fn vars(&self) -> impl Iterator<Item = TemplateVar> + '_ {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v) => Some(*v),
            Part::Literal(_) => None,
        })
    }

    /// Fills the placeholders; `Err(var)` names the first one `value` has no value for, or
    /// whose value cannot stand in a header.
    pub fn render<'a>(
        &self,
        value: impl Fn(TemplateVar) -> Option<&'a str>,
    ) -> Result<HeaderValue, TemplateVar> {
        let mut out = BytesMut::new();
        for part in &self.parts {
            match part {
                Part::Literal(b) => out.extend_from_slice(b),
                Part::Var(v) => out.extend_from_slice(value(*v).ok_or(*v)?.as_bytes()),
            }
        }
        let mut header = HeaderValue::from_maybe_shared(out.freeze())
            .map_err(|_| self.vars().next().unwrap_or(TemplateVar::Subject))?;
        header.set_sensitive(self.sensitive);
        Ok(header)
    }
}

impl HeaderTemplate {
    /// Fills the placeholders from `principal`: `{subject}`, `{key_id}`, and `{team}` (the
    /// first of its teams). `Err(var)` names the first placeholder without a value, every one
    /// of them when there is no principal.
    pub fn render_for(&self, principal: Option<&Principal>) -> Result<HeaderValue, TemplateVar> {
        let p = principal.ok_or_else(|| self.vars().next().unwrap_or(TemplateVar::Subject))?;
        self.render(|v| match v {
            TemplateVar::Subject => Some(&*p.subject),
            TemplateVar::KeyId => Some(&*p.key_id),
            TemplateVar::Team => p.teams.first().map(|t| &**t),
        })
    }
}

impl fmt::Debug for HeaderTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for part in &self.parts {
            match part {
                Part::Literal(_) => list.entry(&format_args!("<literal>")),
                Part::Var(v) => list.entry(&format_args!("{}", v.placeholder())),
            };
        }
        list.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing() {
        let t = |v: &'static str| HeaderTemplate::parse(&HeaderValue::from_static(v));
        assert!(t("Bearer plain").is_none());
        assert!(t("{teams}").is_none());
        let vars: Vec<_> = t("{team}/{team}-{key_id}").unwrap().vars().collect();
        assert_eq!(
            vars,
            [TemplateVar::Team, TemplateVar::Team, TemplateVar::KeyId]
        );
        let rendered = t("a{subject}b").unwrap().render(|_| Some("X")).unwrap();
        assert_eq!(rendered, "aXb");
        assert_eq!(
            t("{subject}")
                .unwrap()
                .render(|_| Some("bad\nvalue"))
                .unwrap_err(),
            TemplateVar::Subject
        );
        assert_eq!(
            format!("{:?}", t("Bearer sk-secret {team}").unwrap()),
            "[<literal>, {team}]"
        );
    }

    #[test]
    fn render_for_a_principal() {
        let t = HeaderTemplate::parse(&HeaderValue::from_static("{team}/{key_id}")).unwrap();
        let p = Principal::new("k1", "a@x", ["research"]);
        assert_eq!(t.render_for(Some(&p)).unwrap(), "research/k1");
        let lonely = Principal::new("k2", "b@x", [] as [&str; 0]);
        assert_eq!(t.render_for(Some(&lonely)).unwrap_err(), TemplateVar::Team);
        assert_eq!(t.render_for(None).unwrap_err(), TemplateVar::Team);
    }
}
