//! The names of the metrics the gateway records through the [`metrics`] facade. Nothing is
//! recorded until the application installs a recorder (the example gateway installs the
//! Prometheus exporter with `--metrics ADDR`).

/// Counter of every request the gateway answered. Labels: `status`, `source` (`gateway`
/// or `upstream`), `service` (`proxy` or `manage`).
pub const REQUESTS: &str = "gateway_requests_total";
/// Counter of failures. Label: `cause` (the `x-gateway-error` code of a gateway-made
/// response, or `upstream_idle_timeout` / `upstream_stream_error` for a stream cut short).
pub const ERRORS: &str = "gateway_errors_total";
/// Counter of upstream responses. Labels: `account`, `endpoint`, `status`, `outcome`
/// (`complete`, `failed`, `cancelled`).
pub const UPSTREAM_RESPONSES: &str = "gateway_upstream_responses_total";
/// Histogram (seconds) from the request reaching the tap to the first response body byte.
/// Labels: `account`, `endpoint`.
pub const TIME_TO_FIRST_BYTE: &str = "gateway_time_to_first_byte_seconds";
/// Histogram (seconds) from the request reaching the tap to the end of the response body.
/// Labels: `account`, `endpoint`.
pub const UPSTREAM_DURATION: &str = "gateway_upstream_duration_seconds";
/// Counter of tokens. Labels: `account`, `endpoint`, `team` (each of the principal's
/// teams, or `""`), `type` (`input` or `output`).
pub const TOKENS: &str = "gateway_tokens_total";

/// Counter of rate-limit decisions, one per rule that covers a request. Labels: `scope` (the
/// rule's scope, with `@ACCOUNT/ENDPOINT` if it names one), `outcome` (`allowed` or
/// `refused`), `limit` (the refusing limit, e.g. `tokens_per_day`; `""` when allowed).
pub const RATE_LIMIT_DECISIONS: &str = "gateway_rate_limit_decisions_total";
/// Counter of requests decided while the shared rate-limit backend (Redis) could not be
/// reached. Label: `policy` (`open`: counted in this replica's memory; `closed`: refused with
/// 503).
pub const RATE_LIMIT_BACKEND_ERRORS: &str = "gateway_rate_limit_backend_errors_total";

/// Counter of attempts sent to the targets of an endpoint with a pool. Labels: `account`,
/// `endpoint`, `target` (its base URL), `outcome` (`answered`: a response that is not a
/// failure; `failed_status`: a 5xx or 429; `error`: no response head, the connection failed
/// or was reset; `timeout`: no response head within the first-byte timeout).
pub const UPSTREAM_ATTEMPTS: &str = "gateway_upstream_attempts_total";
/// Counter of retries: attempts after the first. Labels: `account`, `endpoint`, `target` (the
/// target the retry goes to).
pub const UPSTREAM_RETRIES: &str = "gateway_upstream_retries_total";
/// Counter of retries that went to a target of a later priority than the attempt before.
/// Labels: `account`, `endpoint`, `target` (the fallback target).
pub const UPSTREAM_FALLBACKS: &str = "gateway_upstream_fallbacks_total";
/// Counter of targets taken out of their pool. Labels: `account`, `endpoint`, `target`,
/// `reason` (`failures`: failures in a row; `error_ratio`: a share of its last attempts;
/// `retry_after`: a 429 with `Retry-After`).
pub const UPSTREAM_EJECTIONS: &str = "gateway_upstream_ejections_total";
/// Counter of retries the retry budget refused (the failed answer went to the client).
/// Labels: `account`, `endpoint`, `target` (the target that failed).
pub const UPSTREAM_BUDGET_EXHAUSTED: &str = "gateway_upstream_retry_budget_exhausted_total";
/// Counter of responses cut after their head went out (a reset or an idle timeout mid-body),
/// from an endpoint with a pool. Labels: `account`, `endpoint`, `target`.
pub const UPSTREAM_TRUNCATIONS: &str = "gateway_upstream_truncations_total";

/// The `status` label: the common codes without an allocation.
#[cfg(feature = "trace")]
pub(crate) fn status_label(status: http::StatusCode) -> metrics::SharedString {
    let code = match status.as_u16() {
        200 => "200",
        201 => "201",
        204 => "204",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        408 => "408",
        413 => "413",
        414 => "414",
        429 => "429",
        500 => "500",
        501 => "501",
        502 => "502",
        503 => "503",
        504 => "504",
        other => return other.to_string().into(),
    };
    metrics::SharedString::const_str(code)
}
