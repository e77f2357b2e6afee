//! Roles, subjects and grants: who may manage, use or view an account or endpoint.
//!
//! A grant names subjects for each role:
//!
//! | role | may |
//! |---|---|
//! | manager | edit, update and delete the endpoint; also use and view it |
//! | user | call (proxy traffic to) the endpoint and view it |
//! | viewer | view the endpoint |
//!
//! A subject is `everyone`, `team:NAME` or `user:SUBJECT`. Grants are set per account, and an
//! endpoint may override them.
//!
//! This release parses and validates grants (so a configuration written today keeps working);
//! enforcement by an `AccessControlLayer` comes in the next release.
//!
//! ```
//! use tower_gateway::access::Subject;
//!
//! let s: Subject = "team:research".parse().unwrap();
//! assert_eq!(s, Subject::Team("research".into()));
//! assert!("group:x".parse::<Subject>().is_err());
//! ```

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Who a grant applies to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Subject {
    /// Every authenticated principal.
    Everyone,
    /// Every principal in the named team.
    Team(Arc<str>),
    /// The principal with this subject.
    User(Arc<str>),
}

/// Error parsing a [`Subject`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidSubject(String);

impl fmt::Display for InvalidSubject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidSubject {}

impl FromStr for Subject {
    type Err = InvalidSubject;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let named = |rest: &str, kind: &str| {
            if rest.is_empty() || rest.chars().any(|c| c.is_control() || c.is_whitespace()) {
                Err(InvalidSubject(format!(
                    "`{kind}:` must be followed by a name without spaces or control characters"
                )))
            } else {
                Ok(Arc::<str>::from(rest))
            }
        };
        if s == "everyone" {
            Ok(Subject::Everyone)
        } else if let Some(rest) = s.strip_prefix("team:") {
            named(rest, "team").map(Subject::Team)
        } else if let Some(rest) = s.strip_prefix("user:") {
            named(rest, "user").map(Subject::User)
        } else {
            Err(InvalidSubject(
                "a subject is \"everyone\", \"team:NAME\" or \"user:SUBJECT\"".to_owned(),
            ))
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Everyone => f.write_str("everyone"),
            Subject::Team(t) => write!(f, "team:{t}"),
            Subject::User(u) => write!(f, "user:{u}"),
        }
    }
}

/// The subjects granted each role on an account or endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants {
    /// May edit, update and delete (and use and view).
    pub managers: Vec<Subject>,
    /// May use and view.
    pub users: Vec<Subject>,
    /// May view.
    pub viewers: Vec<Subject>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_parse_and_print() {
        for ok in ["everyone", "team:platform", "user:alice@example.com"] {
            let s: Subject = ok.parse().unwrap();
            assert_eq!(s.to_string(), ok);
        }
        for bad in [
            "", "Everyone", "team:", "user:", "team:a b", "group:x", "alice",
        ] {
            assert!(bad.parse::<Subject>().is_err(), "{bad:?}");
        }
    }
}
