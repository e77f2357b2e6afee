//! Roles, subjects and grants: who may manage, use and view an account or endpoint.
//! [`AccessControlLayer`](crate::access::AccessControlLayer) enforces them; see
//! [`crate::access`] for the rules.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use super::{FieldError, Principal};

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

/// What a principal may do with an account or endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Permission {
    /// See it in listings and read its (redacted) configuration.
    View,
    /// Send traffic through it.
    Use,
    /// Edit, update and delete it and its grants.
    Manage,
}

/// A role, each holding the permissions of the ones below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// May view.
    Viewer,
    /// May view and use.
    User,
    /// May view, use and manage.
    Manager,
}

impl Role {
    /// Whether the role holds `permission`.
    pub fn allows(self, permission: Permission) -> bool {
        match permission {
            Permission::View => true,
            Permission::Use => self >= Role::User,
            Permission::Manage => self == Role::Manager,
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Permission::View => "view",
            Permission::Use => "use",
            Permission::Manage => "manage",
        })
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

impl Subject {
    /// Whether the subject covers `principal`.
    pub fn matches(&self, principal: &Principal) -> bool {
        match self {
            Subject::Everyone => true,
            Subject::Team(team) => principal.in_team(team),
            Subject::User(subject) => *principal.subject == **subject,
        }
    }
}

impl Grants {
    /// The highest role these grants give `principal`, if any.
    pub fn role_of(&self, principal: &Principal) -> Option<Role> {
        let holds = |subjects: &[Subject]| subjects.iter().any(|s| s.matches(principal));
        if holds(&self.managers) {
            Some(Role::Manager)
        } else if holds(&self.users) {
            Some(Role::User)
        } else if holds(&self.viewers) {
            Some(Role::Viewer)
        } else {
            None
        }
    }

    /// Whether these grants give `principal` the `permission`.
    pub fn allows(&self, principal: &Principal, permission: Permission) -> bool {
        self.role_of(principal)
            .is_some_and(|role| role.allows(permission))
    }
}

impl Grants {
    /// Grants from subject strings (`everyone`, `team:NAME`, `user:SUBJECT`), as the
    /// configuration file and the management API write them. An error names
    /// `{field}.managers[i]` (or `users`, `viewers`).
    pub fn parse<S: AsRef<str>>(
        managers: &[S],
        users: &[S],
        viewers: &[S],
        field: &str,
    ) -> Result<Self, FieldError> {
        let subjects = |list: &[S], role: &str| -> Result<Vec<Subject>, FieldError> {
            list.iter()
                .enumerate()
                .map(|(k, s)| {
                    Subject::from_str(s.as_ref())
                        .map_err(|e| FieldError::new(format!("{field}.{role}[{k}]"), e.to_string()))
                })
                .collect()
        };
        Ok(Grants {
            managers: subjects(managers, "managers")?,
            users: subjects(users, "users")?,
            viewers: subjects(viewers, "viewers")?,
        })
    }

    /// The grants of an endpoint of an account granted `self`, with `own` grants of its own
    /// or none: its `users` and `viewers` replace the account's, while the account's managers
    /// stay managers (an endpoint's own managers are added to them), so a platform team
    /// cannot lock itself out of an endpoint.
    pub fn for_endpoint(&self, own: Option<&Grants>) -> Grants {
        let Some(own) = own else {
            return self.clone();
        };
        let mut managers = self.managers.clone();
        managers.extend(
            own.managers
                .iter()
                .filter(|m| !self.managers.contains(m))
                .cloned(),
        );
        Grants {
            managers,
            users: own.users.clone(),
            viewers: own.viewers.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_parse_and_name_the_field() {
        let g = Grants::parse(&["team:platform"], &["everyone"], &[] as &[&str], "access").unwrap();
        assert_eq!(g.managers, [Subject::Team("platform".into())]);
        assert_eq!(g.users, [Subject::Everyone]);
        let err = Grants::parse(&["team:a"], &["alice"], &[], "accounts[0].access").unwrap_err();
        assert_eq!(err.field(), "accounts[0].access.users[0]");
    }

    #[test]
    fn endpoint_grants_keep_the_account_managers() {
        let account = Grants::parse(&["team:platform"], &["everyone"], &[], "a").unwrap();
        assert_eq!(account.for_endpoint(None), account);
        let own =
            Grants::parse(&["user:bob", "team:platform"], &["team:research"], &[], "e").unwrap();
        let merged = account.for_endpoint(Some(&own));
        assert_eq!(
            merged.managers,
            [
                Subject::Team("platform".into()),
                Subject::User("bob".into())
            ]
        );
        assert_eq!(merged.users, [Subject::Team("research".into())]);
    }

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
