//! Talking to another LB node over its peer port (cluster port + 1), where the
//! directory's replication and the availability records travel as framed, signed
//! HTTP POSTs; and the node ids those messages carry.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::Result;

use crate::directory::replication::NodeId;

/// Where a node serves the directory's replication messages: its cluster id and the
/// cluster port + 1.
pub fn endpoint(id: IpAddr, cluster_port: u16) -> SocketAddr {
    SocketAddr::new(id, cluster_port.wrapping_add(1))
}

/// A node id from its cluster id address.
pub fn node_id(addr: IpAddr) -> NodeId {
    match addr {
        IpAddr::V4(a) => u32::from(a),
        IpAddr::V6(a) => {
            let o = a.octets();
            u32::from_be_bytes([o[12], o[13], o[14], o[15]])
        }
    }
}

/// POSTs one framed message to another node's endpoint (cluster port + 1: the
/// directory, availability); returns the answer's body.
pub async fn post_to_peer(
    addr: SocketAddr,
    path: &str,
    header: (&'static str, String),
    body: Vec<u8>,
) -> Result<Vec<u8>> {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::net::TcpStream::connect(addr),
    )
    .await??;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::post(path)
        .header("host", "lbd")
        .header(header.0, header.1)
        .body(Full::new(hyper::body::Bytes::from(body)))?;
    let resp = tokio::time::timeout(Duration::from_secs(2), sender.send_request(req)).await??;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(status.is_success(), "HTTP {status}");
    Ok(bytes.to_vec())
}
