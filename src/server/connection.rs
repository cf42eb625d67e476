//! One connection: TLS handshake, then a pipelined, batched read/dispatch/write loop.
//!
//! Reading: every complete frame already received is taken at once (up to
//! `max_in_flight_per_connection` frames in flight) and dispatched as one batch
//! ([`Dispatch::handle_batch`]: decided in order, one wait for the journal); batches run
//! concurrently (a lone one polled directly, several in a `FuturesOrdered`), so answers come
//! out in request order. (On a listener whose answers go out as ready,
//! [`AnswerOrder::AsReady`], each frame is dispatched on its own into a `FuturesUnordered`
//! instead.) Writing: all answers that are ready are encoded into the write buffer, then
//! flushed once, so a burst of pipelined requests costs one TLS write rather than one per
//! answer.
//!
//! Ends: EOF, a framing error or the dispatch's [`Intake::Close`] stop reading and the answers
//! in flight are still sent (bounded); an idle timeout closes at once; shutdown stops reading
//! and sends what is in flight within the grace period. The dispatch may also pause reading
//! ([`Dispatch::reading_paused`], [`Intake::Pause`]); the gateway never does.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{FuturesOrdered, FuturesUnordered};
use futures::{FutureExt, SinkExt, Stream, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::Framed;

use super::shutdown::{Shutdown, WokenOnly};
use super::{tls, AnswerOrder, Dispatch, Handled, Intake, ListenerInfo, RequestCtx};
use crate::config::LimitsConfig;
use crate::frame::{swap_tpdu, Frame, FrameCodec, FrameError};
use crate::{limits, telemetry};

/// A freshly accepted TCP connection (its socket travels apart, see [`accept_tls`]) and what
/// serving it needs.
pub(crate) struct Accepted {
    pub(crate) peer: SocketAddr,
    pub(crate) id: u64,
    pub(crate) info: Arc<ListenerInfo>,
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) limits: Arc<LimitsConfig>,
    pub(crate) shutdown: Shutdown,
}

type Transport = Framed<TlsStream<TcpStream>, FrameCodec>;

/// Why the read loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The peer closed its side (possibly after pipelined requests).
    Eof,
    /// Framing error: counted and logged where it happened.
    Framing,
    /// Nothing arrived for `idle_timeout_ms`.
    Idle,
    /// The server is shutting down.
    Shutdown,
    /// The transport failed or a write did not complete in time.
    Broken,
    /// The dispatch closed it ([`Intake::Close`]).
    Closed,
}

enum Event {
    Shutdown,
    Answer(Option<Vec<Option<Frame>>>),
    Read(Option<Result<Frame, FrameError>>),
    Idle,
    /// Reading is paused: time to ask the dispatch again.
    Paused,
}

/// The answers in flight of one connection, by [`AnswerOrder`]: a `FuturesOrdered` yields
/// them in request order, a `FuturesUnordered` as they are ready.
trait InFlight<F: Future>: Stream<Item = F::Output> + Unpin {
    /// Whether each frame is dispatched on its own, rather than with the rest of its read.
    const PER_FRAME: bool;
    fn push(&mut self, batch: F);
    fn is_empty(&self) -> bool;
    fn len(&self) -> usize;
}

/// The batches in flight of a connection whose answers go out in request order: one batch
/// is polled directly; a second one in flight moves both into a `FuturesOrdered`, until it
/// drains.
///
/// With one request per connection (the common terminal) every batch was a `FuturesOrdered`
/// task node: an allocation linked into its list, a ready queue and a waker of its own, 3 %
/// of the gateway's CPU at 256 connections × 1 in a perf profile. A lone batch costs one box.
enum Ordered<F: Future> {
    Empty,
    One(Pin<Box<F>>),
    Many(FuturesOrdered<Pin<Box<F>>>),
}

impl<F: Future> Stream for Ordered<F> {
    type Item = F::Output;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<F::Output>> {
        let this = self.get_mut();
        match this {
            Ordered::Empty => Poll::Ready(None),
            Ordered::One(batch) => match batch.as_mut().poll(cx) {
                Poll::Ready(out) => {
                    *this = Ordered::Empty;
                    Poll::Ready(Some(out))
                }
                Poll::Pending => Poll::Pending,
            },
            Ordered::Many(batches) => {
                let next = batches.poll_next_unpin(cx);
                if batches.is_empty() {
                    *this = Ordered::Empty;
                }
                next
            }
        }
    }
}

impl<F: Future> InFlight<F> for Ordered<F> {
    const PER_FRAME: bool = false;
    fn push(&mut self, batch: F) {
        let batch = Box::pin(batch);
        *self = match std::mem::replace(self, Ordered::Empty) {
            Ordered::Empty => Ordered::One(batch),
            Ordered::One(first) => {
                let mut many = FuturesOrdered::new();
                many.push_back(first);
                many.push_back(batch);
                Ordered::Many(many)
            }
            Ordered::Many(mut many) => {
                many.push_back(batch);
                Ordered::Many(many)
            }
        };
    }
    fn is_empty(&self) -> bool {
        matches!(self, Ordered::Empty)
    }
    fn len(&self) -> usize {
        match self {
            Ordered::Empty => 0,
            Ordered::One(_) => 1,
            Ordered::Many(many) => many.len(),
        }
    }
}

impl<F: Future> InFlight<F> for FuturesUnordered<F> {
    const PER_FRAME: bool = true;
    fn push(&mut self, batch: F) {
        FuturesUnordered::push(self, batch);
    }
    fn is_empty(&self) -> bool {
        FuturesUnordered::is_empty(self)
    }
    fn len(&self) -> usize {
        FuturesUnordered::len(self)
    }
}

/// The TLS handshake of an accepted socket. The caller bounds it (handshake timeout, budget
/// eviction, shutdown); a failure is counted and logged at debug, and gives `None`.
pub(crate) async fn accept_tls(
    accepted: &Accepted,
    stream: TcpStream,
) -> Option<TlsStream<TcpStream>> {
    // Answers are small and latency matters more than packet count.
    let _ = stream.set_nodelay(true);
    match accepted.acceptor.accept(stream).await {
        Ok(tls) => Some(tls),
        Err(e) => {
            telemetry::count_handshake_failure(accepted.info.dialect.name());
            tracing::debug!(conn = accepted.id, peer = %accepted.peer, listener = %accepted.info.name, error = %e, "tls handshake failed");
            None
        }
    }
}

/// Serves one connection whose TLS handshake completed to its end; never panics, every wait
/// is bounded.
pub(crate) async fn serve<D: Dispatch>(
    accepted: Accepted,
    tls: TlsStream<TcpStream>,
    dispatch: Arc<D>,
    permit: OwnedSemaphorePermit,
) {
    let _permit = permit;
    let Accepted {
        peer,
        id,
        info,
        limits,
        mut shutdown,
        ..
    } = accepted;
    let dialect = info.dialect.name();
    let _open = telemetry::OpenConnection::new(dialect);
    let client_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| Arc::new(tls::client_cert(leaf)));
    let client_cert_subject = client_cert.as_ref().and_then(|c| c.subject.clone());
    let codec = FrameCodec::new(
        info.framing,
        info.dialect.has_tpdu(),
        limits.max_frame_bytes,
    );
    let framed = Framed::with_capacity(tls, codec, limits::CONNECTION_READ_BUFFER_BYTES);
    let ctx = RequestCtx {
        listener: info,
        peer,
        client_cert_subject,
        client_cert,
        connection_id: id,
    };
    tracing::debug!(conn = id, %peer, listener = %ctx.listener.name, "connection open");
    dispatch.opened(&ctx);
    let handler = Handler {
        framed,
        ctx: &ctx,
        dispatch: &*dispatch,
        limits: &limits,
    };
    let (dispatch, ctx_ref) = (&*dispatch, &ctx);
    let decide = move |frames| process(dispatch, ctx_ref, frames);
    // Chosen once per connection; each order is its own monomorphic loop.
    let end = match ctx.listener.answer_order {
        AnswerOrder::Request => handler.run(&mut shutdown, Ordered::Empty, decide).await,
        AnswerOrder::AsReady => {
            handler
                .run(&mut shutdown, FuturesUnordered::new(), decide)
                .await
        }
    };
    tracing::debug!(conn = id, %peer, end = ?end, "connection closed");
}

/// The read/dispatch/write loop of one TLS connection.
struct Handler<'a, D> {
    framed: Transport,
    ctx: &'a RequestCtx,
    dispatch: &'a D,
    limits: &'a LimitsConfig,
}

impl<'a, D: Dispatch> Handler<'a, D> {
    /// Runs the loop with `in_flight` (ordered or not, see [`AnswerOrder`]) holding the
    /// answers being decided, `process` turning frames into them.
    async fn run<Q, F>(
        mut self,
        shutdown: &mut Shutdown,
        mut in_flight: Q,
        process: impl Fn(Vec<Frame>) -> F,
    ) -> End
    where
        Q: InFlight<F>,
        F: Future<Output = Vec<Option<Frame>>>,
    {
        let limits = self.limits;
        let dialect = self.ctx.listener.dialect.name();
        let max_in_flight = limits.max_in_flight_per_connection;
        let idle = Duration::from_millis(limits.idle_timeout_ms);
        let paused_recheck = Duration::from_millis(limits::READING_PAUSED_RECHECK_MS);
        let (ctx, dispatch) = (self.ctx, self.dispatch);
        // Frames dispatched and not yet answered (batches hold several).
        let mut frames = 0usize;
        // Frames taken from this connection so far ([`Dispatch::intake`]).
        let mut taken = 0u64;
        // Armed once and moved lazily: activity only records its time, and the timer, when it
        // fires, is set again from the last activity (a reset per request costs a timer-wheel
        // update).
        let idle_sleep = tokio::time::sleep(idle);
        tokio::pin!(idle_sleep);
        let mut last_active = Instant::now();
        // One registration with the shutdown signal for the whole connection: a `recv()` per
        // loop turn would lock the channel's waiter list, shared by every connection, twice
        // per request; and polled only once it woke the task (see `WokenOnly`).
        let mut stopping = WokenOnly::new(shutdown.recv());
        let end = loop {
            let paused = dispatch.reading_paused(ctx);
            let event = tokio::select! {
                biased;
                () = &mut stopping => Event::Shutdown,
                answer = in_flight.next(), if !in_flight.is_empty() => Event::Answer(answer),
                read = self.framed.next(), if frames < max_in_flight && !paused => Event::Read(read),
                // An async block: no timer is made unless reading is paused.
                () = async { tokio::time::sleep(paused_recheck).await }, if paused => Event::Paused,
                () = &mut idle_sleep, if in_flight.is_empty() => Event::Idle,
            };
            match event {
                Event::Shutdown => break End::Shutdown,
                Event::Paused => {}
                Event::Idle => {
                    let due = last_active + idle;
                    if due > Instant::now() {
                        idle_sleep.as_mut().reset(due);
                        continue;
                    }
                    telemetry::count_idle_timeout(dialect);
                    tracing::debug!(conn = ctx.connection_id, "idle timeout");
                    break End::Idle;
                }
                Event::Answer(None) => {}
                Event::Answer(Some(first)) => {
                    match self.write_ready(first, &mut in_flight, idle).await {
                        Ok(answered) => frames = frames.saturating_sub(answered),
                        Err(end) => break end,
                    }
                    last_active = Instant::now();
                }
                Event::Read(read) => {
                    let mut read = read;
                    // Take every frame already buffered, not only the first: they are decided
                    // as one batch and their answers share one write.
                    let mut batch = Vec::new();
                    let stop = loop {
                        match read {
                            None => break Some(End::Eof),
                            Some(Err(e)) => break Some(self.framing_error(&e)),
                            Some(Ok(frame)) => match dispatch.intake(ctx, taken) {
                                Intake::Take => {
                                    taken += 1;
                                    batch.push(frame);
                                }
                                Intake::Pause => break None,
                                Intake::Close => break Some(End::Closed),
                            },
                        }
                        if frames + batch.len() >= max_in_flight {
                            break None;
                        }
                        match self.framed.next().now_or_never() {
                            Some(next) => read = next,
                            None => break None,
                        }
                    };
                    if !batch.is_empty() {
                        frames += batch.len();
                        if Q::PER_FRAME {
                            for frame in batch {
                                in_flight.push(process(vec![frame]));
                            }
                        } else {
                            in_flight.push(process(batch));
                        }
                    }
                    last_active = Instant::now();
                    if let Some(end) = stop {
                        break end;
                    }
                }
            }
        };
        if matches!(end, End::Eof | End::Framing | End::Closed | End::Shutdown)
            && !in_flight.is_empty()
        {
            let grace = match end {
                End::Shutdown => Duration::from_millis(limits.shutdown_grace_ms),
                _ => idle,
            };
            self.drain(&mut in_flight, grace).await;
        }
        self.close().await;
        end
    }

    /// Writes the answers of `first` and of every other batch already complete, then flushes
    /// once; returns how many frames were answered. Bounded by the idle timeout: a peer that
    /// stops reading does not hold the connection forever.
    async fn write_ready<Q, F>(
        &mut self,
        first: Vec<Option<Frame>>,
        in_flight: &mut Q,
        limit: Duration,
    ) -> Result<usize, End>
    where
        Q: InFlight<F>,
        F: Future<Output = Vec<Option<Frame>>>,
    {
        let write = async {
            let mut answered = first.len();
            for answer in first {
                self.feed(answer).await?;
            }
            while let Some(Some(batch)) = in_flight.next().now_or_never() {
                answered += batch.len();
                for answer in batch {
                    self.feed(answer).await?;
                }
            }
            SinkExt::<Frame>::flush(&mut self.framed)
                .await
                .map_err(|_| End::Broken)?;
            Ok(answered)
        };
        tokio::pin!(write);
        // Nearly every write completes at once (the socket has room): only one that has to
        // wait gets a timer, so the common case costs no timer-wheel work.
        if let Poll::Ready(done) = futures::poll!(write.as_mut()) {
            return done;
        }
        tokio::time::timeout(limit, write)
            .await
            .unwrap_or(Err(End::Broken))
    }

    /// Encodes one answer into the write buffer (writing out only if the buffer is full).
    async fn feed(&mut self, answer: Option<Frame>) -> Result<(), End> {
        let Some(frame) = answer else {
            return Ok(());
        };
        match self.framed.feed(frame).await {
            Ok(()) => Ok(()),
            Err(FrameError::Io(_)) => Err(End::Broken),
            Err(e) => {
                // The reply cannot be framed (too long, empty): nothing was written, the
                // stream is intact; drop this answer only.
                telemetry::count_message_error(self.ctx.listener.dialect.name());
                tracing::warn!(conn = self.ctx.connection_id, error = %e, "reply dropped");
                Ok(())
            }
        }
    }

    /// Sends the answers still in flight, each as soon as it is ready, within `grace`.
    async fn drain<Q, F>(&mut self, in_flight: &mut Q, grace: Duration)
    where
        Q: InFlight<F>,
        F: Future<Output = Vec<Option<Frame>>>,
    {
        let left = in_flight.len();
        let drained = tokio::time::timeout(grace, async {
            // Not a hot path: flush each batch's answers as soon as they are ready.
            while let Some(batch) = in_flight.next().await {
                for answer in batch {
                    self.feed(answer).await?;
                }
                SinkExt::<Frame>::flush(&mut self.framed)
                    .await
                    .map_err(|_| End::Broken)?;
            }
            Ok::<(), End>(())
        })
        .await;
        if !matches!(drained, Ok(Ok(()))) {
            tracing::warn!(
                conn = self.ctx.connection_id,
                in_flight = left,
                "closing with answers not sent"
            );
        }
    }

    fn framing_error(&self, e: &FrameError) -> End {
        if let FrameError::Io(io) = e {
            tracing::debug!(conn = self.ctx.connection_id, error = %io, "read failed");
            return End::Broken;
        }
        telemetry::count_framing_error(self.ctx.listener.dialect.name());
        // One line per source per interval: a flood of bad frames must not flood the log.
        let now = crate::clock::monotonic();
        if let crate::ratelimit::Admit::Yes { suppressed } =
            crate::ratelimit::bad_input_log(self.ctx.peer.ip(), now)
        {
            tracing::warn!(
                conn = self.ctx.connection_id,
                peer = %self.ctx.peer,
                listener = %self.ctx.listener.name,
                error = %e,
                suppressed,
                "framing error: closing the connection"
            );
        }
        End::Framing
    }

    /// Sends TLS close_notify and closes, bounded.
    async fn close(mut self) {
        let timeout = Duration::from_millis(limits::CLOSE_FLUSH_TIMEOUT_MS);
        let _ = tokio::time::timeout(timeout, self.framed.get_mut().shutdown()).await;
    }
}

/// Turns the frames of one read into their answers (or none each), in order: the messages
/// go to the dispatch as one batch.
async fn process<D: Dispatch>(
    dispatch: &D,
    ctx: &RequestCtx,
    frames: Vec<Frame>,
) -> Vec<Option<Frame>> {
    let mut bodies = Vec::with_capacity(frames.len());
    for frame in &frames {
        if let Frame::Message { body, .. } = frame {
            bodies.push(body.clone());
        }
    }
    let mut handled = if bodies.is_empty() {
        Vec::new()
    } else {
        dispatch.handle_batch(ctx, bodies).await
    }
    .into_iter();
    frames
        .into_iter()
        .map(|frame| match frame {
            Frame::KeepAlive => Some(Frame::KeepAlive),
            Frame::Undersized { len } => {
                telemetry::count_message_error(ctx.listener.dialect.name());
                tracing::debug!(
                    conn = ctx.connection_id,
                    len,
                    "frame shorter than TPDU + header: dropped"
                );
                None
            }
            Frame::Message { tpdu, header, .. } => match handled.next() {
                Some(Handled::Reply(reply)) => Some(Frame::Message {
                    tpdu: tpdu.map(swap_tpdu),
                    header,
                    body: reply.freeze(),
                }),
                Some(Handled::Drop) | None => None,
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::oneshot;

    #[tokio::test]
    async fn batches_in_flight_come_out_in_request_order_one_or_many() {
        let mut q: Ordered<oneshot::Receiver<u32>> = Ordered::Empty;
        // A lone batch: polled directly.
        let (tx, rx) = oneshot::channel();
        q.push(rx);
        assert_eq!(q.len(), 1);
        assert!(futures::poll!(q.next()).is_pending());
        tx.send(1).unwrap();
        assert_eq!(q.next().await, Some(Ok(1)));
        assert!(q.is_empty());
        // Three in flight, ready last to first: answered first to last.
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..3).map(|_| oneshot::channel()).unzip();
        for rx in rxs {
            q.push(rx);
        }
        assert_eq!(q.len(), 3);
        for (i, tx) in txs.into_iter().enumerate().rev() {
            tx.send(10 + i as u32).unwrap();
        }
        let mut out = Vec::new();
        while let Some(Some(answer)) = q.next().now_or_never() {
            out.push(answer.unwrap());
        }
        assert_eq!(out, [10, 11, 12]);
        assert!(q.is_empty());
        // Drained: the next lone batch is direct again.
        let (tx, rx) = oneshot::channel();
        q.push(rx);
        assert!(matches!(q, Ordered::One(_)));
        tx.send(5).unwrap();
        assert_eq!(q.next().await, Some(Ok(5)));
    }
}
