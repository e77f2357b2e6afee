//! Roles, subjects and grants, and [`AccessControlLayer`], which enforces them.
//!
//! A grant names subjects for each role; each role has the permissions of the roles below it:
//!
//! | role | [`Permission`]s |
//! |---|---|
//! | [`Role::Manager`] | `Manage` (edit, update, delete), `Use`, `View` |
//! | [`Role::User`] | `Use` (call the endpoint), `View` |
//! | [`Role::Viewer`] | `View` |
//!
//! A [`Subject`] is `everyone` (every authenticated principal), `team:NAME` or
//! `user:SUBJECT`. Grants are set per account; an endpoint may override them: its `users` and
//! `viewers` replace the account's, while the account's managers stay managers of every
//! endpoint (an endpoint's own `managers` are added to them), so a platform team cannot lock
//! itself out of an endpoint.
//!
//! [`AccessControlLayer`] reads the [`Principal`](crate::auth::Principal) and the
//! [`RouteMatch`](crate::route::RouteMatch) of each request and lets it through only if the
//! principal holds the `Use` permission on the routed endpoint. A denied request gets a 403 in
//! the JSON error shape and never reaches the inner service. A request without a `Principal`
//! (the layer placed without authentication in front of it) is denied, never allowed.
//! [`AccessControlLayer::custom`] takes any [`AccessPolicy`], including a closure.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_gateway::access::{AccessControlLayer, Grants, Subject};
//! use tower_gateway::auth::{GatewayAuthLayer, HashedKeyStore, Principal};
//! use tower_gateway::registry::{AccountSpec, EndpointSpec, Registry};
//! use tower_gateway::route::CustomEndpointRouteLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let keys = HashedKeyStore::new()
//!     .with_key("gw-alice", Principal::new("alice", "alice@example.com", ["research"])).unwrap()
//!     .with_key("gw-bob", Principal::new("bob", "bob@example.com", ["sales"])).unwrap();
//! let registry = Registry::from_accounts(vec![AccountSpec {
//!     access: Grants { users: vec![Subject::Team("research".into())], ..Grants::default() },
//!     endpoints: vec![EndpointSpec::new("inference", "https://api.inference.wandb.ai/v1")],
//!     ..AccountSpec::new("coreweave-model")
//! }])
//! .unwrap();
//!
//! let svc = ServiceBuilder::new()
//!     .layer(GatewayAuthLayer::new(keys))
//!     .layer(CustomEndpointRouteLayer::new(registry.into()))
//!     .layer(AccessControlLayer::new())
//!     .service(service_fn(|_req: Request<Full<Bytes>>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::from("upstream")))
//!     }));
//!
//! let call = |key: &str| {
//!     Request::post("/proxy-api/coreweave-model/inference/chat/completions")
//!         .header("authorization", format!("Bearer {key}"))
//!         .body(Full::default())
//!         .unwrap()
//! };
//! assert_eq!(svc.clone().oneshot(call("gw-alice")).await.unwrap().status(), 200);
//! assert_eq!(svc.oneshot(call("gw-bob")).await.unwrap().status(), 403);
//! # }
//! ```

#[cfg(feature = "auth")]
mod layer;

#[cfg(feature = "auth")]
pub use self::layer::{AccessControl, AccessControlLayer, AccessPolicy, GrantsPolicy};

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

#[cfg(feature = "auth")]
impl Subject {
    /// Whether the subject covers `principal`.
    pub fn matches(&self, principal: &crate::auth::Principal) -> bool {
        match self {
            Subject::Everyone => true,
            Subject::Team(team) => principal.in_team(team),
            Subject::User(subject) => *principal.subject == **subject,
        }
    }
}

#[cfg(feature = "auth")]
impl Grants {
    /// The highest role these grants give `principal`, if any.
    pub fn role_of(&self, principal: &crate::auth::Principal) -> Option<Role> {
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
    pub fn allows(&self, principal: &crate::auth::Principal, permission: Permission) -> bool {
        self.role_of(principal)
            .is_some_and(|role| role.allows(permission))
    }
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
