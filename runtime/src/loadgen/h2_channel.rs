//! A gRPC transport for the load generator: tonic's generated client over
//! one plain HTTP/2 connection (the `h2` crate), instead of tonic's
//! `Channel`. The channel hands every call to a buffer task and sends a
//! unary request as three writes (headers, message, an empty end of
//! stream); at thousands of calls a second on the machine that also runs
//! the API, that costs the load generator, and the server that reads those
//! writes, CPU the API under test should have. Here a call's frames are
//! queued together by the caller's task and leave in one write.

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One HTTP/2 connection; clones share it. The connection is driven by a
/// task of its own and closes when the last clone is dropped.
#[derive(Clone)]
pub(super) struct H2Channel {
    send: h2::client::SendRequest<Bytes>,
}

impl H2Channel {
    /// Connects to `authority` (`host:port`) in cleartext HTTP/2 (h2c with
    /// prior knowledge, as tonic's server expects).
    pub(super) async fn connect(authority: &str) -> Result<Self, BoxError> {
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
        Ok(H2Channel { send })
    }
}

impl tower_service::Service<http::Request<tonic::body::Body>> for H2Channel {
    type Response = http::Response<H2Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness (the server's stream limit) is awaited per call below,
        // on the clone that sends it.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let send = self.send.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            // A unary request's body is one encoded message, ready at once;
            // collecting it lets it go out with the end of stream flag.
            let message = body.collect().await?.to_bytes();
            let mut send = send.ready().await?;
            let (response, mut stream) =
                send.send_request(http::Request::from_parts(parts, ()), message.is_empty())?;
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
