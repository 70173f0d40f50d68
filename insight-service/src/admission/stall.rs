//! Send stalls: a response the client does not take.
//!
//! A client that stops reading a response (its HTTP/2 flow-control window for the stream, or
//! for the whole connection, stays at zero) would keep that call's heavy slot, its memory
//! reservation and the buffered response for as long as it keeps the connection open: the
//! keepalive PINGs find peers that vanished, not live ones that never read. A service cannot
//! reset that one stream either: once hyper holds a body frame it cannot send, it waits for
//! window and stops polling the body, so no wrapper around the body ever runs again, and
//! hyper hands out no handle to the stream. What remains is the connection, so this module
//! does what nginx's `send_timeout` does: a response that has had a frame waiting for window
//! longer than `--send-timeout` closes its connection. Every stream on it ends, and their
//! bodies, slots and reservations are dropped with them (no GOAWAY first: the client's other
//! calls on that connection fail UNAVAILABLE, as they would if it had been cut).
//!
//! hyper waits for window only while the window is exactly zero: with one byte free it hands
//! the whole frame to h2, which buffers any amount, and polls the body again. A unary answer
//! is one frame of up to `--max-message-size`, so without more, any client with an ordinary
//! window would get its answer queued in h2 whole, the body would end, and the slot and
//! reservation would be released while megabytes waited for a client that never reads them.
//! So the watched body hands out its data in slices of [`SLICE_BYTES`]: hyper's wait then
//! applies to every slice, the rest stays in the body (inside the call's reservation), the
//! body ends only once all but the last slice has been sent, and the timeout measures the
//! time without progress, like nginx's timer between two writes.
//!
//! Three parts: [`StallIo`] wraps each accepted socket so that its connection can be closed
//! from outside hyper ([`ConnAbort`], reachable from each request as the [`ConnInfo`]
//! extension tonic inserts); [`SendStallLayer`] marks each response body while hyper holds one
//! of its frames unsent; one scanner task per server ([`SendWatch`]) closes the connections of
//! bodies marked for too long.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::task::AtomicWaker;
use http::{Request, Response};
use http_body::{Body as _, Frame};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Instant,
};
use tonic::{
    body::Body,
    transport::server::{Connected, TcpConnectInfo},
};
use tower::Service;

use super::{
    AdmissionMetrics,
    layers::{BoxFuture, Gate, GateLayer},
};

/// Closes one connection from outside hyper: once [`ConnAbort::abort`] is called, every read
/// and write of its [`StallIo`] fails, hyper drops the connection and the socket closes.
#[derive(Clone, Debug, Default)]
pub struct ConnAbort(Arc<AbortState>);

#[derive(Debug, Default)]
struct AbortState {
    aborted: AtomicBool,
    /// The connection task, waiting to read (or write): woken so it sees the abort now,
    /// not whenever the peer next sends a byte.
    read: AtomicWaker,
    write: AtomicWaker,
}

impl ConnAbort {
    /// Closes the connection; true the first time.
    pub fn abort(&self) -> bool {
        let first = !self.0.aborted.swap(true, Ordering::AcqRel);
        self.0.read.wake();
        self.0.write.wake();
        first
    }

    /// Whether [`ConnAbort::abort`] was called.
    pub fn is_aborted(&self) -> bool {
        self.0.aborted.load(Ordering::Acquire)
    }

    fn error() -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "closed: a response waited for flow-control window longer than --send-timeout",
        )
    }
}

/// What tonic inserts into every request of a [`StallIo`] connection (its `ConnectInfo`).
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The socket's addresses.
    pub tcp: TcpConnectInfo,
    /// Closes this connection.
    pub abort: ConnAbort,
}

pin_project_lite::pin_project! {
    /// An accepted socket that [`ConnAbort`] can close while hyper owns it.
    #[derive(Debug)]
    pub struct StallIo<T> {
        #[pin]
        inner: T,
        abort: ConnAbort,
    }
}

impl<T> StallIo<T> {
    /// Wraps `inner` with a fresh [`ConnAbort`].
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            abort: ConnAbort::default(),
        }
    }

    /// The handle that closes this connection.
    pub fn abort_handle(&self) -> ConnAbort {
        self.abort.clone()
    }
}

impl Connected for StallIo<TcpStream> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo {
            tcp: self.inner.connect_info(),
            abort: self.abort.clone(),
        }
    }
}

/// What an aborted [`StallIo`] does to its socket before hyper drops it.
pub trait ResetOnAbort {
    /// Makes the coming close a reset. A plain close would leave the kernel holding the unsent
    /// response as an orphaned socket, probing a client that reads nothing, for minutes; a
    /// reset frees it at once and tells the client at once.
    fn reset_on_close(&self);
}

impl ResetOnAbort for TcpStream {
    fn reset_on_close(&self) {
        // Zero linger only: no thread ever blocks in close.
        if let Err(error) = self.set_zero_linger() {
            tracing::debug!(%error, "cannot set SO_LINGER 0 on an aborted connection");
        }
    }
}

/// The in-memory pipe of the unit tests: nothing to reset.
#[cfg(test)]
impl ResetOnAbort for tokio::io::DuplexStream {
    fn reset_on_close(&self) {}
}

/// The error to fail an I/O call with once the connection is aborted (its socket then set to
/// reset on close), else `None`.
fn aborted<T: ResetOnAbort>(abort: &ConnAbort, inner: Pin<&mut T>) -> Option<io::Error> {
    if !abort.is_aborted() {
        return None;
    }
    inner.as_ref().get_ref().reset_on_close();
    Some(ConnAbort::error())
}

impl<T: AsyncRead + ResetOnAbort> AsyncRead for StallIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        this.abort.0.read.register(cx.waker());
        if let Some(error) = aborted(this.abort, this.inner.as_mut()) {
            return Poll::Ready(Err(error));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + ResetOnAbort> AsyncWrite for StallIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut this = self.project();
        this.abort.0.write.register(cx.waker());
        if let Some(error) = aborted(this.abort, this.inner.as_mut()) {
            return Poll::Ready(Err(error));
        }
        this.inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut this = self.project();
        this.abort.0.write.register(cx.waker());
        if let Some(error) = aborted(this.abort, this.inner.as_mut()) {
            return Poll::Ready(Err(error));
        }
        this.inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut this = self.project();
        if let Some(error) = aborted(this.abort, this.inner.as_mut()) {
            return Poll::Ready(Err(error));
        }
        this.inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// "No frame waiting" in [`Watched::waiting_since`].
const NOT_WAITING: u64 = u64::MAX;

/// Largest data frame a watched body hands to hyper: HTTP/2's default frame size, at which
/// h2 cuts frames anyway. At most this much of a response leaves the body (and so its call's
/// reservation) before the client has made room for it.
pub const SLICE_BYTES: usize = 16 * 1024;

/// One response body under watch.
#[derive(Debug)]
struct Watched {
    /// Microseconds since the watch's start at which hyper took the frame it has not sent yet
    /// (it polls the body again only once that frame went out), or [`NOT_WAITING`].
    waiting_since: AtomicU64,
    conn: ConnAbort,
    peer: Option<SocketAddr>,
}

/// The responses in flight and the one task that closes the connections of those whose
/// client stopped reading.
#[derive(Debug)]
pub struct SendWatch {
    timeout: Duration,
    start: Instant,
    watched: Mutex<Registry>,
    metrics: Arc<AdmissionMetrics>,
}

#[derive(Debug, Default)]
struct Registry {
    entries: Vec<Weak<Watched>>,
    /// Length at which registering prunes finished bodies first (amortized O(1)).
    prune_at: usize,
}

impl SendWatch {
    /// Starts the scanner task (it ends once the watch is dropped). Stalls are found within
    /// `timeout` plus one scan period (a quarter of `timeout`, between 10 ms and 1 s).
    pub fn start(timeout: Duration, metrics: Arc<AdmissionMetrics>) -> Arc<Self> {
        let watch = Arc::new(Self {
            timeout,
            start: Instant::now(),
            watched: Mutex::new(Registry::default()),
            metrics,
        });
        let period = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let weak = Arc::downgrade(&watch);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(watch) => watch.scan(),
                    None => return,
                }
            }
        });
        watch
    }

    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    fn register(&self, conn: ConnAbort, peer: Option<SocketAddr>) -> Arc<Watched> {
        let entry = Arc::new(Watched {
            waiting_since: AtomicU64::new(NOT_WAITING),
            conn,
            peer,
        });
        let mut registry = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        if registry.entries.len() >= registry.prune_at {
            registry.entries.retain(|weak| weak.strong_count() > 0);
            registry.prune_at = (registry.entries.len() * 2).max(64);
        }
        registry.entries.push(Arc::downgrade(&entry));
        entry
    }

    /// Closes the connection of every body that has waited for window `timeout` or longer.
    fn scan(&self) {
        let now = self.now_us();
        let timeout = self.timeout.as_micros() as u64;
        let mut closed = Vec::new();
        {
            let mut registry = self.watched.lock().unwrap_or_else(|e| e.into_inner());
            registry.entries.retain(|weak| {
                let Some(entry) = weak.upgrade() else {
                    return false;
                };
                let since = entry.waiting_since.load(Ordering::Acquire);
                if since != NOT_WAITING
                    && now.saturating_sub(since) >= timeout
                    && entry.conn.abort()
                {
                    closed.push((entry.peer, now.saturating_sub(since) / 1_000));
                }
                true
            });
        }
        for (peer, waited_ms) in closed {
            self.metrics.send_stalls.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                ?peer,
                waited_ms,
                "closing a connection whose client stopped reading a response (--send-timeout)"
            );
        }
    }
}

/// Marks each response body while hyper holds a slice of it unsent, for [`SendWatch`]; hands
/// out data in slices of at most [`SLICE_BYTES`]. Every call on a [`StallIo`] connection is
/// watched, light ones too (a ListFeedback page left unread holds its buffer all the same).
/// Calls without [`ConnInfo`] (another transport, unit tests) pass unwatched. Also inserts the
/// connection's [`TcpConnectInfo`], so tonic's `Request::remote_addr` works as with a plain
/// socket.
pub type SendStallLayer = GateLayer<SendWatch>;

impl SendStallLayer {
    /// A layer reporting to `watch`.
    pub fn new(watch: Arc<SendWatch>) -> Self {
        GateLayer::from_gate(watch)
    }
}

impl Gate for SendWatch {
    const HEAVY_ONLY: bool = false;

    fn admit<S>(
        self: Arc<Self>,
        mut inner: S,
        req: Request<Body>,
    ) -> BoxFuture<Result<Response<Body>, S::Error>>
    where
        S: Service<Request<Body>, Response = Response<Body>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
    {
        let Some(info) = req.extensions().get::<ConnInfo>().cloned() else {
            return Box::pin(inner.call(req));
        };
        let (conn, peer) = (info.abort, info.tcp.remote_addr);
        let mut req = req;
        req.extensions_mut().insert(info.tcp);
        let fut = inner.call(req);
        Box::pin(async move {
            let response = fut.await?;
            // A trailers-only answer (every refusal) has nothing to send: no entry, no lock.
            if response.body().is_end_stream() {
                return Ok(response);
            }
            let entry = self.register(conn, peer);
            let start = self.start;
            Ok(response.map(|inner| {
                Body::new(WatchedBody {
                    inner,
                    rest: Bytes::new(),
                    entry,
                    start,
                })
            }))
        })
    }
}

pin_project_lite::pin_project! {
    struct WatchedBody {
        #[pin]
        inner: Body,
        // What is left of the data frame being sliced.
        rest: Bytes,
        entry: Arc<Watched>,
        start: Instant,
    }
}

impl http_body::Body for WatchedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        // Polled again: hyper has sent the previous slice (or had window for it).
        this.entry
            .waiting_since
            .store(NOT_WAITING, Ordering::Release);
        let mut data = if this.rest.is_empty() {
            match this.inner.poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => data,
                    // Trailers and empty frames need no window.
                    Ok(empty) => return Poll::Ready(Some(Ok(Frame::data(empty)))),
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                other => return other,
            }
        } else {
            std::mem::take(this.rest)
        };
        if data.len() > SLICE_BYTES {
            *this.rest = data.split_off(SLICE_BYTES);
        }
        // hyper polls again only once this slice has window.
        let now = this.start.elapsed().as_micros() as u64;
        this.entry.waiting_since.store(now, Ordering::Release);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest).max(hint.lower()));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::{Layer, Service, ServiceExt};
    use tower_test::mock;

    use super::*;
    // A body of given frames that then ends or waits forever (a stream with nothing to send).
    use crate::admission::layers::tests::tokio_test_support::Frames;

    const TIMEOUT: Duration = Duration::from_secs(2);

    /// A watched call whose response body is `frames`; returns the body, the connection's
    /// abort handle and the counters. The watch (and its scanner) lives as long as the
    /// returned `Watching`, like a server's chain.
    async fn watched_response(
        frames: &[&'static [u8]],
        then_pending: bool,
        conn_info: bool,
    ) -> Watching {
        let frames = frames.iter().map(|f| Bytes::from_static(f)).collect();
        watched(frames, then_pending, conn_info).await
    }

    /// [`watched_response`] of owned frames.
    async fn watched(frames: VecDeque<Bytes>, then_pending: bool, conn_info: bool) -> Watching {
        let metrics = Arc::new(AdmissionMetrics::default());
        let watch = SendWatch::start(TIMEOUT, metrics.clone());
        let (inner, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        handle.allow(1);
        let abort = ConnAbort::default();
        let mut request = Request::new(Body::empty());
        if conn_info {
            request.extensions_mut().insert(ConnInfo {
                tcp: TcpConnectInfo {
                    local_addr: None,
                    remote_addr: Some(([127, 0, 0, 1], 40_000).into()),
                },
                abort: abort.clone(),
            });
        }
        let mut service = SendStallLayer::new(watch.clone()).layer(inner);
        let call = tokio::spawn(service.ready().await.unwrap().call(request));
        let (request, answer) = handle.next_request().await.unwrap();
        let seen_peer = request
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(|tcp| tcp.remote_addr);
        answer.send_response(Response::new(Body::new(Frames(frames, then_pending))));
        let response = call.await.unwrap().unwrap();
        Watching {
            body: response.into_body(),
            abort,
            metrics,
            seen_peer,
            _watch: watch,
        }
    }

    struct Watching {
        body: Body,
        abort: ConnAbort,
        metrics: Arc<AdmissionMetrics>,
        /// The peer address the inner service found as tonic's `TcpConnectInfo`.
        seen_peer: Option<SocketAddr>,
        _watch: Arc<SendWatch>,
    }

    /// Polls `body` once, as hyper does when it has window for the next frame.
    fn poll_once(body: &mut Body) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let waker = futures::task::noop_waker();
        Pin::new(body).poll_frame(&mut Context::from_waker(&waker))
    }

    #[tokio::test(start_paused = true)]
    async fn a_frame_left_unsent_past_the_timeout_closes_the_connection() {
        let Watching {
            mut body,
            abort,
            metrics,
            _watch,
            ..
        } = watched_response(&[b"message"], false, true).await;
        // hyper takes the frame, then finds no window: it does not poll the body again.
        assert!(matches!(poll_once(&mut body), Poll::Ready(Some(Ok(_)))));
        tokio::time::sleep(TIMEOUT / 2).await;
        assert!(!abort.is_aborted(), "closed before --send-timeout");
        tokio::time::sleep(TIMEOUT).await;
        assert!(
            abort.is_aborted(),
            "a stalled response must close its connection"
        );
        assert_eq!(metrics.send_stalls.load(Ordering::Relaxed), 1);
        // Counted once per connection, however many scans see it still stalled.
        tokio::time::sleep(TIMEOUT * 2).await;
        assert_eq!(metrics.send_stalls.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_each_frame_in_time_is_never_closed() {
        let Watching {
            mut body,
            abort,
            metrics,
            _watch,
            ..
        } = watched_response(&[b"one", b"two", b"three"], false, true).await;
        // Each frame is taken (the body polled again) within the timeout, slowly.
        for _ in 0..3 {
            assert!(matches!(poll_once(&mut body), Poll::Ready(Some(Ok(_)))));
            tokio::time::sleep(TIMEOUT * 3 / 4).await;
        }
        assert!(matches!(poll_once(&mut body), Poll::Ready(None)));
        tokio::time::sleep(TIMEOUT * 3).await;
        assert!(!abort.is_aborted());
        assert_eq!(metrics.send_stalls.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_with_nothing_to_send_is_not_a_stall() {
        // A long-lived stream (a health Watch, WatchJob) waits on its own source, not on the
        // client: the body was polled and had nothing, so hyper holds no frame of it.
        let Watching {
            mut body,
            abort,
            _watch,
            ..
        } = watched_response(&[b"update"], true, true).await;
        assert!(matches!(poll_once(&mut body), Poll::Ready(Some(Ok(_)))));
        assert!(poll_once(&mut body).is_pending());
        tokio::time::sleep(TIMEOUT * 10).await;
        assert!(!abort.is_aborted());
    }

    #[tokio::test(start_paused = true)]
    async fn calls_without_connection_info_pass_unwatched() {
        // Unwatched: the body is the inner one, its large frame not sliced, and nothing is
        // registered (so nothing is counted, however long it waits).
        let big = Bytes::from(vec![7u8; 2 * SLICE_BYTES]);
        let Watching {
            mut body,
            metrics,
            seen_peer,
            _watch,
            ..
        } = watched(VecDeque::from([big]), false, false).await;
        assert_eq!(seen_peer, None);
        assert_eq!(drain_lengths(&mut body, 1), vec![(2 * SLICE_BYTES, false)]);
        tokio::time::sleep(TIMEOUT * 3).await;
        assert_eq!(metrics.send_stalls.load(Ordering::Relaxed), 0);
        assert!(_watch.watched.lock().unwrap().entries.is_empty());
    }

    #[tokio::test]
    async fn trailers_only_answers_are_not_registered() {
        // Every refusal is a trailers-only answer: nothing to send, nothing to watch.
        let watch = SendWatch::start(TIMEOUT, Arc::new(AdmissionMetrics::default()));
        let (inner, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        handle.allow(1);
        tokio::spawn(async move {
            let (_, answer) = handle.next_request().await.unwrap();
            answer.send_response(tonic::Status::resource_exhausted("busy").into_http());
        });
        let mut request = Request::new(Body::empty());
        request.extensions_mut().insert(ConnInfo {
            tcp: TcpConnectInfo {
                local_addr: None,
                remote_addr: None,
            },
            abort: ConnAbort::default(),
        });
        let response = SendStallLayer::new(watch.clone())
            .layer(inner)
            .oneshot(request)
            .await
            .unwrap();
        assert!(response.body().is_end_stream());
        assert!(watch.watched.lock().unwrap().entries.is_empty());
    }

    #[tokio::test]
    async fn an_aborted_tcp_connection_is_reset_not_closed() {
        // A client that reads nothing would otherwise leave the kernel an orphaned socket with
        // the unsent answer; the reset frees it and tells the client at once.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let mut io = StallIo::new(accepted);
        io.abort_handle().abort();
        let mut byte = [0u8; 1];
        assert_eq!(
            io.read(&mut byte).await.unwrap_err().kind(),
            io::ErrorKind::ConnectionAborted
        );
        drop(io);
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut byte))
            .await
            .expect("the client hears of the close");
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset),
            "a reset, not an orderly end of stream"
        );
    }

    /// The lengths of the data frames `body` hands out until it ends (or `most` of them), and
    /// whether it said it had ended before each poll.
    fn drain_lengths(body: &mut Body, most: usize) -> Vec<(usize, bool)> {
        let mut lengths = Vec::new();
        while lengths.len() < most {
            let ended = body.is_end_stream();
            match poll_once(body) {
                Poll::Ready(Some(Ok(frame))) => {
                    lengths.push((frame.into_data().map_or(0, |d| d.len()), ended))
                }
                Poll::Ready(None) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        lengths
    }

    #[tokio::test(start_paused = true)]
    async fn large_frames_are_handed_out_in_slices_and_the_body_ends_after_the_last() {
        let big = Bytes::from(vec![7u8; 2 * SLICE_BYTES + 100]);
        let Watching {
            mut body,
            seen_peer,
            _watch,
            ..
        } = watched(
            VecDeque::from([big, Bytes::from_static(b"tail")]),
            false,
            true,
        )
        .await;
        assert_eq!(seen_peer, Some(([127, 0, 0, 1], 40_000).into()));
        let mut lengths = drain_lengths(&mut body, 1);
        // The rest of the frame, still in the body, counts in its size hint.
        assert!(body.size_hint().lower() >= (SLICE_BYTES + 100) as u64);
        lengths.extend(drain_lengths(&mut body, usize::MAX));
        assert_eq!(
            lengths,
            vec![
                (SLICE_BYTES, false),
                (SLICE_BYTES, false),
                (100, false),
                (4, false)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_with_some_window_that_stops_reading_is_caught_at_a_slice() {
        // hyper hands a frame to h2 whole as soon as one byte of window is free; the body must
        // not end (and release what its call holds) before the client took all but a slice.
        let big = Bytes::from(vec![7u8; 4 * SLICE_BYTES]);
        let Watching {
            mut body,
            abort,
            metrics,
            _watch,
            ..
        } = watched(VecDeque::from([big]), false, true).await;
        // The client's window takes two slices, then it stops reading: hyper stashes the third.
        for _ in 0..3 {
            assert!(matches!(poll_once(&mut body), Poll::Ready(Some(Ok(_)))));
        }
        assert!(!body.is_end_stream());
        tokio::time::sleep(TIMEOUT * 2).await;
        assert!(abort.is_aborted());
        assert_eq!(metrics.send_stalls.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn an_aborted_connection_fails_its_pending_read_and_its_writes() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut io = StallIo::new(near);
        let abort = io.abort_handle();
        // Bytes flow while the connection is open.
        far.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        // A read waiting for the peer (hyper's connection task, idle) is woken by the abort.
        struct Flag(AtomicBool);
        impl futures::task::ArcWake for Flag {
            fn wake_by_ref(flag: &Arc<Self>) {
                flag.0.store(true, Ordering::SeqCst);
            }
        }
        let woken = Arc::new(Flag(AtomicBool::new(false)));
        let waker = futures::task::waker(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        assert!(Pin::new(&mut io).poll_read(&mut cx, &mut buf).is_pending());
        assert!(abort.abort());
        assert!(!abort.abort(), "true only the first time");
        assert!(woken.0.load(Ordering::SeqCst), "the waiting read was woken");
        match Pin::new(&mut io).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Err(error)) => assert_eq!(error.kind(), io::ErrorKind::ConnectionAborted),
            other => panic!("expected an error, got {other:?}"),
        }
        assert_eq!(
            io.write_all(b"pong").await.unwrap_err().kind(),
            io::ErrorKind::ConnectionAborted
        );
        drop(far);
    }
}
