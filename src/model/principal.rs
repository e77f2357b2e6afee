//! Who is calling, as a key record names them.

use std::sync::Arc;

/// Who is calling: inserted into the request extensions by [`GatewayAuthLayer`](crate::auth::GatewayAuthLayer).
///
/// It holds no secret: `key_id` is a label for logs, never the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The label of the key that authenticated the request.
    pub key_id: Arc<str>,
    /// The person or service that owns the key.
    pub subject: Arc<str>,
    /// The teams the subject belongs to.
    pub teams: Arc<[Arc<str>]>,
}

impl Principal {
    /// A principal.
    pub fn new<T: Into<Arc<str>>>(
        key_id: impl Into<Arc<str>>,
        subject: impl Into<Arc<str>>,
        teams: impl IntoIterator<Item = T>,
    ) -> Self {
        Self {
            key_id: key_id.into(),
            subject: subject.into(),
            teams: teams.into_iter().map(Into::into).collect(),
        }
    }

    /// Whether the principal belongs to `team`.
    pub fn in_team(&self, team: &str) -> bool {
        self.teams.iter().any(|t| &**t == team)
    }
}
