//! The one error type of the serving path, mapped once to protocol status codes.

use http::StatusCode;

/// Every failure a request can meet. The message is written for the API user:
/// it names tensors, models and shapes, never internal paths or Rust types.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServeError {
    /// Malformed request, wrong name/dtype/shape/element count, missing input.
    #[error("{0}")]
    BadRequest(String),
    /// Unknown model, version or route.
    #[error("{0}")]
    NotFound(String),
    /// The model exists but cannot take requests (not ready, unloading, shutting down).
    #[error("{0}")]
    Unavailable(String),
    /// The model's queue is at `max_queue_size`.
    #[error("{0}")]
    QueueFull(String),
    /// Body or message larger than the configured limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The client took longer than the configured timeout to send its request.
    #[error("{0}")]
    RequestTimeout(String),
    /// No or a wrong bearer token where authentication is configured.
    #[error("{0}")]
    Unauthorized(String),
    /// The operation is switched off (e.g. the repository API in control mode `none`).
    #[error("{0}")]
    Forbidden(String),
    /// A protocol extension this server does not implement or was started without (CUDA shared
    /// memory, system shared memory with `--no-shared-memory`), as Triton's UNSUPPORTED.
    #[error("{0}")]
    Unsupported(String),
    /// The request waited in the queue past its timeout and was dropped before it ran.
    #[error("{0}")]
    QueueTimeout(String),
    /// The client's own deadline (gRPC `grpc-timeout`) passed before the request ran.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The model's `execute` ran past `execution_timeout_ms`; its instance was replaced.
    #[error("{0}")]
    ExecutionTimeout(String),
    /// The model itself failed while executing.
    #[error("{0}")]
    ModelError(String),
    /// A model refused one request with a Triton code that has no HTTP status of its own
    /// (UNKNOWN, ALREADY_EXISTS, CANCELLED): 400 over HTTP and that code over gRPC, as Triton.
    #[error("{message}")]
    ModelRefused { code: tonic::Code, message: String },
    /// The client went away (closed its connection, cancelled its call) while its request ran.
    #[error("{0}")]
    Cancelled(String),
    /// A bug or an invariant violated inside the server.
    #[error("{0}")]
    Internal(String),
}

/// Shorthand for the request path.
pub type Result<T, E = ServeError> = std::result::Result<T, E>;

impl ServeError {
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::BadRequest(msg.into())
    }

    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::NotFound(msg.into())
    }

    pub fn unavailable(msg: impl Into<String>) -> Self {
        Self::Unavailable(msg.into())
    }

    /// A model's error for one of its requests, by the name of a Triton error code (Python
    /// backend's `TritonError` codes), with Triton's statuses: `INVALID_ARG`, `UNKNOWN`,
    /// `ALREADY_EXISTS` and `CANCELLED` are the client's (HTTP 400; over gRPC each its own code),
    /// `NOT_FOUND` 404, `UNAVAILABLE` 503, `UNSUPPORTED` 501; `INTERNAL` and anything else the
    /// model's failure (500).
    pub fn from_model_code(code: &str, message: String) -> Self {
        match code {
            "INVALID_ARG" => Self::BadRequest(message),
            "UNKNOWN" => Self::ModelRefused { code: tonic::Code::Unknown, message },
            "ALREADY_EXISTS" => Self::ModelRefused { code: tonic::Code::AlreadyExists, message },
            "CANCELLED" => Self::ModelRefused { code: tonic::Code::Cancelled, message },
            "NOT_FOUND" => Self::NotFound(message),
            "UNAVAILABLE" => Self::Unavailable(message),
            "UNSUPPORTED" => Self::Unsupported(message),
            _ => Self::ModelError(message),
        }
    }

    /// The same error, its message prefixed with where it happened (e.g. an ensemble step).
    pub fn context(self, at: &str) -> Self {
        let with = |m: String| format!("{at}: {m}");
        match self {
            Self::BadRequest(m) => Self::BadRequest(with(m)),
            Self::NotFound(m) => Self::NotFound(with(m)),
            Self::Unavailable(m) => Self::Unavailable(with(m)),
            Self::QueueFull(m) => Self::QueueFull(with(m)),
            Self::PayloadTooLarge(m) => Self::PayloadTooLarge(with(m)),
            Self::RequestTimeout(m) => Self::RequestTimeout(with(m)),
            Self::Unauthorized(m) => Self::Unauthorized(with(m)),
            Self::Forbidden(m) => Self::Forbidden(with(m)),
            Self::Unsupported(m) => Self::Unsupported(with(m)),
            Self::QueueTimeout(m) => Self::QueueTimeout(with(m)),
            Self::DeadlineExceeded(m) => Self::DeadlineExceeded(with(m)),
            Self::ExecutionTimeout(m) => Self::ExecutionTimeout(with(m)),
            Self::ModelError(m) => Self::ModelError(with(m)),
            Self::ModelRefused { code, message } => Self::ModelRefused { code, message: with(message) },
            Self::Cancelled(m) => Self::Cancelled(with(m)),
            Self::Internal(m) => Self::Internal(with(m)),
        }
    }

    /// The HTTP status of the KServe V2 REST protocol for this error.
    pub fn http_status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) | Self::ModelRefused { .. } => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            // Queue and execution timeouts are transient: a retry may well succeed.
            Self::Unavailable(_) | Self::QueueFull(_) | Self::QueueTimeout(_) | Self::ExecutionTimeout(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
            Self::ModelError(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            // nginx's "client closed request": only ever seen in access logs.
            Self::Cancelled(_) => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        }
    }

    /// The gRPC status code of the KServe V2 gRPC protocol for this error.
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            Self::BadRequest(_) => tonic::Code::InvalidArgument,
            Self::ModelRefused { code, .. } => *code,
            Self::NotFound(_) => tonic::Code::NotFound,
            Self::Unavailable(_) | Self::QueueFull(_) | Self::QueueTimeout(_) | Self::ExecutionTimeout(_) => {
                tonic::Code::Unavailable
            }
            Self::DeadlineExceeded(_) => tonic::Code::DeadlineExceeded,
            Self::PayloadTooLarge(_) => tonic::Code::ResourceExhausted,
            Self::RequestTimeout(_) => tonic::Code::DeadlineExceeded,
            Self::Unauthorized(_) => tonic::Code::Unauthenticated,
            Self::Forbidden(_) => tonic::Code::PermissionDenied,
            Self::Unsupported(_) => tonic::Code::Unimplemented,
            Self::ModelError(_) | Self::Internal(_) => tonic::Code::Internal,
            Self::Cancelled(_) => tonic::Code::Cancelled,
        }
    }

    /// A short, stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadRequest(_) | Self::PayloadTooLarge(_) | Self::ModelRefused { .. } => "bad_request",
            Self::NotFound(_) => "not_found",
            Self::Unavailable(_) => "unavailable",
            Self::RequestTimeout(_) => "request_timeout",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::Unsupported(_) => "unsupported",
            Self::QueueFull(_) => "queue_full",
            Self::QueueTimeout(_) | Self::DeadlineExceeded(_) => "timeout",
            Self::ExecutionTimeout(_) => "execution_timeout",
            Self::ModelError(_) => "model_error",
            Self::Internal(_) => "internal",
            Self::Cancelled(_) => "cancelled",
        }
    }
}

impl From<ServeError> for tonic::Status {
    fn from(e: ServeError) -> Self {
        tonic::Status::new(e.grpc_code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_models_error_codes_have_tritons_statuses() {
        let status = |code: &str| ServeError::from_model_code(code, "m".into()).http_status().as_u16();
        assert_eq!(
            ["INVALID_ARG", "UNKNOWN", "ALREADY_EXISTS", "CANCELLED", "NOT_FOUND", "UNAVAILABLE", "UNSUPPORTED"]
                .map(status),
            [400, 400, 400, 400, 404, 503, 501]
        );
        assert_eq!(status("INTERNAL"), 500);
        let grpc = |code: &str| ServeError::from_model_code(code, "m".into()).grpc_code();
        assert_eq!(
            ["INVALID_ARG", "UNKNOWN", "ALREADY_EXISTS", "CANCELLED", "UNSUPPORTED", "INTERNAL"].map(grpc),
            [
                tonic::Code::InvalidArgument,
                tonic::Code::Unknown,
                tonic::Code::AlreadyExists,
                tonic::Code::Cancelled,
                tonic::Code::Unimplemented,
                tonic::Code::Internal
            ]
        );
        assert_eq!(status("made-up"), 500);
        assert_eq!(ServeError::from_model_code("INVALID_ARG", "m".into()).to_string(), "m");
    }

    #[test]
    fn statuses_follow_the_v2_protocol() {
        assert_eq!(ServeError::bad_request("x").http_status(), 400);
        assert_eq!(ServeError::not_found("x").http_status(), 404);
        assert_eq!(ServeError::QueueFull("x".into()).http_status(), 503);
        assert_eq!(ServeError::PayloadTooLarge("x".into()).http_status(), 413);
        assert_eq!(ServeError::ModelError("x".into()).http_status(), 500);
        assert_eq!(ServeError::Forbidden("x".into()).http_status(), 403);
        assert_eq!(ServeError::Unauthorized("x".into()).http_status(), 401);
        assert_eq!(ServeError::RequestTimeout("x".into()).http_status(), 408);
        assert_eq!(ServeError::QueueTimeout("x".into()).http_status(), 503);
        assert_eq!(ServeError::ExecutionTimeout("x".into()).http_status(), 503);
        assert_eq!(ServeError::DeadlineExceeded("x".into()).http_status(), 504);
        assert_eq!(ServeError::Unsupported("x".into()).http_status(), 501);
    }

    #[test]
    fn grpc_codes_follow_the_v2_protocol() {
        use tonic::Code;
        let cases = [
            (ServeError::bad_request("x"), Code::InvalidArgument),
            (ServeError::not_found("x"), Code::NotFound),
            (ServeError::unavailable("x"), Code::Unavailable),
            (ServeError::QueueFull("x".into()), Code::Unavailable),
            (ServeError::PayloadTooLarge("x".into()), Code::ResourceExhausted),
            (ServeError::ModelError("x".into()), Code::Internal),
            (ServeError::Internal("x".into()), Code::Internal),
            (ServeError::Unauthorized("x".into()), Code::Unauthenticated),
            (ServeError::Forbidden("x".into()), Code::PermissionDenied),
            (ServeError::RequestTimeout("x".into()), Code::DeadlineExceeded),
            (ServeError::QueueTimeout("x".into()), Code::Unavailable),
            (ServeError::ExecutionTimeout("x".into()), Code::Unavailable),
            (ServeError::DeadlineExceeded("x".into()), Code::DeadlineExceeded),
            (ServeError::Cancelled("x".into()), Code::Cancelled),
            (ServeError::Unsupported("x".into()), Code::Unimplemented),
        ];
        for (e, code) in cases {
            assert_eq!(e.grpc_code(), code, "{e:?}");
            let status = tonic::Status::from(e);
            assert_eq!((status.code(), status.message()), (code, "x"));
        }
    }
}
