use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use tower::{ServiceBuilder, ServiceExt, service_fn};

use super::*;
use crate::auth::Principal;
use crate::forward::ResponseBody;
use crate::registry::{AccountSpec, EndpointSpec, Registry};
use crate::route::CustomEndpointRouteLayer;

const FIRST: &str = "data: {\"id\":\"c\",\"model\":\"llama\",\"choices\":[{\"delta\":{\"role\":\"assistant\"}}],\"usage\":null}\n\n";
const TOKEN: &str = "data: {\"id\":\"c\",\"model\":\"llama\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n";
const USAGE: &str = "data: {\"id\":\"c\",\"model\":\"llama\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":2,\"total_tokens\":13}}\n\n";
const DONE: &str = "data: [DONE]\n\n";

type Records = Arc<Mutex<Vec<Usage>>>;

fn registry() -> Registry {
    Registry::from_accounts(vec![AccountSpec {
        endpoints: vec![EndpointSpec::new("ep", "https://example.com/v1")],
        ..AccountSpec::new("acct")
    }])
    .unwrap()
}

fn alice() -> Principal {
    Principal::new("alice-laptop", "alice@example.com", ["research", "ml"])
}

fn frames_body(frames: Vec<Bytes>, fail_at_end: bool) -> ResponseBody {
    let mut items: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = frames
        .into_iter()
        .map(|f| Ok(http_body::Frame::data(f)))
        .collect();
    if fail_at_end {
        items.push(Err(std::io::Error::other("upstream reset")));
    }
    ResponseBody::new(StreamBody::new(futures_util::stream::iter(items)))
}

fn sse(frames: Vec<Bytes>) -> Response<ResponseBody> {
    sse_with(frames_body(frames, false))
}

/// An SSE response with `body`.
fn sse_with(body: ResponseBody) -> Response<ResponseBody> {
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap()
}

/// The tap under the router, over `upstream`, recording to the returned list.
fn tap<F, Fut>(
    layer: UsageTapLayer,
    upstream: F,
) -> (
    impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<UsageBody<ResponseBody>>,
        Error = Infallible,
    > + Clone,
    Records,
)
where
    F: Fn(Request<TapRequestBody<Full<Bytes>>>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Response<ResponseBody>, Infallible>>,
{
    let records: Records = Arc::default();
    let sink = records.clone();
    let svc = ServiceBuilder::new()
        .layer(CustomEndpointRouteLayer::new(registry().into()))
        .layer(layer.sink(move |u: Usage| sink.lock().unwrap().push(u)))
        .service(service_fn(upstream));
    (svc, records)
}

fn request(body: &str) -> Request<Full<Bytes>> {
    let mut req = Request::post("/proxy-api/acct/ep/chat/completions")
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .header("x-request-id", "req-1")
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .unwrap();
    req.extensions_mut().insert(alice());
    req
}

async fn frames(res: Response<UsageBody<ResponseBody>>) -> Vec<Bytes> {
    let mut body = Box::pin(res.into_body());
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        out.push(frame.unwrap().into_data().unwrap());
    }
    out
}

fn one(records: &Records) -> Usage {
    let records = records.lock().unwrap();
    assert_eq!(records.len(), 1, "one record per call: {records:?}");
    records[0].clone()
}

#[tokio::test]
async fn sse_frames_pass_unchanged_and_the_usage_is_recorded() {
    let sent: Vec<Bytes> = [FIRST, TOKEN, &USAGE[..30], &USAGE[30..], DONE]
        .into_iter()
        .map(Bytes::from)
        .collect();
    let upstream = sent.clone();
    let (svc, records) = tap(UsageTapLayer::new(), move |req| {
        let upstream = upstream.clone();
        async move {
            assert_eq!(req.uri(), "https://example.com/v1/chat/completions");
            Ok(sse(upstream))
        }
    });
    let res = svc.oneshot(request("{\"model\":\"llama\"}")).await.unwrap();
    assert!(records.lock().unwrap().is_empty(), "nothing before the end");
    assert_eq!(frames(res).await, sent, "every frame as it was sent");
    let usage = one(&records);
    assert_eq!(usage.principal, Some(alice()));
    assert_eq!(usage.account.as_deref(), Some("acct"));
    assert_eq!(usage.endpoint.as_deref(), Some("ep"));
    assert_eq!(usage.request_id.unwrap(), "req-1");
    assert_eq!(usage.model.as_deref(), Some("llama"));
    assert_eq!(
        (usage.input_tokens, usage.output_tokens),
        (Some(11), Some(2))
    );
    assert_eq!(usage.outcome, Outcome::Complete);
    assert_eq!(
        usage.response_bytes,
        (FIRST.len() + TOKEN.len() + USAGE.len() + DONE.len()) as u64
    );
    assert!(usage.time_to_first_token.unwrap() <= usage.duration);
}

#[tokio::test]
async fn a_json_completion_is_read_at_its_end() {
    let (svc, records) = tap(UsageTapLayer::new(), |_req| async {
        let body = r#"{"id":"x","model":"llama","choices":[{"message":{"content":"Hi"}}],"usage":{"prompt_tokens":5,"completion_tokens":7}}"#;
        let frames = vec![Bytes::from(&body[..40]), Bytes::from(&body[40..])];
        Ok(Response::builder()
            .header("content-type", "application/json")
            .body(frames_body(frames, false))
            .unwrap())
    });
    let res = svc.oneshot(request("{}")).await.unwrap();
    frames(res).await;
    let usage = one(&records);
    assert_eq!(usage.model.as_deref(), Some("llama"));
    assert_eq!(
        (usage.input_tokens, usage.output_tokens),
        (Some(5), Some(7))
    );
}

#[tokio::test]
async fn include_usage_asks_the_upstream_and_hides_the_event_at_every_cut() {
    let stream = [FIRST, TOKEN, TOKEN, USAGE, DONE].concat();
    let expected = [FIRST, TOKEN, TOKEN, DONE].concat();
    for cut in 0..=stream.len() {
        let upstream = stream.clone();
        let (svc, records) = tap(UsageTapLayer::new().include_usage(true), move |req| {
            let upstream = upstream.clone();
            async move {
                let len: usize = req.headers()["content-length"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(body.len(), len, "content-length follows the new body");
                let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(json["stream_options"]["include_usage"], true);
                assert_eq!(json["model"], "llama");
                let frames = vec![
                    Bytes::copy_from_slice(&upstream.as_bytes()[..cut]),
                    Bytes::copy_from_slice(&upstream.as_bytes()[cut..]),
                ];
                Ok(sse(frames))
            }
        });
        let res = svc
            .oneshot(request(r#"{"model":"llama","stream":true,"messages":[]}"#))
            .await
            .unwrap();
        let got = frames(res).await.concat();
        assert_eq!(
            String::from_utf8(got).unwrap(),
            expected,
            "cut at {cut}: the client sees what it asked for"
        );
        let usage = one(&records);
        assert_eq!(
            (usage.input_tokens, usage.output_tokens),
            (Some(11), Some(2)),
            "cut at {cut}"
        );
    }
}

#[tokio::test]
async fn a_client_that_asked_for_usage_gets_its_stream_untouched() {
    let body = r#"{"model":"llama","stream":true,"stream_options":{"include_usage":true}}"#;
    let stream = [FIRST, USAGE, DONE].concat();
    let upstream = stream.clone();
    let (svc, records) = tap(UsageTapLayer::new().include_usage(true), move |req| {
        let upstream = upstream.clone();
        async move {
            let got = req.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(got, body.as_bytes(), "the body as the client sent it");
            Ok(sse(vec![Bytes::from(upstream)]))
        }
    });
    let res = svc.oneshot(request(body)).await.unwrap();
    assert_eq!(frames(res).await.concat(), stream.as_bytes());
    assert_eq!(one(&records).output_tokens, Some(2));
}

#[tokio::test]
async fn without_include_usage_the_request_streams_through_unread() {
    let (svc, _records) = tap(UsageTapLayer::new(), |req| async move {
        let got = req.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got, r#"{"model":"llama","stream":true}"#.as_bytes());
        Ok(sse(vec![Bytes::from_static(DONE.as_bytes())]))
    });
    let res = svc
        .oneshot(request(r#"{"model":"llama","stream":true}"#))
        .await
        .unwrap();
    frames(res).await;
}

#[tokio::test]
async fn a_client_that_goes_away_is_recorded_as_cancelled() {
    let (svc, records) = tap(UsageTapLayer::new(), |_req| async {
        Ok(sse(vec![
            Bytes::from_static(FIRST.as_bytes()),
            Bytes::from_static(TOKEN.as_bytes()),
        ]))
    });
    let res = svc.oneshot(request("{}")).await.unwrap();
    let mut body = Box::pin(res.into_body());
    body.frame().await.unwrap().unwrap();
    drop(body);
    let usage = one(&records);
    assert_eq!(usage.outcome, Outcome::Cancelled);
    assert_eq!(usage.model.as_deref(), Some("llama"));
    assert_eq!(usage.output_tokens, None);
}

#[tokio::test]
async fn a_stream_cut_short_is_recorded_as_failed_and_the_client_sees_the_error() {
    let (svc, records) = tap(UsageTapLayer::new(), |_req| async {
        Ok(sse_with(frames_body(
            vec![Bytes::from_static(FIRST.as_bytes())],
            true,
        )))
    });
    let res = svc.oneshot(request("{}")).await.unwrap();
    let mut body = Box::pin(res.into_body());
    body.frame().await.unwrap().unwrap();
    assert!(
        body.frame().await.unwrap().is_err(),
        "the error reaches the client"
    );
    assert_eq!(one(&records).outcome, Outcome::Failed);
}

#[tokio::test]
async fn gateway_made_responses_and_refused_routes_make_no_record() {
    let (svc, records) = tap(UsageTapLayer::new(), |_req| async {
        Ok(
            crate::error::GatewayError::new(http::StatusCode::FORBIDDEN, "permission_denied", "no")
                .into_response(),
        )
    });
    let res = svc.clone().oneshot(request("{}")).await.unwrap();
    assert_eq!(res.status(), 403);
    frames(res).await;
    let mut unknown = request("{}");
    *unknown.uri_mut() = "/proxy-api/nope/ep/chat/completions".parse().unwrap();
    let res = svc.oneshot(unknown).await.unwrap();
    assert_eq!(res.status(), 404);
    assert!(records.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_empty_body_is_recorded_once_even_if_never_polled() {
    let (svc, records) = tap(UsageTapLayer::new(), |_req| async {
        Ok(Response::new(ResponseBody::default()))
    });
    let res = svc.oneshot(request("{}")).await.unwrap();
    assert!(res.body().is_end_stream());
    drop(res);
    assert_eq!(one(&records).outcome, Outcome::Complete);
}

#[tokio::test]
async fn a_disabled_tap_records_nothing_and_changes_nothing() {
    let records: Records = Arc::default();
    let sink = records.clone();
    let stream = [FIRST, USAGE, DONE].concat();
    let upstream = stream.clone();
    let svc = ServiceBuilder::new()
        .layer(CustomEndpointRouteLayer::new(registry().into()))
        .layer(
            UsageTapLayer::disabled()
                .include_usage(true)
                .sink(move |u: Usage| sink.lock().unwrap().push(u)),
        )
        .service(service_fn(
            move |_req: Request<TapRequestBody<Full<Bytes>>>| {
                let upstream = upstream.clone();
                async move { Ok::<_, Infallible>(sse(vec![Bytes::from(upstream)])) }
            },
        ));
    let res = svc
        .oneshot(request(r#"{"model":"llama","stream":true}"#))
        .await
        .unwrap();
    assert_eq!(frames(res).await.concat(), stream.as_bytes());
    assert!(records.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_body_of_known_length_is_complete_at_its_last_frame() {
    let (svc, records) = tap(UsageTapLayer::new(), |_req| async {
        let body = r#"{"model":"m","usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        Ok(Response::builder()
            .header("content-type", "application/json")
            .body(ResponseBody::from(Bytes::from_static(body.as_bytes())))
            .unwrap())
    });
    let res = svc.oneshot(request("{}")).await.unwrap();
    let mut body = Box::pin(res.into_body());
    body.frame().await.unwrap().unwrap();
    // hyper stops here: the body says it is at its end, and is dropped unpolled.
    assert!(body.is_end_stream());
    drop(body);
    let usage = one(&records);
    assert_eq!(usage.outcome, Outcome::Complete);
    assert_eq!(usage.output_tokens, Some(2));
}

/// An upstream that reads the request body, expects it to fail, and checks the status the
/// error would get: what Forward does with a client body error, then RescueLayer.
async fn fails_as<B>(
    req: Request<TapRequestBody<B>>,
    status: u16,
) -> Result<Response<ResponseBody>, Infallible>
where
    B: Body<Data = Bytes>,
    B::Error: Into<crate::BoxError>,
{
    let err = req.into_body().collect().await.unwrap_err();
    let wrapped = crate::error::InvalidRequestBody(err);
    assert_eq!(crate::error::classify(&wrapped).status(), status);
    Ok(Response::new(ResponseBody::default()))
}

#[tokio::test(start_paused = true)]
async fn a_stalled_upload_read_for_include_usage_is_a_408_not_a_hang() {
    let registry = Registry::from_accounts(vec![AccountSpec {
        endpoints: vec![EndpointSpec {
            timeouts: crate::registry::Timeouts {
                idle: Some(std::time::Duration::from_millis(200)),
                ..Default::default()
            },
            ..EndpointSpec::new("ep", "https://example.com/v1")
        }],
        ..AccountSpec::new("acct")
    }])
    .unwrap();
    let svc = ServiceBuilder::new()
        .layer(CustomEndpointRouteLayer::new(registry.into()))
        .layer(UsageTapLayer::new().include_usage(true))
        .service(service_fn(|req: Request<TapRequestBody<StreamBody<_>>>| {
            fails_as(req, 408)
        }));
    // Declares 100 bytes, sends 10, then nothing.
    let first: Result<http_body::Frame<Bytes>, Infallible> =
        Ok(http_body::Frame::data(Bytes::from_static(b"{\"stream\":")));
    let stalled = futures_util::StreamExt::chain(
        futures_util::stream::iter([first]),
        futures_util::stream::pending(),
    );
    let mut req = Request::post("/proxy-api/acct/ep/chat/completions")
        .header("content-type", "application/json")
        .header("content-length", "100")
        .body(StreamBody::new(stalled))
        .unwrap();
    req.extensions_mut().insert(alice());
    tokio::time::timeout(std::time::Duration::from_secs(60), svc.oneshot(req))
        .await
        .expect("the read is bounded by the endpoint's idle timeout")
        .unwrap();
}

#[tokio::test]
async fn a_body_longer_than_it_declared_is_not_read_past_the_limit() {
    let svc = ServiceBuilder::new()
        .layer(CustomEndpointRouteLayer::new(registry().into()))
        .layer(UsageTapLayer::new().include_usage(true))
        .service(service_fn(|req: Request<TapRequestBody<StreamBody<_>>>| {
            fails_as(req, 413)
        }));
    // Declares 10 bytes, sends 2 MiB (a layer used without hyper's framing in front of it).
    let chunk = Bytes::from(vec![b' '; 64 << 10]);
    let frames = (0..32).map(move |_| Ok::<_, Infallible>(http_body::Frame::data(chunk.clone())));
    let mut req = Request::post("/proxy-api/acct/ep/chat/completions")
        .header("content-type", "application/json")
        .header("content-length", "10")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    req.extensions_mut().insert(alice());
    svc.oneshot(req).await.unwrap();
}

#[tokio::test]
async fn a_hidden_usage_stream_ends_with_its_unfinished_last_event() {
    const TAIL: &str = "data: {\"cut\":";
    let stream = Bytes::from([FIRST, USAGE, TAIL].concat());
    let expected = [FIRST, TAIL].concat();
    // Of known length (hyper stops once the body says it is at its end), and not.
    for known_length in [true, false] {
        let upstream = stream.clone();
        let (svc, records) = tap(UsageTapLayer::new().include_usage(true), move |_req| {
            let body = match known_length {
                true => ResponseBody::from(upstream.clone()),
                false => frames_body(vec![upstream.clone()], false),
            };
            async move { Ok(sse_with(body)) }
        });
        let res = svc
            .oneshot(request(r#"{"model":"llama","stream":true}"#))
            .await
            .unwrap();
        let mut body = Box::pin(res.into_body());
        let mut got = Vec::new();
        while !body.is_end_stream() {
            match body.frame().await {
                Some(frame) => got.extend_from_slice(&frame.unwrap().into_data().unwrap()),
                None => break,
            }
        }
        drop(body);
        assert_eq!(
            String::from_utf8(got).unwrap(),
            expected,
            "known length: {known_length}"
        );
        let usage = one(&records);
        assert_eq!(
            usage.outcome,
            Outcome::Complete,
            "known length: {known_length}"
        );
        assert_eq!(usage.output_tokens, Some(2));
        assert_eq!(usage.response_bytes, expected.len() as u64);
    }
}

/// Trailers are a body's last frame: the call is complete when they arrive (hyper may not
/// poll again), and a filtered stream's held bytes go out before them.
#[tokio::test]
async fn a_stream_that_ends_with_trailers_is_complete_and_keeps_its_order() {
    const TAIL: &str = "data: {\"cut\":";
    let frames = || {
        vec![
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(
                [FIRST, USAGE, TAIL].concat(),
            ))),
            Ok(http_body::Frame::trailers(http::HeaderMap::from_iter([(
                http::HeaderName::from_static("x-trailer"),
                http::HeaderValue::from_static("1"),
            )]))),
        ]
    };
    for include_usage in [false, true] {
        let (svc, records) = tap(
            UsageTapLayer::new().include_usage(include_usage),
            move |_req| {
                let body = ResponseBody::new(StreamBody::new(futures_util::stream::iter(frames())));
                async move { Ok(sse_with(body)) }
            },
        );
        let res = svc
            .oneshot(request(r#"{"model":"llama","stream":true}"#))
            .await
            .unwrap();
        let mut body = Box::pin(res.into_body());
        let (mut data, mut trailers) = (Vec::new(), None);
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            assert!(trailers.is_none(), "a frame after the trailers");
            match frame.into_data() {
                Ok(chunk) => data.extend_from_slice(&chunk),
                Err(frame) => trailers = Some(frame.into_trailers().unwrap()),
            }
            // hyper stops polling once the trailers are out.
            if trailers.is_some() {
                break;
            }
        }
        let expected = match include_usage {
            true => [FIRST, TAIL].concat(),
            false => [FIRST, USAGE, TAIL].concat(),
        };
        assert_eq!(
            String::from_utf8(data).unwrap(),
            expected,
            "{include_usage}"
        );
        assert_eq!(trailers.expect("trailers")["x-trailer"], "1");
        // Recorded before the body is dropped: the trailers ended it.
        let usage = records
            .lock()
            .unwrap()
            .pop()
            .expect("recorded at the trailers");
        assert_eq!(usage.outcome, Outcome::Complete, "{include_usage}");
        assert_eq!(usage.response_bytes, expected.len() as u64);
        drop(body);
    }
}
