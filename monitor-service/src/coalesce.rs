//! Write coalescing for the server's connections: one `writev` per burst, not one per frame.
//!
//! Every 100 ms the sampler wakes every `StreamSamples` subscriber at once. On HTTP/2 each
//! stream is a task that hands its message to the connection task, and Tokio's multi-thread
//! scheduler runs a task woken that way next (its LIFO slot): the connection task writes that
//! one frame and goes idle before the next stream task of the same connection has run. With
//! 100 subscribers on a connection that is 100 `writev`s per tick where one would do, and on the
//! peer 100 wake-ups and reads. Measured at 10,000 subscribers over 100 connections: ~6,500
//! writes per 100 ms tick without this wrapper, ~300 with it, and a third less server CPU
//! (BENCHMARKS.md).
//!
//! [`CoalescingIo`] sits under the HTTP/2 codec and turns its flush into a cork that lasts one
//! scheduler pass: bytes written are buffered, and the first flush after a write yields once
//! (the task wakes itself, which Tokio schedules behind the tasks already queued) instead of
//! writing. The stream tasks queued behind it add their frames meanwhile, and the next flush
//! writes them all at once. The delay is bounded by one pass of the run queue: microseconds on
//! an idle server, and under a burst exactly the time the burst's other tasks take, which is
//! when coalescing pays. Nothing waits on a timer or on the peer, unlike Nagle's algorithm
//! (which stays off: see `run`).

use std::{
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Buffered bytes past which a write first drains the buffer to the socket, so a connection
/// never holds more than this in user space: 16 KiB is ~60 samples of ~250 bytes per socket
/// write, past which a bigger batch saves little, while the buffer is kept per connection.
const MAX_BUFFERED: usize = 16 * 1024;

/// A write at least this large, arriving with nothing buffered, goes straight to the socket:
/// copying it would cost more than the syscall it could save (HTTP/2 DATA frames are 16 KiB).
const WRITE_THROUGH: usize = 16 * 1024;

/// An I/O object whose flushes are deferred by one scheduler pass so writes coalesce; see the
/// module docs.
#[derive(Debug)]
pub struct CoalescingIo<T> {
    inner: T,
    /// Bytes accepted but not yet written; `buf[written..]` is what remains.
    buf: Vec<u8>,
    written: usize,
    /// Set when a flush yielded once; the next flush writes.
    yielded: bool,
}

impl<T> CoalescingIo<T> {
    /// Wraps `inner`; nothing is buffered yet.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            written: 0,
            yielded: false,
        }
    }

    fn buffered(&self) -> usize {
        self.buf.len() - self.written
    }
}

impl<T: AsyncWrite + Unpin> CoalescingIo<T> {
    /// Writes the buffer out to `inner`; `Ready(Ok)` once it is empty.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(pending) = self.buf.get(self.written..).filter(|rest| !rest.is_empty()) {
            match Pin::new(&mut self.inner).poll_write(cx, pending) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.written += n,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.buf.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes: drains first when they would pass [`MAX_BUFFERED`].
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if self.buffered() > 0 && self.buffered() + len > MAX_BUFFERED {
            return self.poll_drain(cx);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CoalescingIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescingIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.buffered() == 0 && data.len() >= WRITE_THROUGH {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        if let Err(error) = std::task::ready!(this.poll_room(cx, data.len())) {
            return Poll::Ready(Err(error));
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len = slices.iter().map(|slice| slice.len()).sum::<usize>();
        if this.buffered() == 0 && len >= WRITE_THROUGH {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, slices);
        }
        if let Err(error) = std::task::ready!(this.poll_room(cx, len)) {
            return Poll::Ready(Err(error));
        }
        for slice in slices {
            this.buf.extend_from_slice(slice);
        }
        Poll::Ready(Ok(len))
    }

    /// Copying slices into the buffer is cheap, so the codec may hand over frame header and
    /// payload together rather than joining them itself.
    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buffered() > 0 && !this.yielded {
            // Yield once: a task that wakes itself while running is queued behind the tasks
            // already runnable, so those hand over their frames before this one writes.
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if let Err(error) = std::task::ready!(this.poll_drain(cx)) {
            return Poll::Ready(Err(error));
        }
        this.yielded = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(error) = std::task::ready!(this.poll_drain(cx)) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for CoalescingIo<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Counts the writes that reach the wrapped stream.
    struct CountingWriter<T> {
        inner: T,
        writes: Arc<AtomicUsize>,
    }

    impl<T: AsyncWrite + Unpin> AsyncWrite for CountingWriter<T> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut self.inner).poll_write(cx, data)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    fn pair() -> (
        CoalescingIo<CountingWriter<tokio::io::DuplexStream>>,
        tokio::io::DuplexStream,
        Arc<AtomicUsize>,
    ) {
        let (near, far) = tokio::io::duplex(1 << 20);
        let writes = Arc::new(AtomicUsize::new(0));
        let io = CoalescingIo::new(CountingWriter {
            inner: near,
            writes: Arc::clone(&writes),
        });
        (io, far, writes)
    }

    #[tokio::test]
    async fn small_writes_reach_the_socket_in_one_write_per_flush() {
        let (mut io, mut far, writes) = pair();
        for frame in 0..100_u8 {
            io.write_all(&[frame; 20]).await.unwrap();
        }
        let written = io
            .write_vectored(&[IoSlice::new(b"head"), IoSlice::new(b"tail")])
            .await
            .unwrap();
        assert_eq!(written, 8, "a vectored write is taken whole");
        assert_eq!(
            writes.load(Ordering::Relaxed),
            0,
            "nothing written before a flush"
        );
        io.flush().await.unwrap();
        assert_eq!(writes.load(Ordering::Relaxed), 1);

        let mut received = vec![0; 2008];
        far.read_exact(&mut received).await.unwrap();
        assert!(received.starts_with(&[0; 20]));
        assert_eq!(received.get(1980..2000), Some(&[99; 20][..]));
        assert!(received.ends_with(b"headtail"));
    }

    #[tokio::test]
    async fn a_flush_yields_once_and_then_writes() {
        let (mut io, _far, writes) = pair();
        io.write_all(b"frame").await.unwrap();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_pending());
        assert_eq!(writes.load(Ordering::Relaxed), 0);
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        assert_eq!(writes.load(Ordering::Relaxed), 1);
        // Nothing buffered: a flush goes straight through, without yielding.
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn large_and_overflowing_writes_are_not_held() {
        let (mut io, mut far, writes) = pair();
        io.write_all(&vec![7; WRITE_THROUGH]).await.unwrap();
        assert_eq!(
            writes.load(Ordering::Relaxed),
            1,
            "a large write goes through"
        );

        for _ in 0..(MAX_BUFFERED / 1000 + 1) {
            io.write_all(&[1; 1000]).await.unwrap();
        }
        assert_eq!(
            writes.load(Ordering::Relaxed),
            2,
            "the buffer drains once full"
        );
        io.shutdown().await.unwrap();
        let mut received = Vec::new();
        far.read_to_end(&mut received).await.unwrap();
        assert_eq!(
            received.len(),
            WRITE_THROUGH + 1000 * (MAX_BUFFERED / 1000 + 1)
        );
    }
}
