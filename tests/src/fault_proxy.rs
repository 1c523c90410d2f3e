//! A fault-injecting HTTP/1.1 reverse proxy for tests of code that calls AWS.
//!
//! [`FaultProxy::start`] listens on a free port of 127.0.0.1 and forwards
//! each request to an upstream server on 127.0.0.1, such as moto_server, over
//! a new connection. Rules added with [`FaultProxy::add_rule`] replace the
//! forwarding of chosen requests with a fault: an error status, a TCP reset,
//! a lost response or a stalled body. The proxy records every request, so a
//! test can count the requests and retries that a client made.
//!
//! Clients may keep connections alive and send `Expect: 100-continue`.
//! Request bodies must come with `Content-Length`, because the proxy rejects
//! a chunked one with 501. Responses reach the client with a `Content-Length`
//! and without `Transfer-Encoding`, whatever framing the upstream used.

use crate::server_thread::ServerThread;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hyper::StatusCode;
use serde_json::json;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Maximum size in bytes of a request or response head, and of a chunk-size
/// or trailer line.
const MAX_HEAD: u64 = 64 * 1024;

/// Maximum number of header lines in a request or response head.
const MAX_HEADERS: usize = 128;

/// Maximum size in bytes of a request or response body. Lambda accepts zips
/// of up to 50 MB in a request, so this leaves ample room.
const MAX_BODY: u64 = 256 * 1024 * 1024;

/// Maximum time that [`Fault::StallBody`] keeps a connection open.
const MAX_STALL: Duration = Duration::from_secs(600);

/// Maximum time to wait for a client to close after a rejected request,
/// while its unread bytes are discarded. Closing a socket with unread data
/// sends a reset, which could destroy the rejection before the client reads
/// it.
const REJECTION_LINGER: Duration = Duration::from_secs(2);

/// Header lines of a head, in the order received. Values are bytes because
/// HTTP allows values that are not UTF-8.
type Headers = Vec<(String, Vec<u8>)>;

/// Conditions on a request. A field that is `None` matches any request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Match {
    /// Request method, compared case-insensitively.
    pub method: Option<String>,
    /// Text that the request target, the path with its query, must contain.
    pub path_contains: Option<String>,
    /// Region of the SigV4 credential scope in the `Authorization` header.
    /// A request without such a header matches no region.
    pub region: Option<String>,
    /// Service of the SigV4 credential scope, such as `lambda`. A request
    /// without such a header matches no service.
    pub service: Option<String>,
}

impl Match {
    /// Creates a match of every request.
    pub fn any() -> Match {
        Match::default()
    }

    pub fn with_method(mut self, method: impl Into<String>) -> Self {
        self.method = Some(method.into());
        self
    }

    pub fn with_path_contains(mut self, text: impl Into<String>) -> Self {
        self.path_contains = Some(text.into());
        self
    }

    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    pub fn with_service(mut self, service: impl Into<String>) -> Self {
        self.service = Some(service.into());
        self
    }

    fn matches(&self, method: &str, path: &str, region: Option<&str>, service: Option<&str>) -> bool {
        let method_matches = self
            .method
            .as_deref()
            .is_none_or(|expected| expected.eq_ignore_ascii_case(method));
        let path_matches = self.path_contains.as_deref().is_none_or(|text| path.contains(text));
        let region_matches = self.region.is_none() || self.region.as_deref() == region;
        let service_matches = self.service.is_none() || self.service.as_deref() == service;
        method_matches && path_matches && region_matches && service_matches
    }
}

/// What the proxy does with a request instead of forwarding it normally.
///
/// Every fault comes after the request body has been read and the latency
/// has passed. The faults that forward the request send 502 instead when
/// the upstream fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Respond with this status without forwarding: headers
    /// `x-amzn-ErrorType: {error_type}` and `Content-Type: application/json`,
    /// body `{"__type":"{error_type}","message":"{message}"}`, and
    /// `Retry-After: N` when `retry_after` is `Some(N)`. The connection stays
    /// open unless the client asked to close it.
    Status {
        status: u16,
        error_type: String,
        message: String,
        retry_after: Option<u32>,
    },
    /// Close the connection with a TCP reset (`SO_LINGER` 0) after reading
    /// the request, without forwarding it.
    Reset,
    /// Forward the request, read the whole response, so that the upstream
    /// has acted, then reset the client connection without a response.
    DropResponse,
    /// Forward the request, send the client the status line, the headers and
    /// the first half of the body, then send nothing more. The connection
    /// stays open until the client closes it, the proxy is dropped or 10
    /// minutes have passed.
    StallBody,
}

impl Fault {
    /// Returns the name that [`Record::fault`] stores for this fault.
    pub fn name(&self) -> &'static str {
        match self {
            Fault::Status { .. } => "status",
            Fault::Reset => "reset",
            Fault::DropResponse => "drop_response",
            Fault::StallBody => "stall_body",
        }
    }
}

/// A fault to apply to the first `times` requests that `matcher` matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub matcher: Match,
    pub fault: Fault,
    /// Number of matching requests still to fault. The proxy decrements it.
    pub times: usize,
}

impl Rule {
    pub fn new(matcher: Match, fault: Fault, times: usize) -> Rule {
        Rule { matcher, fault, times }
    }
}

/// A request that the proxy received, and what it did with it.
#[derive(Debug, Clone)]
pub struct Record {
    pub method: String,
    /// Request target: the path with its query.
    pub path: String,
    /// Region of the SigV4 credential scope, if the request was signed.
    pub region: Option<String>,
    /// Service of the SigV4 credential scope, if the request was signed.
    pub service: Option<String>,
    /// [`Fault::name`] of the applied fault, or `None` when no rule matched.
    pub fault: Option<String>,
    /// Whether the request was sent to the upstream, which is true for the
    /// faults that forward, false for `Status` and `Reset`.
    pub forwarded: bool,
    /// Status that the client received, or `None` when it received none.
    /// Besides the upstream's statuses and `Status` faults, the proxy sends
    /// its own. It sends 413 or 501 for a request body that it cannot read,
    /// with `fault` `None`. It sends 502 when the upstream fails, and then
    /// `fault` names the forwarding fault if one was chosen.
    pub status: Option<u16>,
    /// When the request head had been read.
    pub received: Instant,
}

impl Record {
    /// Returns whether the method is GET or HEAD.
    pub fn is_read(&self) -> bool {
        self.method == "GET" || self.method == "HEAD"
    }
}

/// A running proxy. Dropping it stops the proxy and joins its thread, which
/// closes every connection.
pub struct FaultProxy {
    address: SocketAddr,
    shared: Arc<Shared>,
    /// The proxy's server; dropping it stops the proxy.
    _server: ServerThread,
}

impl FaultProxy {
    /// Binds a free port of 127.0.0.1 and starts forwarding to `upstream`
    /// from a new thread. Every request waits for `latency` before it is
    /// forwarded or faulted, so that latency × requests is the ideal time of
    /// a run. Fails if `upstream` is not a loopback address.
    pub fn start(upstream: SocketAddr, latency: Duration) -> Result<FaultProxy> {
        if !upstream.ip().is_loopback() {
            bail!("the upstream {upstream} of the fault proxy is not a loopback address such as 127.0.0.1");
        }
        let bound = ServerThread::bind("fault proxy")?;
        let address = bound.address();
        let shared = Arc::new(Shared {
            address,
            upstream,
            latency,
            rules: Mutex::new(Vec::new()),
            log: Mutex::new(RequestLog::default()),
        });
        let server_shared = Arc::clone(&shared);
        let server = bound.spawn(move |listener| accept_connections(listener, server_shared))?;
        Ok(FaultProxy {
            address,
            shared,
            _server: server,
        })
    }

    /// Returns `http://127.0.0.1:PORT`, the value for `--endpoint-url`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Returns the address that the proxy listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Appends `rule` to the rules. For each request, the proxy applies the
    /// first rule, in the order added, that matches and has times left.
    ///
    /// Panics if a `Status` fault has a status outside 200..=599, because
    /// the proxy sends it as a final response, or if its error type contains
    /// a control character, which a header value cannot hold.
    pub fn add_rule(&self, rule: Rule) {
        if let Fault::Status { status, error_type, .. } = &rule.fault {
            assert!(
                (200..=599).contains(status),
                "status {status} of a Status fault is not in 200..=599"
            );
            assert!(
                !error_type.chars().any(char::is_control),
                "error type {error_type:?} of a Status fault contains a control character"
            );
        }
        lock(&self.shared.rules).push(rule);
    }

    /// Returns every request with a valid head received since the start or
    /// the last [`FaultProxy::clear_requests`], in the order the heads
    /// arrived.
    pub fn requests(&self) -> Vec<Record> {
        let log = lock(&self.shared.log);
        log.entries.iter().map(|entry| entry.record.clone()).collect()
    }

    /// Forgets the requests received so far. A request in progress is not
    /// listed again when it ends.
    pub fn clear_requests(&self) {
        lock(&self.shared.log).entries.clear();
    }
}

/// State shared by the proxy thread and the synchronous API.
struct Shared {
    address: SocketAddr,
    upstream: SocketAddr,
    latency: Duration,
    rules: Mutex<Vec<Rule>>,
    log: Mutex<RequestLog>,
}

impl Shared {
    /// Finds the first matching rule with times left, uses up one of its
    /// times and returns its fault.
    fn take_fault(&self, method: &str, path: &str, region: Option<&str>, service: Option<&str>) -> Option<Fault> {
        let mut rules = lock(&self.rules);
        let rule = rules
            .iter_mut()
            .find(|rule| rule.times > 0 && rule.matcher.matches(method, path, region, service))?;
        rule.times -= 1;
        Some(rule.fault.clone())
    }

    /// Appends `record` to the log and returns its id for [`Shared::update`].
    fn push_record(&self, record: Record) -> u64 {
        let mut log = lock(&self.log);
        let id = log.next_id;
        log.next_id += 1;
        log.entries.push(LogEntry { id, record });
        id
    }

    /// Changes the record with `id`, unless it was cleared.
    fn update(&self, id: u64, change: impl FnOnce(&mut Record)) {
        let mut log = lock(&self.log);
        if let Ok(index) = log.entries.binary_search_by_key(&id, |entry| entry.id) {
            change(&mut log.entries[index].record);
        }
    }

    fn set_status(&self, id: u64, status: u16) {
        self.update(id, |record| record.status = Some(status));
    }
}

/// Records in the order received. Ids increase with each record, so that a
/// connection can update its record after other records were added or the
/// log was cleared.
#[derive(Default)]
struct RequestLog {
    next_id: u64,
    entries: Vec<LogEntry>,
}

struct LogEntry {
    id: u64,
    record: Record,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn accept_connections(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(serve_connection(Arc::clone(&shared), stream, peer));
            }
            Err(error) => {
                // Errors such as too many open files pass once connections
                // close, so wait a little instead of failing in a tight loop.
                eprintln!("fault proxy {}: failed to accept a connection: {error}", shared.address);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    if let Err(error) = serve_requests(&shared, stream).await {
        eprintln!(
            "fault proxy {}: connection from {peer} failed: {error:#}",
            shared.address
        );
    }
}

/// Serves the requests of one client connection until the client closes
/// it or sends `Connection: close`, or a fault or an error ends it.
async fn serve_requests(shared: &Shared, stream: TcpStream) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut client = BufReader::new(stream);
    loop {
        let Some(bytes) = read_head(&mut client).await.context("failed to read a request head")? else {
            return Ok(());
        };
        let head = match parse_request_head(&bytes) {
            Ok(head) => head,
            Err(error) => {
                reject(client, 400, "BadRequest", &format!("{error:#}")).await;
                return Err(error);
            }
        };

        let received = Instant::now();
        let (region, service) = header(&head.headers, "authorization")
            .and_then(|value| credential_scope(&String::from_utf8_lossy(value)))
            .unzip();
        let mut record = Record {
            method: head.method.clone(),
            path: head.path.clone(),
            region,
            service,
            fault: None,
            forwarded: false,
            status: None,
            received,
        };

        // A rejected request uses up no rule.
        let length = match request_body_length(&head) {
            Ok(length) => length,
            Err(rejection) => {
                record.status = Some(rejection.status);
                shared.push_record(record);
                reject(client, rejection.status, rejection.error_type, &rejection.message).await;
                bail!("rejected {} {}: {}", head.method, head.path, rejection.message);
            }
        };
        let fault = shared.take_fault(
            &head.method,
            &head.path,
            record.region.as_deref(),
            record.service.as_deref(),
        );
        record.fault = fault.as_ref().map(|fault| fault.name().to_owned());
        let id = shared.push_record(record);
        if has_token(&head.headers, "expect", "100-continue") {
            client.get_mut().write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        let body = read_exact_body(&mut client, length)
            .await
            .with_context(|| format!("failed to read the body of {} {}", head.method, head.path))?;

        if !shared.latency.is_zero() {
            tokio::time::sleep(shared.latency).await;
        }

        let close = head.wants_close();
        match fault {
            None => {
                let response = exchange_or_bad_gateway(shared, id, &head, &body).await;
                shared.set_status(id, response.head.status);
                write_response(&mut client, &response, close).await?;
            }
            Some(Fault::Status {
                status,
                error_type,
                message,
                retry_after,
            }) => {
                let response = error_response(status, &error_type, &message, retry_after);
                shared.set_status(id, status);
                write_response(&mut client, &response, close).await?;
            }
            Some(Fault::Reset) => {
                reset(shared, client);
                return Ok(());
            }
            Some(Fault::DropResponse) => match exchange(shared, id, &head, &body).await {
                Ok(_) => {
                    reset(shared, client);
                    return Ok(());
                }
                Err(error) => {
                    let response = bad_gateway(shared, &head, &error);
                    shared.set_status(id, response.head.status);
                    write_response(&mut client, &response, close).await?;
                }
            },
            Some(Fault::StallBody) => match exchange(shared, id, &head, &body).await {
                Ok(response) => {
                    shared.set_status(id, response.head.status);
                    stall_body(client, &response).await?;
                    return Ok(());
                }
                Err(error) => {
                    let response = bad_gateway(shared, &head, &error);
                    shared.set_status(id, response.head.status);
                    write_response(&mut client, &response, close).await?;
                }
            },
        }

        if close {
            client.get_mut().shutdown().await?;
            return Ok(());
        }
    }
}

/// A parsed request head.
struct RequestHead {
    method: String,
    /// Request target as received, normally the path with its query.
    path: String,
    /// Minor version of HTTP/1.x.
    minor_version: u8,
    headers: Headers,
}

impl RequestHead {
    /// Returns whether the client asked to close the connection after the
    /// response, explicitly or by using HTTP/1.0 without keep-alive.
    fn wants_close(&self) -> bool {
        if has_token(&self.headers, "connection", "close") {
            return true;
        }
        self.minor_version == 0 && !has_token(&self.headers, "connection", "keep-alive")
    }
}

/// A response to send to the client.
struct Response {
    head: ResponseHead,
    body: Vec<u8>,
}

struct ResponseHead {
    status: u16,
    reason: String,
    /// Every header except `Connection`. It contains the `Content-Length`
    /// that frames `body`, or the upstream's one when the response has no
    /// body by definition.
    headers: Headers,
}

impl ResponseHead {
    /// Encodes the status line and headers, with `Connection: close` when
    /// `close` is set, and the empty line that ends the head.
    fn encode(&self, close: bool) -> Vec<u8> {
        let mut bytes = format!("HTTP/1.1 {} {}\r\n", self.status, self.reason).into_bytes();
        for (name, value) in &self.headers {
            push_header(&mut bytes, name, value);
        }
        if close {
            bytes.extend_from_slice(b"Connection: close\r\n");
        }
        bytes.extend_from_slice(b"\r\n");
        bytes
    }
}

/// Reasons that the proxy cannot forward a request, sent as its own error
/// response.
struct Rejection {
    status: u16,
    error_type: &'static str,
    message: String,
}

/// Reads a head up to and including the empty line that ends it. Returns
/// `None` when the connection closes before the first byte, and skips empty
/// lines before the start line as RFC 9112 section 2.2 allows.
async fn read_head<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let start = head.len();
        let limit = MAX_HEAD.saturating_sub(start as u64);
        if limit == 0 {
            bail!("the head is longer than {MAX_HEAD} bytes");
        }
        let read = (&mut *reader).take(limit).read_until(b'\n', &mut head).await?;
        if read == 0 {
            if head.is_empty() {
                return Ok(None);
            }
            bail!("the connection closed after {} bytes of a head", head.len());
        }
        let line = &head[start..];
        if line == b"\r\n" || line == b"\n" {
            if start == 0 {
                head.clear();
                continue;
            }
            return Ok(Some(head));
        }
    }
}

/// Reads one line of at most [`MAX_HEAD`] bytes, with its line ending.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R, line: &mut Vec<u8>) -> Result<()> {
    line.clear();
    (&mut *reader).take(MAX_HEAD).read_until(b'\n', line).await?;
    if !line.ends_with(b"\n") {
        bail!(
            "the connection closed or the line exceeded {MAX_HEAD} bytes after {} bytes",
            line.len()
        );
    }
    Ok(())
}

fn parse_request_head(bytes: &[u8]) -> Result<RequestHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let status = request.parse(bytes).context("invalid request head")?;
    if status.is_partial() {
        bail!("incomplete request head");
    }
    Ok(RequestHead {
        method: request.method.unwrap_or_default().to_owned(),
        path: request.path.unwrap_or_default().to_owned(),
        minor_version: request.version.unwrap_or_default(),
        headers: collect_headers(request.headers),
    })
}

fn parse_response_head(bytes: &[u8]) -> Result<ResponseHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let status = response.parse(bytes).context("invalid response head")?;
    if status.is_partial() {
        bail!("incomplete response head");
    }
    Ok(ResponseHead {
        status: response.code.unwrap_or_default(),
        reason: response.reason.unwrap_or_default().to_owned(),
        headers: collect_headers(response.headers),
    })
}

fn collect_headers(headers: &[httparse::Header<'_>]) -> Headers {
    headers
        .iter()
        .map(|header| (header.name.to_owned(), header.value.to_vec()))
        .collect()
}

/// Returns the length of the request body from `Content-Length`, or the
/// reason to reject the request.
fn request_body_length(head: &RequestHead) -> Result<u64, Rejection> {
    if header(&head.headers, "transfer-encoding").is_some() {
        return Err(Rejection {
            status: 501,
            error_type: "NotImplemented",
            message: "the fault proxy does not support Transfer-Encoding in requests: send Content-Length".to_owned(),
        });
    }
    let length = content_length(&head.headers).map_err(|error| Rejection {
        status: 400,
        error_type: "BadRequest",
        message: format!("{error:#}"),
    })?;
    let length = length.unwrap_or(0);
    if length > MAX_BODY {
        return Err(Rejection {
            status: 413,
            error_type: "RequestEntityTooLarge",
            message: format!("the request body of {length} bytes exceeds the maximum of {MAX_BODY} bytes"),
        });
    }
    Ok(length)
}

/// Returns the value of the `Content-Length` headers, which must all be the
/// same number.
fn content_length(headers: &Headers) -> Result<Option<u64>> {
    let mut length = None;
    for value in header_values(headers, "content-length") {
        for item in value.split(|byte| *byte == b',') {
            let text = String::from_utf8_lossy(item);
            let text = text.trim();
            if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
                bail!("invalid Content-Length {:?}", String::from_utf8_lossy(value));
            }
            let parsed: u64 = text
                .parse()
                .with_context(|| format!("Content-Length {text} is too large"))?;
            if length.is_some_and(|length| length != parsed) {
                bail!("conflicting Content-Length values {length:?} and {parsed}");
            }
            length = Some(parsed);
        }
    }
    Ok(length)
}

/// Reads exactly `length` bytes into a buffer allocated once, which reads
/// large bodies straight from the socket.
async fn read_exact_body<R: AsyncBufRead + Unpin>(reader: &mut R, length: u64) -> Result<Vec<u8>> {
    let mut body = Vec::with_capacity(usize::try_from(length)?);
    append_exact(reader, length, &mut body).await?;
    Ok(body)
}

async fn append_exact<R: AsyncBufRead + Unpin>(reader: &mut R, length: u64, body: &mut Vec<u8>) -> Result<()> {
    let read = (&mut *reader).take(length).read_to_end(body).await?;
    if (read as u64) < length {
        bail!("the connection closed after {read} of {length} bytes of a body");
    }
    Ok(())
}

/// Decodes a chunked body and discards its trailer section.
async fn read_chunked_body<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut line = Vec::new();
    loop {
        read_line(reader, &mut line).await?;
        let text = String::from_utf8_lossy(&line);
        let size_text = text.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(size_text, 16)
            .with_context(|| format!("invalid chunk size line {:?}", text.trim_end()))?;
        if size == 0 {
            break;
        }
        if body.len() as u64 + size > MAX_BODY {
            bail!("the chunked body exceeds the maximum of {MAX_BODY} bytes");
        }
        append_exact(reader, size, &mut body).await?;
        read_line(reader, &mut line).await?;
        if line != b"\r\n" && line != b"\n" {
            bail!("a chunk of {size} bytes is not followed by a line ending");
        }
    }
    loop {
        read_line(reader, &mut line).await?;
        if line == b"\r\n" || line == b"\n" {
            return Ok(body);
        }
    }
}

/// Reads a body that ends when the connection closes.
async fn read_body_to_end<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    (&mut *reader).take(MAX_BODY + 1).read_to_end(&mut body).await?;
    if body.len() as u64 > MAX_BODY {
        bail!("the body exceeds the maximum of {MAX_BODY} bytes");
    }
    Ok(body)
}

/// Forwards the request to the upstream over a new connection and reads the
/// whole response. Marks the record as forwarded once the request is sent.
async fn exchange(shared: &Shared, id: u64, head: &RequestHead, body: &[u8]) -> Result<Response> {
    let stream = TcpStream::connect(shared.upstream)
        .await
        .with_context(|| format!("failed to connect to the upstream {}", shared.upstream))?;
    stream.set_nodelay(true)?;
    let mut upstream = BufReader::new(stream);

    let mut request = format!("{} {} HTTP/1.1\r\n", head.method, head.path).into_bytes();
    for (name, value) in &head.headers {
        // The proxy sends the whole body at once, so `Expect` would only
        // make the upstream send a 100 response.
        let hop_by_hop = ["connection", "keep-alive", "proxy-connection", "expect"];
        if !hop_by_hop.iter().any(|hop| name.eq_ignore_ascii_case(hop)) {
            push_header(&mut request, name, value);
        }
    }
    request.extend_from_slice(b"Connection: close\r\n\r\n");
    upstream
        .get_mut()
        .write_all(&request)
        .await
        .context("failed to send the request head to the upstream")?;
    upstream
        .get_mut()
        .write_all(body)
        .await
        .context("failed to send the request body to the upstream")?;
    shared.update(id, |record| record.forwarded = true);

    read_upstream_response(&mut upstream, head.method == "HEAD").await
}

/// Reads the final response of the upstream, skipping 1xx responses, and
/// reframes its body with `Content-Length`.
async fn read_upstream_response<R: AsyncBufRead + Unpin>(upstream: &mut R, request_is_head: bool) -> Result<Response> {
    let mut head = loop {
        let bytes = read_head(upstream)
            .await
            .context("failed to read the response head of the upstream")?
            .context("the upstream closed the connection without a response")?;
        let head = parse_response_head(&bytes)?;
        match head.status {
            101 => bail!("the upstream switched protocols, which the fault proxy does not support"),
            100..=199 => continue,
            _ => break head,
        }
    };

    // RFC 9112 section 6.3 lists how a response body is framed.
    let bodiless = request_is_head || head.status == 204 || head.status == 304;
    let body = if bodiless {
        Vec::new()
    } else if let Some(coding) = header(&head.headers, "transfer-encoding") {
        if !has_token(&head.headers, "transfer-encoding", "chunked") {
            let coding = String::from_utf8_lossy(coding);
            bail!("the upstream sent Transfer-Encoding {coding:?}, which the fault proxy cannot decode");
        }
        read_chunked_body(upstream)
            .await
            .context("failed to read the chunked response body of the upstream")?
    } else if let Some(length) = content_length(&head.headers)? {
        if length > MAX_BODY {
            bail!("the upstream response body of {length} bytes exceeds the maximum of {MAX_BODY} bytes");
        }
        read_exact_body(upstream, length)
            .await
            .context("failed to read the response body of the upstream")?
    } else {
        read_body_to_end(upstream)
            .await
            .context("failed to read the response body of the upstream")?
    };

    let hop_by_hop = ["connection", "keep-alive", "proxy-connection", "transfer-encoding"];
    head.headers.retain(|(name, _)| {
        let framing = !bodiless && name.eq_ignore_ascii_case("content-length");
        !framing && !hop_by_hop.iter().any(|hop| name.eq_ignore_ascii_case(hop))
    });
    if !bodiless {
        head.headers
            .push(("Content-Length".to_owned(), body.len().to_string().into_bytes()));
    }
    Ok(Response { head, body })
}

/// Forwards the request, or builds a 502 response and logs why the upstream
/// failed.
async fn exchange_or_bad_gateway(shared: &Shared, id: u64, head: &RequestHead, body: &[u8]) -> Response {
    match exchange(shared, id, head, body).await {
        Ok(response) => response,
        Err(error) => bad_gateway(shared, head, &error),
    }
}

fn bad_gateway(shared: &Shared, head: &RequestHead, error: &anyhow::Error) -> Response {
    eprintln!(
        "fault proxy {}: failed to forward {} {} to {}, sending 502: {error:#}",
        shared.address, head.method, head.path, shared.upstream
    );
    let message = format!("the fault proxy failed to forward the request: {error:#}");
    error_response(502, "BadGateway", &message, None)
}

/// Builds an error response in the form of the AWS JSON protocols.
fn error_response(status: u16, error_type: &str, message: &str, retry_after: Option<u32>) -> Response {
    let body = json!({"__type": error_type, "message": message})
        .to_string()
        .into_bytes();
    let mut headers: Headers = vec![
        (
            "x-amzn-RequestId".to_owned(),
            uuid::Uuid::new_v4().to_string().into_bytes(),
        ),
        ("x-amzn-ErrorType".to_owned(), error_type.as_bytes().to_vec()),
        ("Content-Type".to_owned(), b"application/json".to_vec()),
        ("Content-Length".to_owned(), body.len().to_string().into_bytes()),
    ];
    if let Some(seconds) = retry_after {
        headers.push(("Retry-After".to_owned(), seconds.to_string().into_bytes()));
    }
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|code| code.canonical_reason())
        .unwrap_or("Unknown");
    Response {
        head: ResponseHead {
            status,
            reason: reason.to_owned(),
            headers,
        },
        body,
    }
}

async fn write_response(client: &mut BufReader<TcpStream>, response: &Response, close: bool) -> Result<()> {
    let stream = client.get_mut();
    stream
        .write_all(&response.head.encode(close))
        .await
        .context("failed to send a response head to the client")?;
    stream
        .write_all(&response.body)
        .await
        .context("failed to send a response body to the client")?;
    Ok(())
}

/// Sends the proxy's own error response, then closes the connection.
async fn reject(mut client: BufReader<TcpStream>, status: u16, error_type: &str, message: &str) {
    let response = error_response(status, error_type, message, None);
    if write_response(&mut client, &response, true).await.is_err() {
        return;
    }
    if client.get_mut().shutdown().await.is_err() {
        return;
    }
    // The client may still be sending a body that the proxy did not read.
    let _ = tokio::time::timeout(REJECTION_LINGER, discard_until_closed(&mut client)).await;
}

/// Sends the head and the first half of the body, then waits until the
/// client closes the connection or [`MAX_STALL`] has passed.
async fn stall_body(mut client: BufReader<TcpStream>, response: &Response) -> Result<()> {
    let half = &response.body[..response.body.len() / 2];
    let stream = client.get_mut();
    stream
        .write_all(&response.head.encode(false))
        .await
        .context("failed to send a response head to the client")?;
    stream
        .write_all(half)
        .await
        .context("failed to send half a response body to the client")?;
    let _ = tokio::time::timeout(MAX_STALL, discard_until_closed(&mut client)).await;
    Ok(())
}

/// Reads and discards what the client sends until it closes the connection
/// or the read fails.
async fn discard_until_closed(client: &mut BufReader<TcpStream>) {
    let mut scratch = vec![0; 16 * 1024];
    while let Ok(read) = client.read(&mut scratch).await {
        if read == 0 {
            return;
        }
    }
}

/// Closes the connection with a TCP reset instead of the normal FIN.
fn reset(shared: &Shared, client: BufReader<TcpStream>) {
    let stream = client.into_inner();
    if let Err(error) = stream.set_zero_linger() {
        // The socket then closes with a FIN, which the client also sees as a
        // missing response.
        eprintln!(
            "fault proxy {}: failed to set SO_LINGER 0 for a reset, closing normally: {error}",
            shared.address
        );
    }
    drop(stream);
}

fn push_header(bytes: &mut Vec<u8>, name: &str, value: &[u8]) {
    bytes.extend_from_slice(name.as_bytes());
    bytes.extend_from_slice(b": ");
    bytes.extend_from_slice(value);
    bytes.extend_from_slice(b"\r\n");
}

fn header_values<'a>(headers: &'a Headers, name: &'a str) -> impl Iterator<Item = &'a [u8]> {
    headers
        .iter()
        .filter(move |(header, _)| header.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.as_slice())
}

/// Returns the first value of header `name`, compared case-insensitively.
fn header<'a>(headers: &'a Headers, name: &'a str) -> Option<&'a [u8]> {
    header_values(headers, name).next()
}

/// Returns whether a comma-separated list in header `name` contains `token`,
/// compared case-insensitively.
fn has_token(headers: &Headers, name: &str, token: &str) -> bool {
    header_values(headers, name).any(|value| {
        value
            .split(|byte| *byte == b',')
            .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// Returns the region and service of the credential scope in a SigV4
/// `Authorization` header value, such as `us-east-1` and `lambda` in
/// `AWS4-HMAC-SHA256 Credential=AKID/20261205/us-east-1/lambda/aws4_request,
/// SignedHeaders=host, Signature=...`.
fn credential_scope(authorization: &str) -> Option<(String, String)> {
    let parameters = authorization.trim().strip_prefix("AWS4-HMAC-SHA256 ")?;
    let credential = parameters
        .split(',')
        .find_map(|parameter| parameter.trim().strip_prefix("Credential="))?;
    // The scope is the last four parts: date/region/service/aws4_request.
    let parts: Vec<&str> = credential.trim().split('/').collect();
    match parts.as_slice() {
        [.., _key, _date, region, service, "aws4_request"] if !region.is_empty() && !service.is_empty() => {
            Some(((*region).to_owned(), (*service).to_owned()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::thread;

    use std::io::{BufRead, ErrorKind, Read, Write};
    use std::net::TcpStream as StdTcpStream;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use serde_json::Value;

    /// Maximum wait for anything that should happen at once.
    const WAIT: Duration = Duration::from_secs(10);

    const LAMBDA_EAST: &str = "AWS4-HMAC-SHA256 Credential=AKID/20261205/us-east-1/lambda/aws4_request, \
                               SignedHeaders=host;x-amz-date, Signature=0123";
    const LAMBDA_WEST: &str = "AWS4-HMAC-SHA256 Credential=AKID/20261205/us-west-2/lambda/aws4_request, \
                               SignedHeaders=host;x-amz-date, Signature=0123";
    const S3_WEST: &str = "AWS4-HMAC-SHA256 Credential=AKID/20261205/us-west-2/s3/aws4_request, \
                           SignedHeaders=host;x-amz-date, Signature=0123";

    /// A request as the test upstream received it.
    #[derive(Debug, Clone)]
    struct Seen {
        method: String,
        path: String,
        /// Names are lower-case.
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<&str> {
            find_header(&self.headers, name)
        }
    }

    fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(header, _)| header.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// An HTTP server on 127.0.0.1 that reads one request per connection
    /// and responds according to the path:
    ///
    /// - `/echo...`: the request body, with Content-Length.
    /// - `/chunked...`: a JSON body of the method and path, in chunks.
    /// - `/eof...`: the same JSON without Content-Length, ended by closing.
    /// - `/bytes/N`: N bytes that count up modulo 251.
    /// - anything else: the same JSON with Content-Length, or for HEAD only
    ///   its Content-Length.
    ///
    /// Its parser is independent of the proxy's one, so that a bug in the
    /// proxy's parser cannot hide itself.
    struct Upstream {
        address: SocketAddr,
        seen: Arc<Mutex<Vec<Seen>>>,
        connections: Arc<AtomicUsize>,
        stop: Arc<AtomicBool>,
        thread: Option<thread::JoinHandle<()>>,
    }

    impl Upstream {
        fn start() -> Upstream {
            let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let address = listener.local_addr().unwrap();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let connections = Arc::new(AtomicUsize::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let thread = {
                let seen = Arc::clone(&seen);
                let connections = Arc::clone(&connections);
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let Ok(stream) = stream else { continue };
                        connections.fetch_add(1, Ordering::SeqCst);
                        let seen = Arc::clone(&seen);
                        thread::spawn(move || Upstream::serve(stream, &seen));
                    }
                })
            };
            Upstream {
                address,
                seen,
                connections,
                stop,
                thread: Some(thread),
            }
        }

        fn seen(&self) -> Vec<Seen> {
            lock(&self.seen).clone()
        }

        fn connections(&self) -> usize {
            self.connections.load(Ordering::SeqCst)
        }

        fn serve(stream: StdTcpStream, seen: &Mutex<Vec<Seen>>) {
            stream.set_read_timeout(Some(WAIT)).unwrap();
            let mut reader = std::io::BufReader::new(stream);
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                return;
            }
            let mut parts = request_line.split_whitespace();
            let method = parts.next().unwrap().to_owned();
            let path = parts.next().unwrap().to_owned();
            let mut headers = Vec::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                let (name, value) = line.split_once(':').unwrap();
                headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
            }
            let length: usize = find_header(&headers, "content-length").map_or(0, |value| value.parse().unwrap());
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let request = Seen {
                method,
                path,
                headers,
                body,
            };
            lock(seen).push(request.clone());

            let mut stream = reader.into_inner();
            let summary = json!({"method": request.method, "path": request.path}).to_string();
            let response = if request.path.starts_with("/echo") {
                let mut bytes = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                    request.body.len()
                )
                .into_bytes();
                bytes.extend_from_slice(&request.body);
                bytes
            } else if request.path.starts_with("/chunked") {
                let (first, second) = summary.split_at(summary.len() / 2);
                format!(
                    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x};name=value\r\n{first}\r\n{:x}\r\n{second}\r\n0\r\nx-trailer: 1\r\n\r\n",
                    first.len(),
                    second.len()
                )
                .into_bytes()
            } else if request.path.starts_with("/eof") {
                format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{summary}").into_bytes()
            } else if let Some(count) = request.path.strip_prefix("/bytes/") {
                let body = pattern(count.parse().unwrap());
                let mut bytes = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
                bytes.extend_from_slice(&body);
                bytes
            } else if request.method == "HEAD" {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    summary.len()
                )
                .into_bytes()
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{summary}",
                    summary.len()
                )
                .into_bytes()
            };
            // The proxy may have reset or dropped its side already.
            let _ = stream.write_all(&response);
        }
    }

    impl Drop for Upstream {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            // Wake the accept loop so that it checks the stop flag.
            let _ = StdTcpStream::connect(self.address);
            if let Some(thread) = self.thread.take() {
                thread.join().unwrap();
            }
        }
    }

    /// Returns `count` bytes that count up modulo 251, a prime, so that a
    /// shifted or repeated block of the body does not compare equal.
    fn pattern(count: usize) -> Vec<u8> {
        (0..count).map(|index| (index % 251) as u8).collect()
    }

    /// A response as read from the socket.
    #[derive(Debug)]
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            find_header(&self.headers, name)
        }

        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).expect("the reply body is JSON")
        }
    }

    /// A minimal HTTP/1.1 client on one connection, so that tests control
    /// every byte and can check keep-alive and `Expect: 100-continue`.
    struct Client {
        stream: std::io::BufReader<StdTcpStream>,
    }

    impl Client {
        fn connect(proxy: &FaultProxy) -> Client {
            let stream = StdTcpStream::connect(proxy.address()).expect("failed to connect to the fault proxy");
            stream.set_read_timeout(Some(WAIT)).unwrap();
            stream.set_nodelay(true).unwrap();
            Client {
                stream: std::io::BufReader::new(stream),
            }
        }

        /// Writes a request with Content-Length for a body, or for any POST
        /// and PUT.
        fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
            let mut request = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
            for (name, value) in headers {
                request.push_str(&format!("{name}: {value}\r\n"));
            }
            if !body.is_empty() || method == "POST" || method == "PUT" {
                request.push_str(&format!("Content-Length: {}\r\n", body.len()));
            }
            request.push_str("\r\n");
            let mut request = request.into_bytes();
            request.extend_from_slice(body);
            self.write(&request);
        }

        fn write(&mut self, bytes: &[u8]) {
            self.stream.get_mut().write_all(bytes).unwrap();
        }

        fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
            self.send(method, path, headers, body);
            self.read_reply(method == "HEAD").expect("failed to read a reply")
        }

        fn get(&mut self, path: &str) -> Reply {
            self.request("GET", path, &[], b"")
        }

        /// Reads a status line and headers.
        fn read_head(&mut self) -> std::io::Result<(u16, Vec<(String, String)>)> {
            let mut status_line = String::new();
            if self.stream.read_line(&mut status_line)? == 0 {
                return Err(ErrorKind::UnexpectedEof.into());
            }
            let status = status_line
                .split(' ')
                .nth(1)
                .and_then(|code| code.parse().ok())
                .unwrap_or_else(|| panic!("invalid status line {status_line:?}"));
            let mut headers = Vec::new();
            loop {
                let mut line = String::new();
                self.stream.read_line(&mut line)?;
                let line = line.trim_end();
                if line.is_empty() {
                    return Ok((status, headers));
                }
                let (name, value) = line.split_once(':').expect("a header line has a colon");
                headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
            }
        }

        /// Reads a response whose body has the length in Content-Length, or
        /// none for a 1xx response or a response to HEAD.
        fn read_reply(&mut self, request_is_head: bool) -> std::io::Result<Reply> {
            let (status, headers) = self.read_head()?;
            let mut reply = Reply {
                status,
                headers,
                body: Vec::new(),
            };
            if request_is_head || (100..200).contains(&status) {
                return Ok(reply);
            }
            let length: usize = reply
                .header("content-length")
                .expect("the proxy sends Content-Length")
                .parse()
                .unwrap();
            reply.body = vec![0; length];
            self.stream.read_exact(&mut reply.body)?;
            Ok(reply)
        }

        /// Returns the error of a read, or panics if bytes arrive.
        fn read_error(&mut self) -> std::io::Error {
            let mut byte = [0; 1];
            match self.stream.read(&mut byte) {
                Ok(0) => ErrorKind::UnexpectedEof.into(),
                Ok(_) => panic!("the proxy sent data: {:?}", byte),
                Err(error) => error,
            }
        }
    }

    fn start(upstream: &Upstream) -> FaultProxy {
        FaultProxy::start(upstream.address, Duration::ZERO).unwrap()
    }

    fn throttling(times: usize) -> Rule {
        Rule::new(
            Match::any(),
            Fault::Status {
                status: 429,
                error_type: "TooManyRequestsException".to_owned(),
                message: "Rate exceeded".to_owned(),
                retry_after: Some(3),
            },
            times,
        )
    }

    fn statuses(proxy: &FaultProxy) -> Vec<Option<u16>> {
        proxy.requests().iter().map(|record| record.status).collect()
    }

    fn faults(proxy: &FaultProxy) -> Vec<Option<String>> {
        proxy.requests().iter().map(|record| record.fault.clone()).collect()
    }

    #[test]
    fn forwards_and_keeps_alive() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);
        let mut client = Client::connect(&proxy);

        let first = client.get("/2015-03-31/functions?Marker=a%2Fb");
        let second = client.request("DELETE", "/2015-03-31/functions/f", &[("X-Custom", "1")], b"");

        assert_eq!(first.status, 200);
        assert_eq!(
            first.json(),
            json!({"method": "GET", "path": "/2015-03-31/functions?Marker=a%2Fb"})
        );
        assert_eq!(
            first.header("connection"),
            None,
            "the proxy must keep the connection open"
        );
        assert_eq!(second.status, 200);
        assert_eq!(second.json()["method"], "DELETE");
        assert_eq!(first.header("content-type"), Some("application/json"));

        let seen = upstream.seen();
        assert_eq!(seen.len(), 2);
        assert_eq!(
            upstream.connections(),
            2,
            "the proxy opens one upstream connection per request"
        );
        assert_eq!(seen[0].header("connection"), Some("close"));
        assert_eq!(seen[0].header("host"), Some("127.0.0.1"));
        assert_eq!(seen[1].header("x-custom"), Some("1"));
        assert_eq!(seen[1].path, "/2015-03-31/functions/f");

        let records = proxy.requests();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].method, "GET");
        assert_eq!(records[0].path, "/2015-03-31/functions?Marker=a%2Fb");
        assert_eq!(records[0].status, Some(200));
        assert_eq!(records[0].fault, None);
        assert!(records[0].forwarded);
        assert!(records[0].is_read());
        assert!(!records[1].is_read());
        assert!(records[0].received <= records[1].received);
    }

    #[test]
    fn large_body_is_relayed_intact() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);
        let mut client = Client::connect(&proxy);
        let body = pattern(5 * 1024 * 1024);

        let reply = client.request("PUT", "/echo", &[("Content-Type", "application/zip")], &body);

        assert_eq!(reply.status, 200);
        assert_eq!(reply.body.len(), body.len());
        assert!(reply.body == body, "the echoed body differs from the one sent");
        let seen = upstream.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].body.len(), body.len());
        assert!(seen[0].body == body, "the upstream received a different body");
        assert_eq!(seen[0].header("content-length"), Some("5242880"));

        let after = client.get("/after");
        assert_eq!(after.json()["path"], "/after");
    }

    #[test]
    fn status_fault_sends_error() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);
        proxy.add_rule(throttling(1));
        let mut client = Client::connect(&proxy);

        let reply = client.request("POST", "/2015-03-31/functions", &[], b"{}");

        assert_eq!(reply.status, 429);
        assert_eq!(reply.header("x-amzn-errortype"), Some("TooManyRequestsException"));
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(reply.header("retry-after"), Some("3"));
        assert!(reply.header("x-amzn-requestid").is_some());
        assert_eq!(
            reply.json(),
            json!({"__type": "TooManyRequestsException", "message": "Rate exceeded"})
        );
        assert!(upstream.seen().is_empty());
        assert_eq!(upstream.connections(), 0);

        let records = proxy.requests();
        assert_eq!(records[0].fault.as_deref(), Some("status"));
        assert_eq!(records[0].status, Some(429));
        assert!(!records[0].forwarded);

        let next = client.get("/next");
        assert_eq!(next.status, 200, "the connection stays usable after a Status fault");
    }

    #[test]
    fn status_fault_without_retry_after() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);
        proxy.add_rule(Rule::new(
            Match::any(),
            Fault::Status {
                status: 500,
                error_type: "ServiceException".to_owned(),
                message: "quote \" and backslash \\".to_owned(),
                retry_after: None,
            },
            1,
        ));
        let mut client = Client::connect(&proxy);

        let reply = client.get("/x");

        assert_eq!(reply.status, 500);
        assert_eq!(reply.header("retry-after"), None);
        assert_eq!(reply.json()["message"], "quote \" and backslash \\");
    }

    #[test]
    fn times_is_honoured() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);
        proxy.add_rule(throttling(2));
        let mut client = Client::connect(&proxy);

        let replies: Vec<u16> = (0..3).map(|_| client.get("/x").status).collect();

        assert_eq!(replies, [429, 429, 200]);
        assert_eq!(upstream.seen().len(), 1);
        assert_eq!(
            faults(&proxy),
            [Some("status".to_owned()), Some("status".to_owned()), None]
        );
        assert_eq!(statuses(&proxy), [Some(429), Some(429), Some(200)]);
    }

    #[test]
    fn first_rule_with_times_left_applies() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);
        proxy.add_rule(throttling(1));
        proxy.add_rule(Rule::new(
            Match::any().with_method("get"),
            Fault::Status {
                status: 503,
                error_type: "ServiceUnavailable".to_owned(),
                message: "later".to_owned(),
                retry_after: None,
            },
            1,
        ));
        let mut client = Client::connect(&proxy);

        let replies: Vec<u16> = (0..3).map(|_| client.get("/x").status).collect();

        assert_eq!(replies, [429, 503, 200]);
    }

    #[test]
    fn rules_match_region_and_service() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);
        let matcher = Match::any()
            .with_region("us-west-2")
            .with_service("lambda")
            .with_method("POST")
            .with_path_contains("/layers/");
        proxy.add_rule(Rule::new(matcher, Fault::Reset, 10));
        let mut client = Client::connect(&proxy);
        let path = "/2018-10-31/layers/php/versions";

        let east = client.request("POST", path, &[("Authorization", LAMBDA_EAST)], b"{}");
        let s3 = client.request("POST", path, &[("Authorization", S3_WEST)], b"{}");
        let unsigned = client.request("POST", path, &[], b"{}");
        let get = client.request("GET", path, &[("Authorization", LAMBDA_WEST)], b"");
        let other_path = client.request(
            "POST",
            "/2015-03-31/functions",
            &[("Authorization", LAMBDA_WEST)],
            b"{}",
        );
        client.send("POST", path, &[("Authorization", LAMBDA_WEST)], b"{}");
        let west = client.read_reply(false);

        for reply in [east, s3, unsigned, get, other_path] {
            assert_eq!(reply.status, 200, "{reply:?}");
        }
        assert_eq!(west.unwrap_err().kind(), ErrorKind::ConnectionReset);
        let records = proxy.requests();
        let scopes: Vec<(Option<&str>, Option<&str>)> = records
            .iter()
            .map(|record| (record.region.as_deref(), record.service.as_deref()))
            .collect();
        assert_eq!(
            scopes,
            [
                (Some("us-east-1"), Some("lambda")),
                (Some("us-west-2"), Some("s3")),
                (None, None),
                (Some("us-west-2"), Some("lambda")),
                (Some("us-west-2"), Some("lambda")),
                (Some("us-west-2"), Some("lambda")),
            ]
        );
        assert_eq!(records[5].fault.as_deref(), Some("reset"));
        assert_eq!(upstream.seen().len(), 5);
    }

    #[test]
    fn reset_fault_resets_client() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);
        proxy.add_rule(Rule::new(Match::any(), Fault::Reset, 1));
        let mut client = Client::connect(&proxy);

        client.send("POST", "/x", &[], b"{}");
        let error = client.read_reply(false).unwrap_err();

        assert_eq!(error.kind(), ErrorKind::ConnectionReset, "{error}");
        assert!(upstream.seen().is_empty());
        assert_eq!(upstream.connections(), 0);
        let records = proxy.requests();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].fault.as_deref(), Some("reset"));
        assert_eq!(records[0].status, None);
        assert!(!records[0].forwarded);

        let mut retry = Client::connect(&proxy);
        assert_eq!(retry.get("/x").status, 200);
    }

    #[test]
    fn drop_response_forwards_then_resets() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);
        proxy.add_rule(Rule::new(Match::any().with_method("POST"), Fault::DropResponse, 1));
        let mut client = Client::connect(&proxy);

        client.send("POST", "/2018-10-31/layers/php/versions", &[], b"{\"a\":1}");
        let error = client.read_reply(false).unwrap_err();

        assert_eq!(error.kind(), ErrorKind::ConnectionReset, "{error}");
        let seen = upstream.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].path, "/2018-10-31/layers/php/versions");
        assert_eq!(seen[0].body, b"{\"a\":1}");
        let records = proxy.requests();
        assert_eq!(records[0].fault.as_deref(), Some("drop_response"));
        assert_eq!(records[0].status, None);
        assert!(records[0].forwarded);
    }

    #[test]
    fn stall_body_sends_half() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);
        proxy.add_rule(Rule::new(Match::any(), Fault::StallBody, 1));
        let mut client = Client::connect(&proxy);

        client.send("GET", "/bytes/1001", &[], b"");
        let (status, headers) = client.read_head().unwrap();
        let mut half = vec![0; 500];
        client.stream.read_exact(&mut half).unwrap();
        client
            .stream
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let error = client.read_error();

        assert_eq!(status, 200);
        assert_eq!(find_header(&headers, "content-length"), Some("1001"));
        assert_eq!(half, pattern(500));
        assert!(
            matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "expected a read timeout, got {error}"
        );
        let records = proxy.requests();
        assert_eq!(records[0].fault.as_deref(), Some("stall_body"));
        assert_eq!(records[0].status, Some(200));
        assert!(records[0].forwarded);
        assert_eq!(upstream.seen().len(), 1);

        drop(client);
        let mut retry = Client::connect(&proxy);
        assert_eq!(retry.get("/bytes/10").body, pattern(10));
    }

    #[test]
    fn drop_closes_stalled_connection() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);
        proxy.add_rule(Rule::new(Match::any(), Fault::StallBody, 1));
        let mut client = Client::connect(&proxy);
        client.send("GET", "/bytes/100", &[], b"");
        client.read_head().unwrap();
        let mut half = vec![0; 50];
        client.stream.read_exact(&mut half).unwrap();

        let started = Instant::now();
        drop(proxy);

        let error = client.read_error();
        assert!(
            matches!(error.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset),
            "expected the connection to close, got {error}"
        );
        assert!(started.elapsed() < WAIT);
    }

    #[test]
    fn latency_delays_each_request() {
        const LATENCY: Duration = Duration::from_millis(200);
        let upstream = Upstream::start();
        let proxy = FaultProxy::start(upstream.address, LATENCY).unwrap();
        proxy.add_rule(throttling(1));
        let mut client = Client::connect(&proxy);

        let started = Instant::now();
        let faulted = client.get("/x");
        let faulted_time = started.elapsed();
        let forwarded = client.get("/x");
        let total_time = started.elapsed();

        assert_eq!(faulted.status, 429);
        assert_eq!(forwarded.status, 200);
        assert!(faulted_time >= LATENCY, "the Status fault took {faulted_time:?}");
        assert!(total_time >= 2 * LATENCY, "two requests took {total_time:?}");
    }

    #[test]
    fn expect_continue_gets_100() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);
        let mut client = Client::connect(&proxy);

        client.write(b"PUT /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n");
        let interim = client.read_reply(false).unwrap();
        client.write(b"data");
        let reply = client.read_reply(false).unwrap();

        assert_eq!(interim.status, 100);
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, b"data");
        assert_eq!(upstream.seen()[0].header("expect"), None);
    }

    #[test]
    fn chunked_request_gets_501() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);
        let mut client = Client::connect(&proxy);

        client
            .write(b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\ndata\r\n0\r\n\r\n");
        let reply = client.read_reply(false).unwrap();

        assert_eq!(reply.status, 501);
        assert_eq!(reply.header("connection"), Some("close"));
        assert_eq!(reply.json()["__type"], "NotImplemented");
        assert_eq!(client.read_error().kind(), ErrorKind::UnexpectedEof);
        assert!(upstream.seen().is_empty());
        assert_eq!(statuses(&proxy), [Some(501)]);
    }

    #[test]
    fn chunked_response_is_reframed() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);
        let mut client = Client::connect(&proxy);

        let reply = client.get("/chunked?x=1");

        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("transfer-encoding"), None);
        assert_eq!(reply.json(), json!({"method": "GET", "path": "/chunked?x=1"}));
        assert_eq!(client.get("/after").status, 200);
    }

    #[test]
    fn response_to_eof_is_reframed() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);
        let mut client = Client::connect(&proxy);

        let reply = client.get("/eof");

        assert_eq!(reply.status, 200);
        assert_eq!(reply.json()["path"], "/eof");
        assert_eq!(client.get("/after").status, 200);
    }

    #[test]
    fn head_response_has_no_body() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);
        let mut client = Client::connect(&proxy);

        let head = client.request("HEAD", "/x", &[], b"");
        let after = client.get("/after");

        assert_eq!(head.status, 200);
        let summary = json!({"method": "HEAD", "path": "/x"}).to_string();
        assert_eq!(head.header("content-length"), Some(summary.len().to_string().as_str()));
        assert_eq!(after.json()["path"], "/after", "the HEAD response broke the framing");
    }

    #[test]
    fn connection_close_is_honoured() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);
        let mut client = Client::connect(&proxy);

        let reply = client.request("GET", "/x", &[("Connection", "close")], b"");

        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("connection"), Some("close"));
        assert_eq!(client.read_error().kind(), ErrorKind::UnexpectedEof);
    }

    #[test]
    fn upstream_down_gets_502() {
        let closed = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let address = closed.local_addr().unwrap();
        drop(closed);
        let proxy = FaultProxy::start(address, Duration::ZERO).unwrap();
        let mut client = Client::connect(&proxy);

        let reply = client.get("/x");

        assert_eq!(reply.status, 502);
        assert_eq!(reply.json()["__type"], "BadGateway");
        let records = proxy.requests();
        assert_eq!(records[0].status, Some(502));
        assert_eq!(records[0].fault, None);
        assert!(!records[0].forwarded);
        assert_eq!(client.get("/x").status, 502, "the connection stays usable after a 502");
    }

    #[test]
    fn invalid_request_gets_400() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);
        let mut client = Client::connect(&proxy);

        client.write(b"NOT HTTP AT ALL\r\n\r\n");
        let reply = client.read_reply(false).unwrap();

        assert_eq!(reply.status, 400);
        assert_eq!(reply.header("connection"), Some("close"));
        assert!(proxy.requests().is_empty());
        let mut next = Client::connect(&proxy);
        assert_eq!(next.get("/x").status, 200, "the proxy stopped after an invalid request");
    }

    #[test]
    fn conflicting_content_length_gets_400() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);
        let mut client = Client::connect(&proxy);

        client.write(b"POST /x HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab");
        let reply = client.read_reply(false).unwrap();

        assert_eq!(reply.status, 400);
        assert!(upstream.seen().is_empty());
        assert_eq!(statuses(&proxy), [Some(400)]);
    }

    #[test]
    fn chunked_request_uses_up_no_rule() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);
        proxy.add_rule(throttling(1));
        let mut client = Client::connect(&proxy);
        client.write(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
        assert_eq!(client.read_reply(false).unwrap().status, 501);

        let mut next = Client::connect(&proxy);
        let reply = next.get("/x");

        assert_eq!(reply.status, 429);
        assert_eq!(faults(&proxy), [None, Some("status".to_owned())]);
    }

    #[test]
    fn oversized_body_gets_413() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);
        let mut client = Client::connect(&proxy);

        let head = format!("PUT /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        client.write(head.as_bytes());
        let reply = client.read_reply(false).unwrap();

        assert_eq!(reply.status, 413);
        assert_eq!(reply.json()["__type"], "RequestEntityTooLarge");
        assert!(upstream.seen().is_empty());
        assert_eq!(statuses(&proxy), [Some(413)]);
    }

    #[test]
    fn clear_requests_empties_log() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);
        let mut client = Client::connect(&proxy);
        client.get("/first");

        proxy.clear_requests();
        client.get("/second");

        let records = proxy.requests();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].path, "/second");
        assert_eq!(records[0].status, Some(200));
    }

    #[test]
    fn concurrent_clients_are_served() {
        const CLIENTS: u32 = 8;
        const LATENCY: Duration = Duration::from_millis(300);
        let upstream = Upstream::start();
        let proxy = FaultProxy::start(upstream.address, LATENCY).unwrap();

        let started = Instant::now();
        thread::scope(|scope| {
            for index in 0..CLIENTS {
                let proxy = &proxy;
                scope.spawn(move || {
                    let mut client = Client::connect(proxy);
                    assert_eq!(client.get(&format!("/{index}")).status, 200);
                });
            }
        });

        // The proxy records a status before it sends the response, so every
        // status is there once the clients have their responses.
        assert_eq!(statuses(&proxy), vec![Some(200); CLIENTS as usize]);
        let elapsed = started.elapsed();
        assert!(
            elapsed < CLIENTS * LATENCY,
            "{CLIENTS} concurrent requests took {elapsed:?}, as long as one after another"
        );
    }

    #[test]
    #[should_panic(expected = "is not in 200..=599")]
    fn add_rule_rejects_interim_status() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);

        proxy.add_rule(Rule::new(
            Match::any(),
            Fault::Status {
                status: 100,
                error_type: "Continue".to_owned(),
                message: String::new(),
                retry_after: None,
            },
            1,
        ));
    }

    #[test]
    fn start_rejects_remote_upstream() {
        let upstream: SocketAddr = "192.0.2.1:80".parse().unwrap();

        let error = FaultProxy::start(upstream, Duration::ZERO).err().unwrap();

        assert!(error.to_string().contains("not a loopback address"), "{error}");
    }

    #[test]
    fn endpoint_is_http_url() {
        let upstream = Upstream::start();
        let proxy = start(&upstream);

        assert_eq!(proxy.endpoint(), format!("http://127.0.0.1:{}", proxy.address().port()));
    }

    #[test]
    fn credential_scope_cases() {
        let cases = [
            (LAMBDA_EAST, Some(("us-east-1", "lambda"))),
            (
                "AWS4-HMAC-SHA256 Credential=AKID/20261205/eu-central-1/sts/aws4_request,SignedHeaders=host,Signature=0",
                Some(("eu-central-1", "sts")),
            ),
            ("AWS4-HMAC-SHA256 Credential=20261205/us-east-1/lambda/aws4_request", None),
            ("AWS4-HMAC-SHA256 Credential=AKID/20261205/us-east-1/lambda/aws5_request", None),
            ("AWS4-HMAC-SHA256 Credential=AKID/20261205//lambda/aws4_request", None),
            ("AWS4-ECDSA-P256-SHA256 Credential=AKID/20261205/lambda/aws4_request", None),
            ("Basic dXNlcjpwYXNz", None),
            ("", None),
        ];

        for (authorization, expected) in cases {
            let expected = expected.map(|(region, service)| (region.to_owned(), service.to_owned()));
            assert_eq!(credential_scope(authorization), expected, "{authorization}");
        }
    }

    #[test]
    fn match_fields_combine() {
        let matcher = Match::any().with_method("PUT").with_path_contains("/code");

        assert!(matcher.matches("put", "/functions/f/code", None, None));
        assert!(!matcher.matches("PUT", "/functions/f/configuration", None, None));
        assert!(!matcher.matches("POST", "/functions/f/code", None, None));
        assert!(Match::any().matches("GET", "/", None, None));
        assert!(!Match::any().with_region("us-east-1").matches("GET", "/", None, None));
    }
}
