//! A connection whose streams' small frames share one write.
//!
//! A flip wakes every stream at once, and each puts a snapshot on its
//! connection: a few hundred bytes while only notices are active, 3 to 5
//! KB with protective modes. Left to themselves, hyper and h2 wrote nearly
//! every one with a system call of its own (measured: 0.83 `send` calls
//! per snapshot at 10,000 subscribers on 100 connections), for two reasons:
//!
//! - h2 writes a DATA frame of 256 bytes or more on its own when the
//!   connection takes vectored writes, as a TCP stream does;
//! - the stream's write wakes the connection's task, which tokio runs next
//!   (its LIFO slot), before any other stream had its turn: each write finds
//!   one frame to send.
//!
//! [`Coalesced`] answers both, for frames under 1 KiB.
//!
//! - **Copying.** The first time h2 asks whether the connection takes
//!   vectored writes, when it builds its writer, the answer is no, so h2
//!   copies frames under 1 KiB into its 16 KiB write buffer instead of
//!   writing each one alone. Every later answer is the socket's, so that a
//!   larger frame still goes out in one `writev` with the buffer before
//!   it. This leans on h2 0.4 asking once, when it builds its writer, and
//!   `tokio_util`'s `poll_write_buf` asking on every write; the `h2_*`
//!   tests below, a server's and a client's, fail if either changes.
//! - **Waiting for the others.** When every worker of the runtime is
//!   busy, the first write after a flush returns `Pending` and wakes its
//!   own task, which tokio then runs after the tasks already queued (a
//!   task that wakes itself goes to the back of the run queue). The streams
//!   woken with it put their frames in h2's buffer meanwhile, their
//!   wake-ups merged with the one already pending, and the next poll writes
//!   them all at once. grpc-go's writer does the same (it yields the
//!   processor before flushing a small batch).
//!
//! A frame of 1 KiB or more is not coalesced: h2 chains it to its buffer
//! and writes it before it takes another frame, so such a write goes out
//! at once (waiting would gain nothing), one write per frame, as without
//! the wrapper. Snapshots with protective modes active are that large;
//! coalescing them would take a buffer of the wrapper's own.
//!
//! When a worker is parked, the write goes out at once: a task that wakes
//! itself is, to tokio's multi-thread scheduler, a yield, and a yield wakes
//! a parked worker (a futex call each way) to come and steal the task,
//! which on an idle controller cost a unary call more than the write it
//! saved (measured, p50 of a health check over plain TCP: 241 µs when
//! every write waited, 165 µs without). When every worker is busy, as
//! during a large flip on a machine it saturates, no one is woken; but a
//! connection with a single frame to send (a unary answer, a subscriber
//! alone on its connection) then waits a pass of the run queue for
//! nothing, which the wrapper cannot tell apart. A write of half h2's
//! buffer or more is a batch already and goes out at once too. No timer
//! and nothing held back: every byte is written, in order, when h2
//! flushes. Beneath TLS the connection is passed through untouched (see
//! [`Coalesced::beneath_tls`]).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// A write at least this large is a batch already: it does not wait. Half
/// of h2's 16 KiB write buffer, so that a large answer pays no wait for
/// each buffer it fills.
const BATCH_ALREADY: usize = 8 * 1024;

/// A connection whose HTTP/2 writer coalesces small frames (see the module).
#[derive(Debug)]
pub struct Coalesced<T> {
    inner: T,
    /// `None` beneath TLS: every call passes straight through.
    bursts: Option<Bursts>,
}

/// Where a connection's writes stand between two flushes.
#[derive(Debug)]
struct Bursts {
    /// Nothing written since the last flush, and no wait begun: the next
    /// write is the first of a batch. A write that waited clears it, so
    /// that the poll after the wait writes.
    flushed: bool,
    /// h2 has asked once, when it built its writer: from now on the
    /// connection takes vectored writes if the socket does. (A client
    /// writes its preface before it builds its writer, a server after, so
    /// the first write would not do.)
    asked: AtomicBool,
    /// Whether waiting costs nothing now: [`every_worker_busy`], but for
    /// tests.
    busy: fn() -> bool,
}

impl<T> Coalesced<T> {
    /// `inner`, coalesced.
    pub fn new(inner: T) -> Self {
        Self::waiting_when(inner, every_worker_busy)
    }

    /// `inner`, coalesced, the first write after a flush waiting whenever
    /// `busy` says so.
    fn waiting_when(inner: T, busy: fn() -> bool) -> Self {
        Coalesced {
            inner,
            bursts: Some(Bursts {
                flushed: true,
                asked: AtomicBool::new(false),
                busy,
            }),
        }
    }

    /// `inner` beneath TLS, passed through untouched, vectored writes
    /// included: h2 writes to the TLS stream, not to this one, and rustls
    /// hands every record it has sealed to one vectored write. Coalescing
    /// would have to happen above TLS; it does not yet.
    pub fn beneath_tls(inner: T) -> Self {
        Coalesced {
            inner,
            bursts: None,
        }
    }
}

impl Bursts {
    /// Whether a write of `len` bytes may go out now; if not, `cx` is woken
    /// when it may.
    ///
    /// `joinable`: the write is h2's buffer alone, which frames of other
    /// streams could join; not a frame chained to it, which h2 writes
    /// before it takes another.
    fn ready_to_write(&mut self, cx: &mut Context<'_>, len: usize, joinable: bool) -> bool {
        let first = std::mem::replace(&mut self.flushed, false);
        if first && joinable && len < BATCH_ALREADY && (self.busy)() {
            // Polled again once the tasks already queued have run; the
            // streams among them wake this task in vain, since it is
            // already woken. That poll writes.
            cx.waker().wake_by_ref();
            return false;
        }
        true
    }
}

/// Whether every worker of the runtime polling the caller is busy, so that
/// a task that yields wakes no one. Outside a runtime, no.
fn every_worker_busy() -> bool {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return false;
    };
    let metrics = runtime.metrics();
    // An odd count of parks and unparks: that worker is parked.
    (0..metrics.num_workers()).all(|worker| metrics.worker_park_unpark_count(worker) % 2 == 0)
}

impl<T: Connected> Connected for Coalesced<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> T::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(bursts) = &mut this.bursts
            && !bursts.ready_to_write(cx, buf.len(), true)
        {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(bursts) = &mut this.bursts {
            let len = bufs.iter().map(|buf| buf.len()).sum();
            let chained = bufs.iter().filter(|buf| !buf.is_empty()).count() > 1;
            if !bursts.ready_to_write(cx, len, !chained) {
                return Poll::Pending;
            }
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let flushed = Pin::new(&mut this.inner).poll_flush(cx);
        if let Some(bursts) = &mut this.bursts
            && flushed.is_ready()
        {
            // The next write starts a new batch.
            bursts.flushed = true;
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    /// False the first time it is asked (h2 then copies frames under 1 KiB
    /// into its write buffer), the inner stream's answer from then on.
    fn is_write_vectored(&self) -> bool {
        match &self.bursts {
            Some(bursts) => {
                bursts.asked.swap(true, Ordering::Relaxed) && self.inner.is_write_vectored()
            }
            None => self.inner.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    use bytes::Bytes;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{Barrier, watch};

    use super::*;

    /// A writer that keeps what it is given and counts the calls that gave
    /// it, taking vectored writes whole, as a TCP stream does.
    #[derive(Default)]
    struct Kept {
        bytes: Vec<u8>,
        writes: usize,
    }

    impl AsyncWrite for Kept {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes += 1;
            self.bytes.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.writes += 1;
            let before = self.bytes.len();
            for buf in bufs {
                self.bytes.extend_from_slice(buf);
            }
            Poll::Ready(Ok(self.bytes.len() - before))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Wakes {
        fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn write(io: &mut Coalesced<Kept>, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<usize> {
        Pin::new(io)
            .poll_write(cx, bytes)
            .map(|written| written.expect("memory takes every write"))
    }

    fn flush(io: &mut Coalesced<Kept>, cx: &mut Context<'_>) {
        assert!(Pin::new(io).poll_flush(cx).is_ready());
    }

    fn counting_waker() -> (Arc<Wakes>, Waker) {
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        (wakes, waker)
    }

    #[test]
    fn while_a_worker_is_idle_a_write_goes_out_at_once() {
        let mut io = Coalesced::waiting_when(Kept::default(), || false);
        let (wakes, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);

        assert_eq!(write(&mut io, &mut cx, b"answer "), Poll::Ready(7));
        flush(&mut io, &mut cx);
        assert_eq!(write(&mut io, &mut cx, b"answer"), Poll::Ready(6));
        flush(&mut io, &mut cx);
        assert_eq!(wakes.count(), 0, "no wait, no wake-up");
        assert_eq!(io.inner.bytes, b"answer answer");
    }

    #[test]
    fn while_every_worker_is_busy_a_flush_waits_for_its_turn_at_the_back_of_the_queue() {
        let mut io = Coalesced::waiting_when(Kept::default(), || true);
        let (wakes, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);

        // The task wakes itself, so that tokio polls it again after the
        // tasks already queued, and declines the write.
        assert_eq!(write(&mut io, &mut cx, b"first "), Poll::Pending);
        assert_eq!(wakes.count(), 1);
        assert!(io.inner.bytes.is_empty());
        // Its turn: this write and every one until the flush go out.
        assert_eq!(write(&mut io, &mut cx, b"first "), Poll::Ready(6));
        assert_eq!(write(&mut io, &mut cx, b"second"), Poll::Ready(6));
        flush(&mut io, &mut cx);
        assert_eq!(wakes.count(), 1);
        assert_eq!(io.inner.bytes, b"first second");
        // A flush ends the batch: the next write waits again.
        assert_eq!(write(&mut io, &mut cx, b" third"), Poll::Pending);
        assert_eq!(wakes.count(), 2);
        assert_eq!(write(&mut io, &mut cx, b" third"), Poll::Ready(6));
        flush(&mut io, &mut cx);
        assert_eq!(io.inner.bytes, b"first second third");
    }

    #[test]
    fn a_write_of_half_a_buffer_or_more_goes_out_at_once() {
        let mut io = Coalesced::waiting_when(Kept::default(), || true);
        let (wakes, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);

        let large = vec![7; BATCH_ALREADY];
        assert_eq!(write(&mut io, &mut cx, &large), Poll::Ready(BATCH_ALREADY));
        flush(&mut io, &mut cx);
        assert_eq!(write(&mut io, &mut cx, &large), Poll::Ready(BATCH_ALREADY));
        assert_eq!(wakes.count(), 0);
        assert_eq!(io.inner.writes, 2);
    }

    #[test]
    fn vectored_writes_are_declined_the_first_time_h2_asks_and_taken_whole_after() {
        let mut io = Coalesced::waiting_when(Kept::default(), || true);
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(
            !io.is_write_vectored(),
            "h2 must build its writer to copy small frames"
        );
        assert!(io.is_write_vectored(), "then a chained frame goes whole");
        let large = vec![1; BATCH_ALREADY];
        let bufs = [IoSlice::new(b"head "), IoSlice::new(&large)];
        let written = Pin::new(&mut io).poll_write_vectored(&mut cx, &bufs);
        assert!(matches!(written, Poll::Ready(Ok(n)) if n == 5 + BATCH_ALREADY));
        assert_eq!(io.inner.writes, 1, "a vectored write is one call beneath");
    }

    #[test]
    fn a_frame_chained_to_the_buffer_goes_out_at_once() {
        // h2 takes no other frame until a chained one is written: waiting
        // would gain nothing.
        let mut io = Coalesced::waiting_when(Kept::default(), || true);
        let (wakes, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let bufs = [IoSlice::new(b"buffer "), IoSlice::new(b"frame")];
        let written = Pin::new(&mut io).poll_write_vectored(&mut cx, &bufs);
        assert!(matches!(written, Poll::Ready(Ok(12))));
        assert_eq!(wakes.count(), 0);
        // The buffer alone, in a vectored write of one slice, still waits.
        flush(&mut io, &mut cx);
        let bufs = [IoSlice::new(b" buffer"), IoSlice::new(b"")];
        let written = Pin::new(&mut io).poll_write_vectored(&mut cx, &bufs);
        assert!(written.is_pending());
        assert_eq!(wakes.count(), 1);
    }

    #[test]
    fn beneath_tls_every_call_passes_straight_through() {
        let mut io = Coalesced::beneath_tls(Kept::default());
        let (wakes, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(
            io.is_write_vectored(),
            "rustls hands its records over whole"
        );

        let bufs = [IoSlice::new(b"record "), IoSlice::new(b"record")];
        let written = Pin::new(&mut io).poll_write_vectored(&mut cx, &bufs);
        assert!(matches!(written, Poll::Ready(Ok(13))));
        assert_eq!(write(&mut io, &mut cx, b" record"), Poll::Ready(7));
        flush(&mut io, &mut cx);
        assert_eq!(io.inner.bytes, b"record record record");
        assert_eq!(io.inner.writes, 2);
        assert_eq!(wakes.count(), 0);
    }

    #[test]
    fn outside_a_runtime_no_worker_is_busy() {
        assert!(!every_worker_busy());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_one_worker_polling_the_caller_is_busy() {
        assert!(every_worker_busy());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_worker_is_seen_parked() {
        // The worker not running this test parks once it finds nothing to
        // do; wait for that, within a deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while every_worker_busy() {
            assert!(
                std::time::Instant::now() < deadline,
                "the idle worker never parked"
            );
            std::thread::yield_now();
        }
    }

    /// A TCP stream that counts the writes made to it.
    struct Counted {
        stream: TcpStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            Pin::new(&mut self.stream).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.stream.is_write_vectored()
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_shutdown(cx)
        }
    }

    /// How many writes an h2 server over a coalesced loopback connection
    /// makes to send one DATA frame of `payload` bytes on each of `streams`
    /// streams, every stream's task woken at once, as a flip wakes them.
    async fn writes_for_a_burst(streams: usize, payload: usize) -> usize {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let writes = Arc::new(AtomicUsize::new(0));
        let (flip, flipped) = watch::channel(false);

        let server = tokio::spawn({
            let writes = writes.clone();
            async move {
                let (stream, _) = listener.accept().await.unwrap();
                stream.set_nodelay(true).unwrap();
                let io = Coalesced::new(Counted { stream, writes });
                let mut connection = h2::server::handshake(io).await.unwrap();
                while let Some(accepted) = connection.accept().await {
                    let (_, mut respond) = accepted.unwrap();
                    let mut flipped = flipped.clone();
                    tokio::spawn(async move {
                        let response = http::Response::new(());
                        let mut body = respond.send_response(response, false).unwrap();
                        flipped.wait_for(|flipped| *flipped).await.unwrap();
                        body.send_data(Bytes::from(vec![b's'; payload]), true)
                            .unwrap();
                    });
                }
            }
        });

        let stream = TcpStream::connect(address).await.unwrap();
        let (client, connection) = h2::client::handshake(stream).await.unwrap();
        tokio::spawn(connection);
        // Every response head has arrived before the flip, so that the
        // writes counted are the burst's.
        let heads = Arc::new(Barrier::new(streams + 1));
        let mut bodies = Vec::new();
        for _ in 0..streams {
            let mut client = client.clone().ready().await.unwrap();
            let request = http::Request::get("http://safemode/").body(()).unwrap();
            let (response, _) = client.send_request(request, true).unwrap();
            let heads = heads.clone();
            bodies.push(tokio::spawn(async move {
                let mut body = response.await.unwrap().into_body();
                heads.wait().await;
                let mut received = 0;
                while let Some(data) = body.data().await {
                    let data = data.unwrap();
                    received += data.len();
                    let _ = body.flow_control().release_capacity(data.len());
                }
                received
            }));
        }
        heads.wait().await;
        let before = writes.load(Ordering::SeqCst);
        let _flip = flip_on_the_worker(flip).await;
        for body in bodies {
            assert_eq!(body.await.unwrap(), payload);
        }
        let during = writes.load(Ordering::SeqCst) - before;
        server.abort();
        during
    }

    /// Wakes every stream from a task on the worker, as the store's watch
    /// does in the controller. From the test's own thread (`block_on` runs
    /// it outside the pool), the worker could run out of woken streams and
    /// park while that thread was descheduled, and each stream after it
    /// would write alone: a count that depended on the machine's load.
    /// The sender is handed back and kept while the streams run, so that
    /// none of them could find the channel closed.
    async fn flip_on_the_worker(flip: watch::Sender<bool>) -> watch::Sender<bool> {
        tokio::spawn(async move {
            flip.send(true).unwrap();
            flip
        })
        .await
        .unwrap()
    }

    // One worker, busy with the burst, and its LIFO slot: the connection's
    // task runs right after each stream that wakes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn h2_writes_a_burst_of_small_frames_in_a_few_writes() {
        // Without coalescing, h2 writes each of these on its own: a frame of
        // 256 bytes or more is chained to its buffer when the stream takes
        // vectored writes, and the connection's task runs after each stream.
        let writes = writes_for_a_burst(100, 300).await;
        assert!(writes <= 20, "100 frames of 300 bytes took {writes} writes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn h2_writes_each_large_frame_in_one_write() {
        // A frame of 1 KiB or more is chained to h2's buffer: one vectored
        // write, not the buffer and then the payload.
        let writes = writes_for_a_burst(20, 2048).await;
        assert!(writes <= 22, "20 frames of 2 KiB took {writes} writes");
    }

    /// How many writes an h2 client over a coalesced loopback connection
    /// makes to send a body of one DATA frame of `payload` bytes on each of
    /// `streams` streams, every stream's task woken at once, as the fleet's
    /// subscribers ack one flip.
    async fn client_writes_for_a_burst(streams: usize, payload: usize) -> usize {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        // Every request's head has reached the server before the burst.
        let heads = Arc::new(Barrier::new(streams + 1));
        let server = tokio::spawn({
            let heads = heads.clone();
            async move {
                let (stream, _) = listener.accept().await.unwrap();
                let mut connection = h2::server::handshake(stream).await.unwrap();
                while let Some(accepted) = connection.accept().await {
                    let (request, mut respond) = accepted.unwrap();
                    let heads = heads.clone();
                    tokio::spawn(async move {
                        heads.wait().await;
                        let mut body = request.into_body();
                        let mut received = 0;
                        while let Some(data) = body.data().await {
                            let data = data.unwrap();
                            received += data.len();
                            let _ = body.flow_control().release_capacity(data.len());
                        }
                        assert_eq!(received, payload);
                        respond
                            .send_response(http::Response::new(()), true)
                            .unwrap();
                    });
                }
            }
        });

        let writes = Arc::new(AtomicUsize::new(0));
        let stream = TcpStream::connect(address).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let io = Coalesced::new(Counted {
            stream,
            writes: writes.clone(),
        });
        let (client, connection) = h2::client::handshake(io).await.unwrap();
        tokio::spawn(connection);
        let (flip, flipped) = watch::channel(false);
        let mut responses = Vec::new();
        for _ in 0..streams {
            let mut client = client.clone().ready().await.unwrap();
            let request = http::Request::post("http://safemode/").body(()).unwrap();
            let (response, mut body) = client.send_request(request, false).unwrap();
            let mut flipped = flipped.clone();
            tokio::spawn(async move {
                flipped.wait_for(|flipped| *flipped).await.unwrap();
                body.send_data(Bytes::from(vec![b'a'; payload]), true)
                    .unwrap();
            });
            responses.push(response);
        }
        heads.wait().await;
        let before = writes.load(Ordering::SeqCst);
        let _flip = flip_on_the_worker(flip).await;
        for response in responses {
            response.await.unwrap();
        }
        let during = writes.load(Ordering::SeqCst) - before;
        server.abort();
        during
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn h2_as_a_client_writes_a_burst_of_small_frames_in_a_few_writes() {
        // A client writes its preface before it builds its writer: the
        // first answer to "vectored?" must still be h2's writer's.
        let writes = client_writes_for_a_burst(100, 300).await;
        assert!(writes <= 20, "100 frames of 300 bytes took {writes} writes");
    }
}
