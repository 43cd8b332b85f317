//! lbctl's side of the management API: HTTP/1.1 over the daemon's Unix socket, or
//! over TCP to a registry port, with bodies signed with the registry key.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Method, Request};
use hyper_util::rt::TokioIo;
use serde::{de::DeserializeOwned, Serialize};
use thiserror::Error;

use crate::api::ErrorBody;

#[derive(Debug, Error)]
pub enum ClientError {
    /// The daemon is not there: scripts tell this apart by the exit code.
    #[error("lbd is not running (no answer on {path}): start it with `lbd --config /etc/lb/lbd.toml` or pass --socket")]
    NotRunning { path: PathBuf },
    /// lbd refused the request and said why; `body` is its whole answer (some carry
    /// more than the reason, such as the new map of an epoch mismatch).
    #[error("{message}")]
    Daemon {
        message: String,
        status: u16,
        body: Vec<u8>,
    },
    #[error("talking to lbd on {path}: {message}")]
    Protocol { path: PathBuf, message: String },
}

#[derive(Clone)]
pub struct Client {
    /// The API socket, or for a registry client its address (shown in errors).
    socket: PathBuf,
    registry: Option<(std::net::SocketAddr, Vec<u8>)>,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            registry: None,
        }
    }

    /// A client of a registry port (`node.registry_listen`): requests over TCP, each
    /// body signed with the registry key.
    pub fn registry(addr: std::net::SocketAddr, key: Vec<u8>) -> Self {
        Self {
            socket: PathBuf::from(addr.to_string()),
            registry: Some((addr, key)),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn protocol(&self, message: impl ToString) -> ClientError {
        ClientError::Protocol {
            path: self.socket.clone(),
            message: message.to_string(),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "lbd")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| self.protocol(e))?;
        let response = self.send(request).await?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.protocol(e))?
            .to_bytes();
        // 202 with an error body: taken but not done (a cluster change still pending).
        let pending = status.as_u16() == 202 && serde_json::from_slice::<ErrorBody>(&bytes).is_ok();
        if !status.is_success() || pending {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)));
            return Err(ClientError::Daemon {
                message,
                status: status.as_u16(),
                body: bytes.to_vec(),
            });
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| self.protocol(format!("unexpected answer to {path}: {e}")))
    }

    /// One request over a new connection to lbd's socket.
    async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let not_running = |_| ClientError::NotRunning {
            path: self.socket.clone(),
        };
        if let Some((addr, _)) = &self.registry {
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(not_running)?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| self.protocol(e))?;
            tokio::spawn(conn);
            return sender
                .send_request(request)
                .await
                .map_err(|e| self.protocol(e));
        }
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(not_running)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.protocol(e))?;
        tokio::spawn(conn);
        sender
            .send_request(request)
            .await
            .map_err(|e| self.protocol(e))
    }

    /// GETs a newline-delimited stream, calling `line` for each line as it arrives.
    pub async fn get_lines(
        &self,
        path: &str,
        mut line: impl FnMut(&str),
    ) -> Result<(), ClientError> {
        let request = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header("host", "lbd")
            .body(Full::new(Bytes::new()))
            .map_err(|e| self.protocol(e))?;
        let response = self.send(request).await?;
        let status = response.status();
        let mut body = response.into_body();
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.protocol(e))?;
            if let Some(data) = frame.data_ref() {
                pending.extend_from_slice(data);
                while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                    let l: Vec<u8> = pending.drain(..=i).collect();
                    if status.is_success() {
                        line(String::from_utf8_lossy(&l).trim_end());
                    }
                }
            }
        }
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&pending)
                .map(|e| e.error)
                .unwrap_or_else(|_| format!("HTTP {status}"));
            return Err(ClientError::Daemon {
                message,
                status: status.as_u16(),
                body: pending,
            });
        }
        Ok(())
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let mut body = serde_json::to_vec(body).map_err(|e| self.protocol(e))?;
        if let Some((_, key)) = &self.registry {
            body =
                crate::cluster::wire::encode_stream(&body, key, crate::cluster::wire::unix_secs());
        }
        self.call(Method::POST, path, Some(body)).await
    }
}
