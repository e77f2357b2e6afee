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

/// The `status` label: the common codes without an allocation.
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
