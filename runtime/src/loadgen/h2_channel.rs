//! A gRPC transport for the load generator: tonic's generated client over
//! one plain HTTP/2 connection (the `h2` crate), instead of tonic's
//! `Channel`. The channel hands every call to a buffer task and sends a
//! unary request as three writes (headers, message, an empty end of
//! stream); at thousands of calls a second on the machine that also runs
//! the API, that costs the load generator, and the server that reads those
//! writes, CPU the API under test should have. Here a call's frames are
//! queued together by the caller's task and leave in one write.

use bytes::Bytes;
use h2::client::SendRequest;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One HTTP/2 connection; clones share it. A call that finds it gone (the
/// API restarted, or said GOAWAY) opens a new one, as tonic's channel
/// would, so a careful load outlives an API restart.
#[derive(Clone)]
pub(super) struct H2Channel {
    shared: Arc<Shared>,
}

struct Shared {
    authority: String,
    /// The connection calls use, and how many were opened before it.
    current: Mutex<(u64, SendRequest<Bytes>)>,
    /// Held while reconnecting: one new connection per loss, not one per call.
    reconnecting: tokio::sync::Mutex<()>,
}

impl H2Channel {
    /// Connects to `authority` (`host:port`) in cleartext HTTP/2 (h2c with
    /// prior knowledge, as tonic's server expects).
    pub(super) async fn connect(authority: &str) -> Result<Self, BoxError> {
        let send = open(authority).await?;
        Ok(H2Channel {
            shared: Arc::new(Shared {
                authority: authority.to_owned(),
                current: Mutex::new((0, send)),
                reconnecting: tokio::sync::Mutex::new(()),
            }),
        })
    }

    fn current(&self) -> (u64, SendRequest<Bytes>) {
        self.shared
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A connection ready for a new call: the current one, or a new one if
    /// it is gone. Nothing of the call has reached a server yet.
    async fn ready(&self) -> Result<SendRequest<Bytes>, BoxError> {
        let (generation, send) = self.current();
        match send.ready().await {
            Ok(send) => Ok(send),
            Err(_) => Ok(self.reconnect(generation).await?.ready().await?),
        }
    }

    /// A working connection after the one of `lost_generation` failed.
    async fn reconnect(&self, lost_generation: u64) -> Result<SendRequest<Bytes>, BoxError> {
        let _one_at_a_time = self.shared.reconnecting.lock().await;
        let (generation, send) = self.current();
        if generation != lost_generation {
            // Another call reconnected while this one waited.
            return Ok(send);
        }
        let fresh = open(&self.shared.authority).await?;
        *self
            .shared
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (generation + 1, fresh.clone());
        Ok(fresh)
    }
}

async fn open(authority: &str) -> Result<SendRequest<Bytes>, BoxError> {
    let tcp = tokio::net::TcpStream::connect(authority).await?;
    // Without it a call waits for the server's delayed ACK (~40 ms).
    tcp.set_nodelay(true)?;
    let (send, connection) = h2::client::Builder::new()
        // Windows as large as hyper's server uses: no WINDOW_UPDATE
        // round trips for multi-megabyte images.
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 20)
        .handshake::<_, Bytes>(tcp)
        .await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "gRPC connection closed");
        }
    });
    Ok(send)
}

impl tower_service::Service<http::Request<tonic::body::Body>> for H2Channel {
    type Response = http::Response<H2Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness (the server's stream limit) is awaited per call, on the
        // connection that sends it.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let channel = self.clone();
        Box::pin(async move {
            let (head, body) = request.into_parts();
            // A unary request's body is one encoded message, ready at once;
            // collecting it lets it go out with the end of stream flag.
            let message = body.collect().await?.to_bytes();
            let mut send = channel.ready().await?;
            // Head and message (with the end of stream) queued together
            // leave in one write.
            let (response, mut stream) =
                send.send_request(http::Request::from_parts(head, ()), message.is_empty())?;
            if !message.is_empty() {
                stream.send_data(message, true)?;
            }
            let response = response.await?;
            Ok(response.map(|recv| H2Body {
                recv,
                data_done: false,
                finished: false,
            }))
        })
    }
}

/// A response body: the stream's data, then its trailers (where gRPC puts
/// the call's status).
pub(super) struct H2Body {
    recv: h2::RecvStream,
    data_done: bool,
    finished: bool,
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Reopens the window as the data is handed on.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None => self.data_done = true,
            }
        }
        let trailers = ready!(self.recv.poll_trailers(cx));
        self.finished = true;
        Poll::Ready(trailers.transpose().map(|t| t.map(Frame::trailers)))
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }
}
