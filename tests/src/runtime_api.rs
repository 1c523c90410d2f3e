//! A test server for the Lambda Runtime API, the HTTP interface through which
//! a custom runtime fetches events and posts their results.
//!
//! [`RuntimeApi::start`] serves API version `2018-06-01` over HTTP/1.1 on a
//! random port of 127.0.0.1, from a tokio runtime on a background thread.
//! A test queues invocations, starts the runtime with `AWS_LAMBDA_RUNTIME_API`
//! set to [`RuntimeApi::address`], and waits for the outcomes. The server
//! records each departure from the protocol as a violation, so a test can end
//! with [`RuntimeApi::assert_no_violations`].

use crate::server_thread::ServerThread;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Result};
use http_body_util::BodyExt;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, EXPECT};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// Maximum size in bytes of a posted response or error body (6 MiB), after
/// Lambda's documented 6 MB quota on synchronous responses.
///
/// NOTE: Zac Charles measured in "Deep Dive: Lambda's Request Payload Size
/// Limit" (2022) that Lambda accepts responses up to 100 bytes larger, so
/// this server may reject a response that Lambda would accept.
pub const MAX_PAYLOAD: usize = 6 * 1024 * 1024;

/// Function ARN that [`Invocation::new`] sets.
pub const DEFAULT_FUNCTION_ARN: &str = "arn:aws:lambda:us-east-1:123456789012:function:test";

/// Time between handing out an invocation and its deadline, unless
/// [`Invocation::with_timeout`] sets another.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Maximum number of bytes read and discarded from a body over
/// [`MAX_PAYLOAD`]. Reading the whole body keeps the connection usable after
/// the 413, and a client that sends more gets the 413 on a closed connection.
const MAX_DRAINED: u64 = 64 * 1024 * 1024;

const API_PREFIX: &str = "/2018-06-01/runtime/";

const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("lambda-runtime-aws-request-id");
const DEADLINE_HEADER: HeaderName = HeaderName::from_static("lambda-runtime-deadline-ms");
const FUNCTION_ARN_HEADER: HeaderName = HeaderName::from_static("lambda-runtime-invoked-function-arn");
const TRACE_ID_HEADER: HeaderName = HeaderName::from_static("lambda-runtime-trace-id");
const CLIENT_CONTEXT_HEADER: HeaderName = HeaderName::from_static("lambda-runtime-client-context");
const COGNITO_IDENTITY_HEADER: HeaderName = HeaderName::from_static("lambda-runtime-cognito-identity");
const ERROR_TYPE_HEADER: &str = "lambda-runtime-function-error-type";

/// An event to hand to the runtime, built with [`Invocation::new`] and the
/// `with_*` methods.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// Value of `Lambda-Runtime-Aws-Request-Id` and of `{id}` in the paths
    /// where the runtime posts the outcome. Must be unique per server.
    pub request_id: String,
    /// Body of the `next` response.
    pub payload: Vec<u8>,
    /// Time from handing out the event to the deadline sent in
    /// `Lambda-Runtime-Deadline-Ms`.
    pub timeout: Duration,
    /// Value of `Lambda-Runtime-Invoked-Function-Arn`.
    pub function_arn: String,
    /// Value of `Lambda-Runtime-Trace-Id`, which is sent only when set.
    pub trace_id: Option<String>,
    /// Value of `Lambda-Runtime-Client-Context`, which is sent only when set.
    pub client_context: Option<String>,
    /// Value of `Lambda-Runtime-Cognito-Identity`, which is sent only when set.
    pub cognito_identity: Option<String>,
}

impl Invocation {
    /// Creates an invocation of `payload` with a new UUID v4 request id, the
    /// default timeout and the default function ARN.
    pub fn new(payload: impl Into<Vec<u8>>) -> Invocation {
        Invocation {
            request_id: uuid::Uuid::new_v4().to_string(),
            payload: payload.into(),
            timeout: DEFAULT_TIMEOUT,
            function_arn: DEFAULT_FUNCTION_ARN.to_owned(),
            trace_id: None,
            client_context: None,
            cognito_identity: None,
        }
    }

    /// Creates an invocation whose payload is `value` serialized as JSON.
    pub fn json(value: &Value) -> Invocation {
        Invocation::new(value.to_string())
    }

    pub fn with_request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = request_id.into();
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn with_function_arn(mut self, function_arn: impl Into<String>) -> Self {
        self.function_arn = function_arn.into();
        self
    }

    pub fn with_trace_id(mut self, trace_id: impl Into<String>) -> Self {
        self.trace_id = Some(trace_id.into());
        self
    }

    pub fn with_client_context(mut self, client_context: impl Into<String>) -> Self {
        self.client_context = Some(client_context.into());
        self
    }

    pub fn with_cognito_identity(mut self, cognito_identity: impl Into<String>) -> Self {
        self.cognito_identity = Some(cognito_identity.into());
        self
    }
}

/// A request that the runtime posted: its headers and body.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Every header line in the order hyper stores them, which keeps the
    /// values of one name in the order received. Names are lower-case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    /// Returns the first value of header `name`, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header, _)| header.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// Parses the body as JSON, and panics with the body text if it is not
    /// valid JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("recorded body is not valid JSON ({error}): {}", self.text()))
    }

    /// Returns the body as text, with invalid UTF-8 replaced by U+FFFD.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// How an invocation that the runtime received ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The runtime posted to `/runtime/invocation/{id}/response`.
    Response(Recorded),
    /// The runtime posted to `/runtime/invocation/{id}/error`.
    Error(Recorded),
    /// The runtime requested the next event without posting an outcome.
    Abandoned,
}

impl Outcome {
    fn name(&self) -> &'static str {
        match self {
            Outcome::Response(_) => "a response",
            Outcome::Error(_) => "an error",
            Outcome::Abandoned => "abandoned",
        }
    }
}

/// A running Runtime API server. Dropping it stops the server and joins its
/// thread. Connections close, and pending `next` requests get no response.
pub struct RuntimeApi {
    address: SocketAddr,
    shared: Arc<Shared>,
    /// The server; dropping it stops the server.
    _server: ServerThread,
}

impl RuntimeApi {
    /// Binds a free port of 127.0.0.1 and starts serving on a new thread.
    pub fn start() -> Result<RuntimeApi> {
        let bound = ServerThread::bind("Runtime API server")?;
        let address = bound.address();
        let shared = Arc::new(Shared::default());
        let server_shared = Arc::clone(&shared);
        let server = bound.spawn(move |listener| accept_connections(listener, server_shared))?;
        Ok(RuntimeApi {
            address,
            shared,
            _server: server,
        })
    }

    /// Returns `127.0.0.1:PORT`, the value for `AWS_LAMBDA_RUNTIME_API`.
    pub fn address(&self) -> String {
        self.address.to_string()
    }

    /// Appends `invocation` to the queue that `next` serves in order, and
    /// returns its request id.
    ///
    /// Panics if the request id is already queued or a header value is
    /// invalid, such as one that contains a line break.
    pub fn queue(&self, invocation: Invocation) -> String {
        let request_id = invocation.request_id.clone();
        let event = QueuedEvent::new(invocation);
        {
            let mut state = self.shared.lock();
            assert!(
                !state.invocations.contains_key(&request_id),
                "request id {request_id} is already queued on this Runtime API server"
            );
            state.queue.push_back(request_id.clone());
            state.invocations.insert(request_id.clone(), Entry::new(event));
        }
        // A `next` request creates its `Notified` before it checks the queue,
        // so it cannot miss this wakeup.
        self.shared.queued.notify_waiters();
        request_id
    }

    /// Waits until the runtime posts a response or an error for `request_id`,
    /// or requests the next event without posting one.
    ///
    /// Fails at once for an id that was never queued. On timeout, the error
    /// states whether the runtime received the invocation at all.
    pub fn wait_outcome(&self, request_id: &str, timeout: Duration) -> Result<Outcome> {
        let waited = self.wait_for(timeout, |state| match state.invocations.get(request_id) {
            None => Some(Err(anyhow!("no invocation with request id {request_id} was queued"))),
            Some(entry) => entry.outcome.clone().map(Ok),
        });
        let state = match waited {
            Ok(outcome) => return outcome,
            Err(state) => state,
        };

        let entry = &state.invocations[request_id];
        let progress = if entry.handed_out.is_some() {
            "the runtime received it but posted no response or error".to_owned()
        } else {
            let ahead = state.queue.iter().position(|id| id == request_id).unwrap_or(0);
            format!(
                "the runtime never received it ({} GET next requests so far, {ahead} invocations ahead of it)",
                state.polls
            )
        };
        bail!(
            "timed out after {timeout:?} waiting for the outcome of invocation {request_id}: {progress}{}",
            describe_violations(&state.violations)
        )
    }

    /// Queues `invocation` and waits for its outcome.
    pub fn invoke(&self, invocation: Invocation, timeout: Duration) -> Result<Outcome> {
        let request_id = self.queue(invocation);
        self.wait_outcome(&request_id, timeout)
    }

    /// Waits until the runtime posts to `/runtime/init/error`, and returns the
    /// first such request.
    pub fn wait_init_error(&self, timeout: Duration) -> Result<Recorded> {
        match self.wait_for(timeout, |state| state.init_error.clone()) {
            Ok(recorded) => Ok(recorded),
            Err(state) => bail!(
                "timed out after {timeout:?} waiting for an init error ({} GET next requests so far){}",
                state.polls,
                describe_violations(&state.violations)
            ),
        }
    }

    /// Returns the first init error that the runtime posted, if any.
    pub fn init_error(&self) -> Option<Recorded> {
        self.shared.lock().init_error.clone()
    }

    /// Waits until `count` `next` requests have arrived since the start.
    pub fn wait_polls(&self, count: usize, timeout: Duration) -> Result<()> {
        match self.wait_for(timeout, |state| (state.polls >= count).then_some(())) {
            Ok(()) => Ok(()),
            Err(state) => bail!(
                "timed out after {timeout:?} waiting for {count} GET next requests: {} arrived{}",
                state.polls,
                describe_violations(&state.violations)
            ),
        }
    }

    /// Returns when the first `next` request arrived.
    pub fn first_poll(&self) -> Option<Instant> {
        self.shared.lock().first_poll
    }

    /// Returns the time from just before the server wrote the event of
    /// `request_id` to the connection to when it had read the whole body of
    /// the outcome. `None` until a response or error is recorded.
    pub fn overhead(&self, request_id: &str) -> Option<Duration> {
        let state = self.shared.lock();
        let entry = state.invocations.get(request_id)?;
        entry.received?.checked_duration_since(entry.handed_out?)
    }

    /// Returns the number of `next` requests that have arrived.
    pub fn polls(&self) -> usize {
        self.shared.lock().polls
    }

    /// Returns a description of each protocol violation, in the order they
    /// happened.
    pub fn violations(&self) -> Vec<String> {
        self.shared.lock().violations.clone()
    }

    /// Panics with the list of violations unless there are none.
    pub fn assert_no_violations(&self) {
        let violations = self.violations();
        assert!(
            violations.is_empty(),
            "the runtime violated the Runtime API protocol:{}",
            describe_violations(&violations)
        );
    }

    /// Waits until `ready` returns a value, or returns the locked state on
    /// timeout so that the caller can describe it.
    fn wait_for<T>(
        &self,
        timeout: Duration,
        mut ready: impl FnMut(&State) -> Option<T>,
    ) -> Result<T, MutexGuard<'_, State>> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if let Some(value) = ready(&state) {
                return Ok(value);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(state);
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Formats violations as an indented list that starts on a new line, or as
/// nothing when there are none.
fn describe_violations(violations: &[String]) -> String {
    let mut text = String::new();
    if !violations.is_empty() {
        text.push_str("\nviolations so far:");
    }
    for violation in violations {
        text.push_str("\n  - ");
        text.push_str(violation);
    }
    text
}

/// State shared by the server thread and the synchronous API.
#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Notified on every change of `state`, for the synchronous waits.
    changed: Condvar,
    /// Notified when an invocation is queued, for pending `next` requests.
    queued: Notify,
    /// Number of accepted TCP connections.
    connections: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `change` on the locked state, then wakes the synchronous waits.
    fn update<T>(&self, change: impl FnOnce(&mut State) -> T) -> T {
        let result = change(&mut self.lock());
        self.changed.notify_all();
        result
    }
}

#[derive(Default)]
struct State {
    /// Request ids of the invocations not handed out yet, oldest first.
    queue: VecDeque<String>,
    invocations: HashMap<String, Entry>,
    /// Request ids of handed-out invocations that have no outcome yet.
    open: Vec<String>,
    /// Number of invocations handed out.
    handed_out: usize,
    polls: usize,
    first_poll: Option<Instant>,
    init_error: Option<Recorded>,
    violations: Vec<String>,
}

impl State {
    fn record_violation(&mut self, violation: String) {
        eprintln!("runtime API violation: {violation}");
        self.violations.push(violation);
    }
}

/// An invocation and what has happened to it.
struct Entry {
    event: QueuedEvent,
    /// When the event was last about to be written to the connection.
    handed_out: Option<Instant>,
    /// When the body of the outcome had been read completely.
    received: Option<Instant>,
    outcome: Option<Outcome>,
}

impl Entry {
    fn new(event: QueuedEvent) -> Entry {
        Entry {
            event,
            handed_out: None,
            received: None,
            outcome: None,
        }
    }
}

/// An invocation converted to what the `next` response needs, so that
/// handing it out only clones reference-counted buffers.
struct QueuedEvent {
    payload: Bytes,
    timeout: Duration,
    /// Every header except the deadline, which depends on the hand-out time.
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl QueuedEvent {
    /// Panics if a header value is invalid.
    fn new(invocation: Invocation) -> QueuedEvent {
        let optional = [
            (TRACE_ID_HEADER, invocation.trace_id),
            (CLIENT_CONTEXT_HEADER, invocation.client_context),
            (COGNITO_IDENTITY_HEADER, invocation.cognito_identity),
        ];
        let mut headers = vec![
            (CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (
                REQUEST_ID_HEADER,
                header_value(&REQUEST_ID_HEADER, invocation.request_id),
            ),
            (
                FUNCTION_ARN_HEADER,
                header_value(&FUNCTION_ARN_HEADER, invocation.function_arn),
            ),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                let value = header_value(&name, value);
                headers.push((name, value));
            }
        }
        QueuedEvent {
            payload: Bytes::from(invocation.payload),
            timeout: invocation.timeout,
            headers,
        }
    }
}

fn header_value(name: &HeaderName, value: String) -> HeaderValue {
    HeaderValue::try_from(value.as_str())
        .unwrap_or_else(|error| panic!("invalid value for header {name} ({error}): {value:?}"))
}

/// Accepts connections until the task is dropped, serving each on its own task.
async fn accept_connections(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Errors such as EMFILE persist for a while, so pause instead
                // of retrying in a busy loop.
                eprintln!("runtime API: failed to accept a connection: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(error) = stream.set_nodelay(true) {
            eprintln!("runtime API: failed to set TCP_NODELAY on the connection from {peer}: {error}");
        }
        shared.connections.fetch_add(1, Ordering::Relaxed);

        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |request| handle_request(Arc::clone(&shared), request));
            let connection = http1::Builder::new()
                .keep_alive(true)
                // A runtime's connection stays idle between invocations for
                // as long as a test likes.
                .header_read_timeout(None)
                .serve_connection(TokioIo::new(stream), service);
            // A runtime killed while its `GET next` waits closes the
            // connection mid-request: expected when a test ends.
            if let Err(error) = connection.await {
                if !error.is_incomplete_message() {
                    eprintln!("runtime API: connection from {peer} failed: {error}");
                }
            }
        });
    }
}

/// An endpoint of the Runtime API.
#[derive(Debug, PartialEq)]
enum Route<'a> {
    Next,
    Response(&'a str),
    Error(&'a str),
    InitError,
}

/// Returns the endpoint for `method` and `path`, or `None` for any other
/// request.
fn route<'a>(method: &Method, path: &'a str) -> Option<Route<'a>> {
    let endpoint = path.strip_prefix(API_PREFIX)?;
    if method == Method::GET {
        return (endpoint == "invocation/next").then_some(Route::Next);
    }
    if method != Method::POST {
        return None;
    }
    if endpoint == "init/error" {
        return Some(Route::InitError);
    }

    let (request_id, action) = endpoint.strip_prefix("invocation/")?.split_once('/')?;
    if request_id.is_empty() {
        return None;
    }
    match action {
        "response" => Some(Route::Response(request_id)),
        "error" => Some(Route::Error(request_id)),
        _ => None,
    }
}

async fn handle_request(shared: Arc<Shared>, request: Request<Incoming>) -> Result<Response<ResponseBody>, Infallible> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let endpoint = format!("{method} {path}");

    let response = match route(&method, &path) {
        Some(Route::Next) => next_invocation(&shared).await,
        Some(Route::Response(request_id)) => {
            post_outcome(&shared, &endpoint, Some(request_id), OutcomeKind::Response, request).await
        }
        Some(Route::Error(request_id)) => {
            post_outcome(&shared, &endpoint, Some(request_id), OutcomeKind::Error, request).await
        }
        Some(Route::InitError) => post_outcome(&shared, &endpoint, None, OutcomeKind::Error, request).await,
        None => {
            let message = format!("{endpoint}: not an endpoint of the Runtime API");
            shared.update(|state| state.record_violation(message.clone()));
            error_response(StatusCode::NOT_FOUND, "NotFound", &message)
        }
    };
    Ok(response)
}

/// Serves `GET /runtime/invocation/next`: abandons any open invocation, then
/// waits for the next queued one and hands it out.
async fn next_invocation(shared: &Arc<Shared>) -> Response<ResponseBody> {
    shared.update(|state| {
        state.polls += 1;
        state.first_poll.get_or_insert_with(Instant::now);
        for request_id in std::mem::take(&mut state.open) {
            if let Some(entry) = state.invocations.get_mut(&request_id) {
                entry.outcome = Some(Outcome::Abandoned);
            }
            state.record_violation(format!(
                "GET next arrived while invocation {request_id} had no response or error, \
                 so that invocation is marked abandoned"
            ));
        }
    });

    let (request_id, mut response) = loop {
        // Created before the check so that a `queue` between the check and
        // the wait still wakes this request.
        let queued = shared.queued.notified();
        if let Some(handed_out) = shared.update(hand_out_next) {
            break handed_out;
        }
        queued.await;
    };

    // The first poll of the body updates the hand-out time, right before
    // hyper writes the response to the socket.
    response.body_mut().hand_out = Some((Arc::clone(shared), request_id));
    response
}

/// Takes the oldest queued invocation, marks it handed out, and builds its
/// `next` response. Returns `None` when the queue is empty.
fn hand_out_next(state: &mut State) -> Option<(String, Response<ResponseBody>)> {
    let request_id = state.queue.pop_front()?;
    let entry = state
        .invocations
        .get_mut(&request_id)
        .expect("every queued request id has an entry");

    let deadline = SystemTime::now() + entry.event.timeout;
    let deadline_ms = deadline.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    let mut response = Response::new(ResponseBody::new(entry.event.payload.clone()));
    let headers = response.headers_mut();
    for (name, value) in &entry.event.headers {
        headers.insert(name.clone(), value.clone());
    }
    headers.insert(DEADLINE_HEADER, HeaderValue::from(deadline_ms as u64));
    entry.handed_out = Some(Instant::now());

    state.open.push(request_id.clone());
    state.handed_out += 1;
    Some((request_id, response))
}

#[derive(Clone, Copy, PartialEq)]
enum OutcomeKind {
    Response,
    Error,
}

/// Serves the posts of a response or error. `request_id` is `None` for an
/// init error.
async fn post_outcome(
    shared: &Shared,
    endpoint: &str,
    request_id: Option<&str>,
    kind: OutcomeKind,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    let headers = request.headers().clone();
    let body = match read_limited_body(request).await {
        Ok(body) => body,
        Err(BodyError::TooLarge(size)) => {
            let message = format!("{endpoint}: the body of {size} exceeds the limit of {MAX_PAYLOAD} bytes");
            shared.update(|state| state.record_violation(message.clone()));
            return error_response(StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLarge", &message);
        }
        Err(BodyError::Read(error)) => {
            let message = format!("{endpoint}: failed to read the body: {error}");
            shared.update(|state| state.record_violation(message.clone()));
            return error_response(StatusCode::BAD_REQUEST, "InvalidRequest", &message);
        }
    };
    let received = Instant::now();

    let format_problems = match kind {
        OutcomeKind::Response => Vec::new(),
        OutcomeKind::Error => check_error_report(&headers, &body),
    };
    let recorded = Recorded {
        headers: record_headers(&headers),
        body,
    };

    let rejection = shared.update(|state| {
        for problem in format_problems {
            state.record_violation(format!("{endpoint}: {problem}"));
        }
        match request_id {
            Some(request_id) => record_outcome(state, endpoint, request_id, kind, recorded, received),
            None => record_init_error(state, endpoint, recorded),
        }
    });
    match rejection {
        None => json_response(StatusCode::ACCEPTED, json!({"status": "OK"})),
        Some((error_type, message)) => error_response(StatusCode::BAD_REQUEST, error_type, &message),
    }
}

/// Records the outcome of `request_id`, or a violation when the invocation
/// cannot take one. Returns the `errorType` and message of a rejection.
fn record_outcome(
    state: &mut State,
    endpoint: &str,
    request_id: &str,
    kind: OutcomeKind,
    recorded: Recorded,
    received: Instant,
) -> Option<(&'static str, String)> {
    let rejection = match state.invocations.get_mut(request_id) {
        None => Some((
            "InvalidRequestID",
            format!("{endpoint}: no invocation has the request id {request_id}"),
        )),
        Some(entry) if entry.handed_out.is_none() => Some((
            "InvalidStateTransition",
            format!("{endpoint}: invocation {request_id} has not been handed out yet"),
        )),
        Some(Entry {
            outcome: Some(outcome), ..
        }) => Some((
            "InvalidStateTransition",
            format!(
                "{endpoint}: invocation {request_id} already has an outcome ({})",
                outcome.name()
            ),
        )),
        Some(entry) => {
            entry.outcome = Some(match kind {
                OutcomeKind::Response => Outcome::Response(recorded),
                OutcomeKind::Error => Outcome::Error(recorded),
            });
            entry.received = Some(received);
            None
        }
    };

    match &rejection {
        Some((_, message)) => state.record_violation(message.clone()),
        None => state.open.retain(|id| id != request_id),
    }
    rejection
}

/// Records the init error, or a violation for a second one. An init error
/// after an invocation was handed out is recorded with a violation.
fn record_init_error(state: &mut State, endpoint: &str, recorded: Recorded) -> Option<(&'static str, String)> {
    if state.init_error.is_some() {
        let message = format!("{endpoint}: the runtime already posted an init error");
        state.record_violation(message.clone());
        return Some(("InvalidStateTransition", message));
    }
    if state.handed_out > 0 {
        state.record_violation(format!(
            "{endpoint}: init error posted after {} invocations were handed out",
            state.handed_out
        ));
    }
    state.init_error = Some(recorded);
    None
}

/// Lists how an error report departs from the Runtime API's format: a JSON
/// object with string `errorMessage` and `errorType`, an optional
/// `stackTrace` array of strings, and a `Lambda-Runtime-Function-Error-Type`
/// header.
fn check_error_report(headers: &HeaderMap, body: &[u8]) -> Vec<String> {
    let mut problems = Vec::new();
    if !headers.contains_key(ERROR_TYPE_HEADER) {
        problems.push("the Lambda-Runtime-Function-Error-Type header is missing".to_owned());
    }

    let fields = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => fields,
        Ok(_) => {
            problems.push(format!("the body is not a JSON object: {}", excerpt(body)));
            return problems;
        }
        Err(error) => {
            problems.push(format!("the body is not valid JSON ({error}): {}", excerpt(body)));
            return problems;
        }
    };
    for name in ["errorMessage", "errorType"] {
        match fields.get(name) {
            Some(Value::String(_)) => {}
            Some(other) => problems.push(format!("{name} is not a string: {other}")),
            None => problems.push(format!("{name} is missing from the body: {}", excerpt(body))),
        }
    }
    match fields.get("stackTrace") {
        None => {}
        Some(Value::Array(frames)) if frames.iter().all(Value::is_string) => {}
        Some(other) => problems.push(format!("stackTrace is not an array of strings: {other}")),
    }
    problems
}

/// Returns the start of `body` as text for a violation message.
fn excerpt(body: &[u8]) -> String {
    const MAX_CHARS: usize = 200;
    let text = String::from_utf8_lossy(body);
    if text.chars().count() <= MAX_CHARS {
        return format!("{text:?}");
    }
    let start: String = text.chars().take(MAX_CHARS).collect();
    format!("{start:?} (truncated, {} bytes in all)", body.len())
}

fn record_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            (name.as_str().to_owned(), value)
        })
        .collect()
}

enum BodyError {
    /// The body is over [`MAX_PAYLOAD`]. The text describes its size.
    TooLarge(String),
    Read(hyper::Error),
}

/// Reads a request body of at most [`MAX_PAYLOAD`] bytes.
///
/// A larger body is read and discarded up to [`MAX_DRAINED`] bytes, so that
/// the connection can serve the next request. The exception is a request
/// with `Expect: 100-continue` whose Content-Length is over the limit: it is
/// rejected without reading, and hyper sends no `100 Continue`.
async fn read_limited_body(request: Request<Incoming>) -> Result<Vec<u8>, BodyError> {
    let declared_length = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let expects_continue = request
        .headers()
        .get(EXPECT)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if let Some(length) = declared_length {
        if expects_continue && length > MAX_PAYLOAD as u64 {
            return Err(BodyError::TooLarge(format!("{length} bytes (from Content-Length)")));
        }
    }

    // Hyper sends `100 Continue`, when the request expects it, on the first
    // read of the body.
    let mut body = request.into_body();
    let capacity = declared_length.unwrap_or(0).min(MAX_PAYLOAD as u64) as usize;
    let mut data = Vec::with_capacity(capacity);
    let mut length: u64 = 0;
    while let Some(frame) = body.frame().await {
        let Ok(chunk) = frame.map_err(BodyError::Read)?.into_data() else {
            continue; // trailers
        };
        length += chunk.len() as u64;
        if length <= MAX_PAYLOAD as u64 {
            data.extend_from_slice(&chunk);
        } else if length > MAX_DRAINED {
            return Err(BodyError::TooLarge(format!("more than {MAX_DRAINED} bytes")));
        } else {
            data = Vec::new();
        }
    }

    if length > MAX_PAYLOAD as u64 {
        return Err(BodyError::TooLarge(format!("{length} bytes")));
    }
    Ok(data)
}

fn json_response(status: StatusCode, body: Value) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error_response(status: StatusCode, error_type: &str, message: &str) -> Response<ResponseBody> {
    json_response(status, json!({"errorMessage": message, "errorType": error_type}))
}

/// Body of every response that the server sends: one chunk of bytes.
///
/// For an event, the first poll also updates the hand-out time of its
/// invocation. Hyper polls the body after it has buffered the response head
/// and before it writes both to the socket. Hyper may skip polling an empty
/// body, and then the time taken when the event left the queue remains.
struct ResponseBody {
    data: Option<Bytes>,
    hand_out: Option<(Arc<Shared>, String)>,
}

impl ResponseBody {
    fn new(data: Bytes) -> ResponseBody {
        ResponseBody {
            data: Some(data),
            hand_out: None,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _context: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some((shared, request_id)) = this.hand_out.take() {
            let now = Instant::now();
            if let Some(entry) = shared.lock().invocations.get_mut(&request_id) {
                entry.handed_out = Some(now);
            }
        }
        Poll::Ready(this.data.take().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |data| data.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
    use std::net::TcpStream;
    use std::sync::mpsc;

    /// Maximum wait for anything that should happen at once.
    const WAIT: Duration = Duration::from_secs(10);
    /// Wait that is expected to time out.
    const SHORT_WAIT: Duration = Duration::from_millis(100);

    const NEXT_PATH: &str = "/2018-06-01/runtime/invocation/next";
    const INIT_ERROR_PATH: &str = "/2018-06-01/runtime/init/error";
    const ERROR_TYPE: (&str, &str) = ("Lambda-Runtime-Function-Error-Type", "Runtime.Test");

    fn response_path(request_id: &str) -> String {
        format!("/2018-06-01/runtime/invocation/{request_id}/response")
    }

    fn error_path(request_id: &str) -> String {
        format!("/2018-06-01/runtime/invocation/{request_id}/error")
    }

    fn error_report() -> Vec<u8> {
        json!({"errorMessage": "boom", "errorType": "Exception", "stackTrace": ["#0 index.php(3)"]})
            .to_string()
            .into_bytes()
    }

    /// A response as read from the socket.
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(header, _)| header.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_str())
        }

        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).expect("the reply body is JSON")
        }
    }

    /// A minimal HTTP/1.1 client on one connection, so that tests control
    /// every byte and can check keep-alive and `Expect: 100-continue`.
    struct Client {
        stream: BufReader<TcpStream>,
    }

    impl Client {
        fn connect(api: &RuntimeApi) -> Client {
            let stream = TcpStream::connect(api.address()).expect("failed to connect to the Runtime API server");
            stream.set_read_timeout(Some(WAIT)).unwrap();
            Client {
                stream: BufReader::new(stream),
            }
        }

        fn send_head(&mut self, method: &str, path: &str, headers: &[(&str, &str)], content_length: Option<usize>) {
            self.send(method, path, headers, content_length, b"");
        }

        fn send_body(&mut self, body: &[u8]) {
            self.stream.get_mut().write_all(body).unwrap();
        }

        /// Writes the request head and `body` with one write, because a
        /// second small write waits for the ACK of the first (Nagle's
        /// algorithm) and the server delays that ACK.
        fn send(
            &mut self,
            method: &str,
            path: &str,
            headers: &[(&str, &str)],
            content_length: Option<usize>,
            body: &[u8],
        ) {
            let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
            for (name, value) in headers {
                request.push_str(&format!("{name}: {value}\r\n"));
            }
            if let Some(length) = content_length {
                request.push_str(&format!("Content-Length: {length}\r\n"));
            }
            request.push_str("\r\n");
            let mut request = request.into_bytes();
            request.extend_from_slice(body);
            self.stream.get_mut().write_all(&request).unwrap();
        }

        fn get_next(&mut self) -> Reply {
            self.send_head("GET", NEXT_PATH, &[], None);
            self.read_reply()
        }

        fn post(&mut self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
            self.send("POST", path, headers, Some(body.len()), body);
            self.read_reply()
        }

        fn read_reply(&mut self) -> Reply {
            let mut status_line = String::new();
            let read = self
                .stream
                .read_line(&mut status_line)
                .expect("failed to read a status line");
            assert!(read > 0, "the server closed the connection instead of replying");
            let status = status_line
                .split(' ')
                .nth(1)
                .and_then(|code| code.parse().ok())
                .unwrap_or_else(|| panic!("invalid status line {status_line:?}"));

            let mut headers = Vec::new();
            loop {
                let mut line = String::new();
                self.stream.read_line(&mut line).expect("failed to read a header line");
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                let (name, value) = line.split_once(':').expect("a header line has a colon");
                headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
            }

            let mut reply = Reply {
                status,
                headers,
                body: Vec::new(),
            };
            if (100..200).contains(&status) {
                return reply;
            }
            let length: usize = reply
                .header("content-length")
                .expect("the server sends Content-Length")
                .parse()
                .unwrap();
            reply.body = vec![0; length];
            self.stream.read_exact(&mut reply.body).unwrap();
            reply
        }

        /// Returns whether the server closed the connection within the read
        /// timeout.
        fn is_closed(&mut self) -> bool {
            let mut byte = [0; 1];
            match self.stream.read(&mut byte) {
                Ok(0) => true,
                Ok(_) => false,
                Err(error) => error.kind() == ErrorKind::ConnectionReset,
            }
        }
    }

    /// Queues `invocation`, receives it with `client` and returns its
    /// request id.
    fn hand_out(api: &RuntimeApi, client: &mut Client, invocation: Invocation) -> String {
        let request_id = api.queue(invocation);
        let reply = client.get_next();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("lambda-runtime-aws-request-id"), Some(request_id.as_str()));
        request_id
    }

    fn epoch_ms(time: SystemTime) -> u128 {
        time.duration_since(UNIX_EPOCH).unwrap().as_millis()
    }

    #[test]
    fn invocation_defaults() {
        let first = Invocation::new("{}");
        let second = Invocation::new("{}");

        let request_id = uuid::Uuid::parse_str(&first.request_id).expect("the request id is a UUID");
        assert_eq!(request_id.get_version_num(), 4);
        assert_ne!(first.request_id, second.request_id);
        assert_eq!(first.timeout, Duration::from_secs(30));
        assert_eq!(
            first.function_arn,
            "arn:aws:lambda:us-east-1:123456789012:function:test"
        );
        assert_eq!(first.trace_id, None);
        assert_eq!(first.client_context, None);
        assert_eq!(first.cognito_identity, None);
        assert_eq!(Invocation::json(&json!({"a": [1, 2]})).payload, br#"{"a":[1,2]}"#);
    }

    #[test]
    fn invocation_handed_out_and_answered() {
        let api = RuntimeApi::start().unwrap();
        let mut client = Client::connect(&api);
        let invocation = Invocation::json(&json!({"name": "event"}))
            .with_request_id("request-1")
            .with_timeout(Duration::from_secs(5))
            .with_function_arn("arn:aws:lambda:eu-west-1:000000000000:function:other")
            .with_trace_id("Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1")
            .with_client_context(r#"{"custom":{"a":"b"}}"#)
            .with_cognito_identity(r#"{"cognitoIdentityId":"id"}"#);
        let request_id = api.queue(invocation);
        assert_eq!(request_id, "request-1");

        let started = Instant::now();
        let before = SystemTime::now();
        let event = client.get_next();
        let after = SystemTime::now();

        assert_eq!(event.status, 200);
        assert_eq!(event.body, br#"{"name":"event"}"#);
        assert_eq!(event.header("content-type"), Some("application/json"));
        assert_eq!(event.header("lambda-runtime-aws-request-id"), Some("request-1"));
        assert_eq!(
            event.header("lambda-runtime-invoked-function-arn"),
            Some("arn:aws:lambda:eu-west-1:000000000000:function:other")
        );
        assert_eq!(
            event.header("lambda-runtime-trace-id"),
            Some("Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1")
        );
        assert_eq!(
            event.header("lambda-runtime-client-context"),
            Some(r#"{"custom":{"a":"b"}}"#)
        );
        assert_eq!(
            event.header("lambda-runtime-cognito-identity"),
            Some(r#"{"cognitoIdentityId":"id"}"#)
        );
        let deadline: u128 = event.header("lambda-runtime-deadline-ms").unwrap().parse().unwrap();
        assert!(deadline >= epoch_ms(before) + 5000, "deadline {deadline} is too early");
        assert!(deadline <= epoch_ms(after) + 5000, "deadline {deadline} is too late");

        let headers = [
            ("Content-Type", "application/json"),
            ("X-Repeated", "one"),
            ("x-repeated", "two"),
        ];
        let reply = client.post(&response_path(&request_id), &headers, br#"{"ok":true}"#);
        let elapsed = started.elapsed();
        assert_eq!(reply.status, 202);
        assert_eq!(reply.json(), json!({"status": "OK"}));

        let Outcome::Response(recorded) = api.wait_outcome(&request_id, WAIT).unwrap() else {
            panic!("the outcome is not a response");
        };
        assert_eq!(recorded.json(), json!({"ok": true}));
        assert_eq!(recorded.text(), r#"{"ok":true}"#);
        assert_eq!(recorded.header("CONTENT-TYPE"), Some("application/json"));
        assert_eq!(recorded.header("x-repeated"), Some("one"));
        let repeated: Vec<_> = recorded
            .headers
            .iter()
            .filter(|(name, _)| name == "x-repeated")
            .collect();
        assert_eq!(
            repeated,
            [
                &("x-repeated".to_owned(), "one".to_owned()),
                &("x-repeated".to_owned(), "two".to_owned())
            ]
        );

        let overhead = api.overhead(&request_id).expect("the overhead is measured");
        assert!(overhead > Duration::ZERO);
        assert!(
            overhead <= elapsed,
            "overhead {overhead:?} exceeds the client's {elapsed:?}"
        );
        let first_poll = api.first_poll().expect("the first poll is recorded");
        assert!(first_poll >= started);
        assert_eq!(api.polls(), 1);
        api.assert_no_violations();
    }

    #[test]
    fn next_omits_unset_optional_headers() {
        let api = RuntimeApi::start().unwrap();
        let mut client = Client::connect(&api);
        api.queue(Invocation::new(""));

        let event = client.get_next();

        assert_eq!(event.status, 200);
        assert_eq!(event.body, b"");
        assert_eq!(
            event.header("lambda-runtime-invoked-function-arn"),
            Some(DEFAULT_FUNCTION_ARN)
        );
        assert!(event.header("lambda-runtime-deadline-ms").is_some());
        assert_eq!(event.header("lambda-runtime-trace-id"), None);
        assert_eq!(event.header("lambda-runtime-client-context"), None);
        assert_eq!(event.header("lambda-runtime-cognito-identity"), None);
    }

    #[test]
    fn next_blocks_until_queued() {
        let api = RuntimeApi::start().unwrap();
        let (sender, receiver) = mpsc::channel();

        thread::scope(|scope| {
            let api = &api;
            scope.spawn(move || {
                let mut client = Client::connect(api);
                sender.send(client.get_next()).unwrap();
            });

            api.wait_polls(1, WAIT).unwrap();
            assert!(api.wait_polls(2, SHORT_WAIT).is_err());
            thread::sleep(Duration::from_millis(200));
            assert!(
                receiver.try_recv().is_err(),
                "next returned before an invocation was queued"
            );

            let request_id = api.queue(Invocation::new("late"));
            let event = receiver.recv_timeout(WAIT).expect("next returned after the queueing");
            assert_eq!(event.status, 200);
            assert_eq!(event.body, b"late");
            assert_eq!(event.header("lambda-runtime-aws-request-id"), Some(request_id.as_str()));
        });
        api.assert_no_violations();
    }

    #[test]
    fn error_post_is_recorded() {
        let api = RuntimeApi::start().unwrap();
        let mut client = Client::connect(&api);
        let request_id = hand_out(&api, &mut client, Invocation::new("{}"));

        let reply = client.post(&error_path(&request_id), &[ERROR_TYPE], &error_report());

        assert_eq!(reply.status, 202);
        assert_eq!(reply.json(), json!({"status": "OK"}));
        let Outcome::Error(recorded) = api.wait_outcome(&request_id, WAIT).unwrap() else {
            panic!("the outcome is not an error");
        };
        assert_eq!(
            recorded.header("lambda-runtime-function-error-type"),
            Some("Runtime.Test")
        );
        assert_eq!(recorded.json()["errorType"], "Exception");
        assert!(api.overhead(&request_id).is_some());
        api.assert_no_violations();
    }

    #[test]
    fn error_without_header_is_violation() {
        let api = RuntimeApi::start().unwrap();
        let mut client = Client::connect(&api);
        let request_id = hand_out(&api, &mut client, Invocation::new("{}"));

        let reply = client.post(&error_path(&request_id), &[], &error_report());

        assert_eq!(reply.status, 202);
        assert!(matches!(api.wait_outcome(&request_id, WAIT), Ok(Outcome::Error(_))));
        let violations = api.violations();
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(
            violations[0].contains("Lambda-Runtime-Function-Error-Type"),
            "{violations:?}"
        );
    }

    #[test]
    fn malformed_error_bodies_are_violations() {
        let cases: [(&str, Option<&str>); 8] = [
            (r#"{"errorMessage":"m","errorType":"T"}"#, None),
            (r#"{"errorMessage":"m","errorType":"T","stackTrace":[]}"#, None),
            ("not json", Some("not valid JSON")),
            ("[1]", Some("not a JSON object")),
            (r#"{"errorMessage":"m"}"#, Some("errorType is missing")),
            (
                r#"{"errorMessage":1,"errorType":"T"}"#,
                Some("errorMessage is not a string"),
            ),
            (
                r#"{"errorMessage":"m","errorType":"T","stackTrace":"line"}"#,
                Some("stackTrace is not an array of strings"),
            ),
            (
                r#"{"errorMessage":"m","errorType":"T","stackTrace":["a",2]}"#,
                Some("stackTrace is not an array of strings"),
            ),
        ];
        let api = RuntimeApi::start().unwrap();
        let mut client = Client::connect(&api);

        for (body, expected) in cases {
            let before = api.violations().len();
            let request_id = hand_out(&api, &mut client, Invocation::new("{}"));

            let reply = client.post(&error_path(&request_id), &[ERROR_TYPE], body.as_bytes());

            assert_eq!(reply.status, 202, "{body}");
            let Outcome::Error(recorded) = api.wait_outcome(&request_id, WAIT).unwrap() else {
                panic!("the outcome of {body} is not an error");
            };
            assert_eq!(recorded.body, body.as_bytes());
            let new_violations = api.violations()[before..].to_vec();
            match expected {
                None => assert!(new_violations.is_empty(), "{body}: {new_violations:?}"),
                Some(expected) => {
                    assert_eq!(new_violations.len(), 1, "{body}: {new_violations:?}");
                    assert!(new_violations[0].contains(expected), "{body}: {new_violations:?}");
                }
            }
        }
    }

    #[test]
    fn oversized_response_gets_413() {
        let api = RuntimeApi::start().unwrap();
        let mut client = Client::connect(&api);
        let request_id = hand_out(&api, &mut client, Invocation::new("{}"));

        let reply = client.post(&response_path(&request_id), &[], &vec![b'x'; MAX_PAYLOAD + 1]);

        assert_eq!(reply.status, 413);
        assert_eq!(reply.json()["errorType"], "RequestEntityTooLarge");
        assert!(reply.json()["errorMessage"].is_string());
        let violations = api.violations();
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].contains("6291457 bytes"), "{violations:?}");
        let waited = api.wait_outcome(&request_id, SHORT_WAIT).unwrap_err().to_string();
        assert!(waited.contains("received it but posted no response"), "{waited}");

        // The server read the whole body, so the connection still works.
        let reply = client.post(&error_path(&request_id), &[ERROR_TYPE], &error_report());
        assert_eq!(reply.status, 202);
        assert!(matches!(api.wait_outcome(&request_id, WAIT), Ok(Outcome::Error(_))));
        assert_eq!(api.violations().len(), 1);
    }

    #[test]
    fn response_at_limit_is_accepted() {
        let api = RuntimeApi::start().unwrap();
        let mut client = Client::connect(&api);
        let request_id = hand_out(&api, &mut client, Invocation::new("{}"));

        let reply = client.post(&response_path(&request_id), &[], &vec![b'x'; MAX_PAYLOAD]);

        assert_eq!(reply.status, 202);
        let Outcome::Response(recorded) = api.wait_outcome(&request_id, WAIT).unwrap() else {
            panic!("the outcome is not a response");
        };
        assert_eq!(recorded.body.len(), 6_291_456);
        api.assert_no_violations();
    }

    #[test]
    fn unknown_request_id_gets_400() {
        let api = RuntimeApi::start().unwrap();
        let mut client = Client::connect(&api);

        let reply = client.post(&response_path("no-such-id"), &[], b"{}");

        assert_eq!(reply.status, 400);
        assert_eq!(reply.json()["errorType"], "InvalidRequestID");
        let violations = api.violations();
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].contains("no-such-id"), "{violations:?}");
        let waited = api.wait_outcome("no-such-id", SHORT_WAIT).unwrap_err().to_string();
        assert!(waited.contains("no invocation with request id no-such-id"), "{waited}");
    }

    #[test]
    fn outcome_before_hand_out_gets_400() {
        let api = RuntimeApi::start().unwrap();
        let mut client = Client::connect(&api);
        let request_id = api.queue(Invocation::new("{}"));

        let reply = client.post(&response_path(&request_id), &[], b"early");

        assert_eq!(reply.status, 400);
        assert_eq!(reply.json()["errorType"], "InvalidStateTransition");
        let violations = api.violations();
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].contains("not been handed out"), "{violations:?}");

        // The rejected post leaves the invocation waiting for a real outcome.
        assert_eq!(client.get_next().status, 200);
        assert_eq!(client.post(&response_path(&request_id), &[], b"late").status, 202);
        let Outcome::Response(recorded) = api.wait_outcome(&request_id, WAIT).unwrap() else {
            panic!("the outcome is not a response");
        };
        assert_eq!(recorded.body, b"late");
    }

    #[test]
    fn duplicate_outcome_gets_400() {
        let api = RuntimeApi::start().unwrap();
        let mut client = Client::connect(&api);
        let request_id = hand_out(&api, &mut client, Invocation::new("{}"));
        assert_eq!(client.post(&response_path(&request_id), &[], b"first").status, 202);

        let reply = client.post(&error_path(&request_id), &[ERROR_TYPE], &error_report());

        assert_eq!(reply.status, 400);
        let violations = api.violations();
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(
            violations[0].contains("already has an outcome (a response)"),
            "{violations:?}"
        );
        let Outcome::Response(recorded) = api.wait_outcome(&request_id, WAIT).unwrap() else {
            panic!("the second post replaced the response");
        };
        assert_eq!(recorded.body, b"first");
    }

    #[test]
    fn init_error_is_recorded() {
        let api = RuntimeApi::start().unwrap();
        let mut client = Client::connect(&api);
        assert!(api.init_error().is_none());
        assert!(api.wait_init_error(SHORT_WAIT).is_err());

        let reply = client.post(INIT_ERROR_PATH, &[ERROR_TYPE], &error_report());

        assert_eq!(reply.status, 202);
        let recorded = api.wait_init_error(WAIT).unwrap();
        assert_eq!(recorded.json()["errorMessage"], "boom");
        assert_eq!(
            recorded.header("lambda-runtime-function-error-type"),
            Some("Runtime.Test")
        );
        assert_eq!(api.init_error().unwrap().body, error_report());
        api.assert_no_violations();
    }

    #[test]
    fn second_init_error_gets_400() {
        let api = RuntimeApi::start().unwrap();
        let mut client = Client::connect(&api);
        assert_eq!(client.post(INIT_ERROR_PATH, &[ERROR_TYPE], &error_report()).status, 202);

        let reply = client.post(
            INIT_ERROR_PATH,
            &[ERROR_TYPE],
            br#"{"errorMessage":"2","errorType":"T"}"#,
        );

        assert_eq!(reply.status, 400);
        let violations = api.violations();
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].contains("already posted an init error"), "{violations:?}");
        assert_eq!(api.init_error().unwrap().body, error_report());
    }

    #[test]
    fn init_error_format_is_checked() {
        let api = RuntimeApi::start().unwrap();
        let mut client = Client::connect(&api);

        let reply = client.post(INIT_ERROR_PATH, &[], b"oops");

        assert_eq!(reply.status, 202);
        assert_eq!(api.init_error().unwrap().body, b"oops");
        let violations = api.violations();
        assert_eq!(violations.len(), 2, "{violations:?}");
        assert!(
            violations[0].contains("Lambda-Runtime-Function-Error-Type"),
            "{violations:?}"
        );
        assert!(violations[1].contains("not valid JSON"), "{violations:?}");
    }

    #[test]
    fn init_error_after_hand_out_is_violation() {
        let api = RuntimeApi::start().unwrap();
        let mut client = Client::connect(&api);
        hand_out(&api, &mut client, Invocation::new("{}"));

        let reply = client.post(INIT_ERROR_PATH, &[ERROR_TYPE], &error_report());

        assert_eq!(reply.status, 202);
        assert!(api.init_error().is_some());
        let violations = api.violations();
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(
            violations[0].contains("after 1 invocations were handed out"),
            "{violations:?}"
        );
    }

    #[test]
    fn next_abandons_open_invocation() {
        let api = RuntimeApi::start().unwrap();
        let mut client = Client::connect(&api);
        let first = hand_out(&api, &mut client, Invocation::new("first"));
        let second = api.queue(Invocation::new("second"));

        let event = client.get_next();

        assert_eq!(event.status, 200);
        assert_eq!(event.body, b"second");
        assert!(matches!(api.wait_outcome(&first, WAIT), Ok(Outcome::Abandoned)));
        assert_eq!(api.overhead(&first), None);
        let violations = api.violations();
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].contains(&first), "{violations:?}");
        assert!(violations[0].contains("abandoned"), "{violations:?}");

        let late = client.post(&response_path(&first), &[], b"late");
        assert_eq!(late.status, 400);
        assert!(api.violations()[1].contains("already has an outcome (abandoned)"));
        assert_eq!(client.post(&response_path(&second), &[], b"ok").status, 202);
        assert!(matches!(api.wait_outcome(&second, WAIT), Ok(Outcome::Response(_))));
        assert_eq!(api.violations().len(), 2);
    }

    #[test]
    fn unknown_endpoints_get_404() {
        let cases = [
            ("GET", "/"),
            ("GET", "/2018-06-01/runtime/invocation/id/response"),
            ("POST", "/2018-06-01/runtime/invocation/next"),
            ("POST", "/2018-06-01/runtime/invocation/id/status"),
            ("POST", "/2018-06-01/runtime/invocation//response"),
            ("POST", "/2018-06-01/runtime/invocation/a/b/response"),
            ("PUT", "/2018-06-01/runtime/init/error"),
            ("POST", "/2017-01-01/runtime/init/error"),
        ];
        let api = RuntimeApi::start().unwrap();
        let mut client = Client::connect(&api);

        for (index, (method, path)) in cases.into_iter().enumerate() {
            let content_length = (method != "GET").then_some(0);
            client.send_head(method, path, &[], content_length);
            let reply = client.read_reply();

            assert_eq!(reply.status, 404, "{method} {path}");
            assert_eq!(reply.json()["errorType"], "NotFound", "{method} {path}");
            let violations = api.violations();
            assert_eq!(violations.len(), index + 1, "{violations:?}");
            assert!(
                violations[index].contains(&format!("{method} {path}")),
                "{violations:?}"
            );
        }
        assert_eq!(api.polls(), 0);
    }

    #[test]
    #[should_panic(expected = "not an endpoint of the Runtime API")]
    fn assert_no_violations_lists_them() {
        let api = RuntimeApi::start().unwrap();
        let mut client = Client::connect(&api);
        assert_eq!(client.post("/unknown", &[], b"").status, 404);

        api.assert_no_violations();
    }

    #[test]
    fn connection_is_kept_alive() {
        let api = RuntimeApi::start().unwrap();
        let mut client = Client::connect(&api);

        for index in 0..2 {
            let request_id = hand_out(&api, &mut client, Invocation::new(format!("{index}")));
            let reply = client.post(&response_path(&request_id), &[], b"done");
            assert_eq!(reply.status, 202);
            assert_eq!(reply.header("connection"), None);
            assert!(matches!(api.wait_outcome(&request_id, WAIT), Ok(Outcome::Response(_))));
        }

        assert_eq!(api.shared.connections.load(Ordering::Relaxed), 1);
        api.assert_no_violations();
    }

    #[test]
    fn expect_continue_gets_100() {
        let api = RuntimeApi::start().unwrap();
        let mut client = Client::connect(&api);
        let request_id = hand_out(&api, &mut client, Invocation::new("{}"));

        client.send_head(
            "POST",
            &response_path(&request_id),
            &[("Expect", "100-continue")],
            Some(4),
        );
        let interim = client.read_reply();
        assert_eq!(interim.status, 100);
        client.send_body(b"done");
        let reply = client.read_reply();

        assert_eq!(reply.status, 202);
        let Outcome::Response(recorded) = api.wait_outcome(&request_id, WAIT).unwrap() else {
            panic!("the outcome is not a response");
        };
        assert_eq!(recorded.body, b"done");
        api.assert_no_violations();
    }

    #[test]
    fn expect_continue_over_limit_gets_413() {
        let api = RuntimeApi::start().unwrap();
        let mut client = Client::connect(&api);
        let request_id = hand_out(&api, &mut client, Invocation::new("{}"));

        client.send_head(
            "POST",
            &response_path(&request_id),
            &[("Expect", "100-continue")],
            Some(MAX_PAYLOAD + 1),
        );
        let reply = client.read_reply();

        assert_eq!(
            reply.status, 413,
            "the server must reject the body before asking for it"
        );
        assert_eq!(reply.json()["errorType"], "RequestEntityTooLarge");
        let violations = api.violations();
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].contains("Content-Length"), "{violations:?}");
    }

    #[test]
    fn wait_outcome_timeout_says_why() {
        let api = RuntimeApi::start().unwrap();
        let mut client = Client::connect(&api);
        let request_id = api.queue(Invocation::new("{}"));

        let queued = api.wait_outcome(&request_id, SHORT_WAIT).unwrap_err().to_string();
        assert!(queued.contains("the runtime never received it"), "{queued}");
        assert!(queued.contains("0 GET next requests"), "{queued}");

        assert_eq!(client.get_next().status, 200);
        let handed_out = api.wait_outcome(&request_id, SHORT_WAIT).unwrap_err().to_string();
        assert!(handed_out.contains("the runtime received it but"), "{handed_out}");
    }

    #[test]
    fn drop_closes_pending_next() {
        let api = RuntimeApi::start().unwrap();
        let mut client = Client::connect(&api);
        client.send_head("GET", NEXT_PATH, &[], None);
        api.wait_polls(1, WAIT).unwrap();

        let started = Instant::now();
        drop(api);

        assert!(client.is_closed(), "the pending next request kept its connection open");
        assert!(started.elapsed() < WAIT);
    }

    #[test]
    fn next_of_closed_connection_takes_no_event() {
        let api = RuntimeApi::start().unwrap();
        let mut closed_client = Client::connect(&api);
        closed_client.send_head("GET", NEXT_PATH, &[], None);
        api.wait_polls(1, WAIT).unwrap();
        drop(closed_client);
        let mut client = Client::connect(&api);
        client.send_head("GET", NEXT_PATH, &[], None);
        api.wait_polls(2, WAIT).unwrap();
        // Give the server time to notice the closed connection.
        thread::sleep(Duration::from_millis(100));

        let request_id = api.queue(Invocation::new("{}"));

        let event = client.read_reply();
        assert_eq!(event.status, 200);
        assert_eq!(event.header("lambda-runtime-aws-request-id"), Some(request_id.as_str()));
        api.assert_no_violations();
    }

    #[test]
    fn invoke_serves_many_in_a_row() {
        const COUNT: usize = 200;
        let api = RuntimeApi::start().unwrap();

        thread::scope(|scope| {
            let api = &api;
            // A runtime that echoes each event until it receives "stop".
            scope.spawn(move || {
                let mut client = Client::connect(api);
                loop {
                    let event = client.get_next();
                    if event.body == b"stop" {
                        break;
                    }
                    let request_id = event.header("lambda-runtime-aws-request-id").unwrap().to_owned();
                    assert_eq!(client.post(&response_path(&request_id), &[], &event.body).status, 202);
                }
            });

            for index in 0..COUNT {
                let invocation = Invocation::new(index.to_string());
                let request_id = invocation.request_id.clone();
                let Outcome::Response(recorded) = api.invoke(invocation, WAIT).unwrap() else {
                    panic!("invocation {index} got no response");
                };
                assert_eq!(recorded.text(), index.to_string());
                assert!(api.overhead(&request_id).is_some(), "invocation {index}");
            }
            api.queue(Invocation::new("stop"));
        });

        assert_eq!(api.polls(), COUNT + 1);
        assert_eq!(api.shared.connections.load(Ordering::Relaxed), 1);
        api.assert_no_violations();
    }

    #[test]
    #[should_panic(expected = "not valid JSON")]
    fn recorded_json_panics_on_text() {
        let recorded = Recorded {
            headers: Vec::new(),
            body: b"oops".to_vec(),
        };

        recorded.json();
    }
}
