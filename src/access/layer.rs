use std::fmt;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use super::Permission;
use crate::error::{GatewayError, ResponseFuture};
use crate::ext::{Principal, RouteMatch};

/// Decides whether a request may go on. `Err` is the response to send instead (a 403, say).
///
/// Implemented for closures `FnMut(&Request<B>) -> Result<(), GatewayError>`, so any policy
/// can be plugged into [`AccessControlLayer::custom`]:
///
/// ```
/// use http::Request;
/// use tower_gateway::access::AccessControlLayer;
/// use tower_gateway::auth::Principal;
/// use tower_gateway::error::GatewayError;
///
/// // Only the platform team, whatever the endpoint.
/// let layer = AccessControlLayer::custom(|req: &Request<()>| {
///     match req.extensions().get::<Principal>() {
///         Some(p) if p.in_team("platform") => Ok(()),
///         _ => Err(GatewayError::forbidden("Only the platform team may call this gateway.")),
///     }
/// });
/// # let _ = layer;
/// ```
pub trait AccessPolicy<B> {
    /// Checks one request.
    fn check(&mut self, req: &Request<B>) -> Result<(), GatewayError>;
}

impl<B, F> AccessPolicy<B> for F
where
    F: FnMut(&Request<B>) -> Result<(), GatewayError>,
{
    fn check(&mut self, req: &Request<B>) -> Result<(), GatewayError> {
        self(req)
    }
}

/// The default policy: the request's [`Principal`] must hold [`Permission::Use`] on the
/// routed endpoint's [grants](crate::registry::Endpoint::grants). No principal or no route
/// means no access.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrantsPolicy(());

impl GrantsPolicy {
    /// Creates the policy.
    pub fn new() -> Self {
        Self(())
    }

    /// The decision for a principal and route, without a request.
    pub fn decide(
        principal: Option<&Principal>,
        route: Option<&RouteMatch>,
    ) -> Result<(), GatewayError> {
        let Some(principal) = principal else {
            return Err(GatewayError::forbidden(
                "The request has no authenticated caller, so access is denied.",
            ));
        };
        let Some(route) = route else {
            return Err(GatewayError::forbidden(
                "The request was not routed to an endpoint, so access is denied.",
            ));
        };
        if route.target.grants().allows(principal, Permission::Use) {
            Ok(())
        } else {
            Err(GatewayError::forbidden(format!(
                "The key \"{}\" may not use endpoint \"{}\" of provider account \"{}\"; ask the account's managers for access.",
                principal.key_id, route.endpoint, route.account
            )))
        }
    }
}

impl<B> AccessPolicy<B> for GrantsPolicy {
    fn check(&mut self, req: &Request<B>) -> Result<(), GatewayError> {
        let ext = req.extensions();
        Self::decide(ext.get::<Principal>(), ext.get::<RouteMatch>())
    }
}

/// Layer that applies [`AccessControl`]. See the [module docs](super) for an example.
#[derive(Clone, Debug)]
pub struct AccessControlLayer<P = GrantsPolicy> {
    policy: P,
}

impl AccessControlLayer {
    /// Enforces the registry's grants with [`GrantsPolicy`].
    pub fn new() -> Self {
        Self {
            policy: GrantsPolicy::new(),
        }
    }
}

impl Default for AccessControlLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<P> AccessControlLayer<P> {
    /// Enforces a policy of your own.
    pub fn custom(policy: P) -> Self {
        Self { policy }
    }
}

impl<S, P: Clone> Layer<S> for AccessControlLayer<P> {
    type Service = AccessControl<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessControl {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// Middleware that lets a request through only if its policy allows it.
///
/// See the [module docs](super) for details and an example.
#[derive(Clone)]
pub struct AccessControl<S, P = GrantsPolicy> {
    inner: S,
    policy: P,
}

impl<S> AccessControl<S> {
    /// Wraps `inner`, enforcing the registry's grants.
    pub fn new(inner: S) -> Self {
        AccessControlLayer::new().layer(inner)
    }

    /// Returns an [`AccessControlLayer`].
    pub fn layer() -> AccessControlLayer {
        AccessControlLayer::new()
    }
}

impl<S, P> AccessControl<S, P> {
    /// Wraps `inner`, enforcing `policy`.
    pub fn custom(inner: S, policy: P) -> Self {
        Self { inner, policy }
    }

    /// Gets a reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Gets a mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug, P> fmt::Debug for AccessControl<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessControl")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, P, ReqBody, ResBody> Service<Request<ReqBody>> for AccessControl<S, P>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    P: AccessPolicy<ReqBody>,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        match self.policy.check(&req) {
            Ok(()) => ResponseFuture::inner(self.inner.call(req)),
            Err(err) => ResponseFuture::reject(err.into_response()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{Grants, Subject};
    use crate::error::X_GATEWAY_ERROR;
    use crate::registry::{AccountSpec, EndpointSpec, Registry};
    use crate::route::CustomEndpointRouteLayer;
    use http_body_util::Full;
    use std::convert::Infallible;
    use tower::{ServiceBuilder, ServiceExt, service_fn};
    use tower_test::mock;

    fn routed(principal: Option<Principal>) -> Request<Full<Bytes>> {
        let mut req = Request::post("/proxy-api/acct/ep/chat/completions")
            .body(Full::default())
            .unwrap();
        if let Some(p) = principal {
            req.extensions_mut().insert(p);
        }
        req
    }

    fn registry(grants: Grants) -> Registry {
        Registry::from_accounts(vec![AccountSpec {
            access: grants,
            endpoints: vec![EndpointSpec::new("ep", "https://example.com/v1")],
            ..AccountSpec::new("acct")
        }])
        .unwrap()
    }

    async fn status(grants: Grants, principal: Option<Principal>) -> (u16, bool) {
        let reached = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = reached.clone();
        let svc = ServiceBuilder::new()
            .layer(CustomEndpointRouteLayer::new(registry(grants).into()))
            .layer(AccessControlLayer::new())
            .service(service_fn(move |_req: Request<Full<Bytes>>| {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                async { Ok::<_, Infallible>(Response::new(Full::<Bytes>::default())) }
            }));
        let res = svc.oneshot(routed(principal)).await.unwrap();
        if res.status() == 403 {
            assert_eq!(res.headers()[X_GATEWAY_ERROR], "permission_denied");
        }
        (
            res.status().as_u16(),
            reached.load(std::sync::atomic::Ordering::SeqCst),
        )
    }

    fn alice() -> Principal {
        Principal::new("alice-laptop", "alice@example.com", ["research"])
    }

    #[tokio::test]
    async fn decisions() {
        let team = |t: &str| Subject::Team(t.into());
        let cases = [
            (
                Grants {
                    users: vec![Subject::Everyone],
                    ..Grants::default()
                },
                Some(alice()),
                200,
            ),
            (
                Grants {
                    users: vec![team("research")],
                    ..Grants::default()
                },
                Some(alice()),
                200,
            ),
            (
                Grants {
                    managers: vec![team("research")],
                    ..Grants::default()
                },
                Some(alice()),
                200,
            ),
            (
                Grants {
                    users: vec![Subject::User("alice@example.com".into())],
                    ..Grants::default()
                },
                Some(alice()),
                200,
            ),
            (
                Grants {
                    users: vec![team("sales")],
                    ..Grants::default()
                },
                Some(alice()),
                403,
            ),
            (
                Grants {
                    viewers: vec![Subject::Everyone],
                    ..Grants::default()
                },
                Some(alice()),
                403,
            ),
            (Grants::default(), Some(alice()), 403),
            (
                Grants {
                    users: vec![Subject::Everyone],
                    ..Grants::default()
                },
                None,
                403,
            ),
        ];
        for (grants, principal, expected) in cases {
            let (got, reached) = status(grants.clone(), principal.clone()).await;
            assert_eq!(got, expected, "{grants:?} {principal:?}");
            assert_eq!(
                reached,
                expected == 200,
                "denied requests never reach the inner service"
            );
        }
    }

    #[tokio::test]
    async fn a_request_without_a_route_is_denied() {
        let svc = AccessControl::new(service_fn(|_req: Request<Full<Bytes>>| async {
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
        }));
        let mut req = Request::new(Full::default());
        req.extensions_mut().insert(alice());
        assert_eq!(svc.oneshot(req).await.unwrap().status(), 403);
    }

    #[tokio::test]
    async fn custom_policies_and_readiness() {
        let policy = |req: &Request<Full<Bytes>>| {
            if req.headers().contains_key("x-allowed") {
                Ok(())
            } else {
                Err(GatewayError::forbidden("no"))
            }
        };
        let (mut svc, mut handle) =
            mock::spawn_layer::<Request<Full<Bytes>>, Response<Full<Bytes>>, _>(
                AccessControlLayer::custom(policy),
            );
        handle.allow(0);
        assert!(svc.poll_ready().is_pending());
        handle.allow(1);
        assert!(svc.poll_ready().is_ready());
        let denied = svc.call(Request::new(Full::default())).await.unwrap();
        assert_eq!(denied.status(), 403);
        assert!(svc.poll_ready().is_ready());
        let fut = tokio::spawn(
            svc.call(
                Request::get("/")
                    .header("x-allowed", "1")
                    .body(Full::default())
                    .unwrap(),
            ),
        );
        let (_req, send) = handle.next_request().await.unwrap();
        send.send_response(Response::new(Full::default()));
        assert_eq!(fut.await.unwrap().unwrap().status(), 200);
    }
}
