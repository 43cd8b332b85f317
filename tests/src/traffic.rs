//! Client traffic for the lab: HTTP requests and UDP questions from chosen source
//! addresses, and long-lived TCP conversations. Every call is bounded by a timeout.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

fn tcp_from(src: Option<Ipv4Addr>, dst: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let sock = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(src) = src {
        sock.bind(&SocketAddr::from((src, 0)).into())
            .with_context(|| format!("binding to {src}"))?;
    }
    sock.connect_timeout(&dst.into(), timeout)
        .with_context(|| format!("connecting to {dst} from {src:?}"))?;
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// One HTTP/1.0 GET; returns the body, trimmed (the backend's name).
pub fn http_get(src: Option<Ipv4Addr>, dst: SocketAddr, timeout: Duration) -> Result<String> {
    let mut s = tcp_from(src, dst, timeout)?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: lab\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .context("reading the HTTP answer")?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .context("no HTTP header end in the answer")?;
    if !head.starts_with("HTTP/1.0 200") {
        bail!("unexpected answer: {head}");
    }
    Ok(body.trim().to_string())
}

/// One UDP question; returns the first word of the answer (the backend's name).
pub fn udp_ask(
    src: Option<Ipv4Addr>,
    dst: SocketAddr,
    question: &str,
    timeout: Duration,
) -> Result<String> {
    let sock = match (src, dst) {
        (_, SocketAddr::V6(_)) => UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, 0))?,
        (src, SocketAddr::V4(_)) => UdpSocket::bind((src.unwrap_or(Ipv4Addr::UNSPECIFIED), 0))?,
    };
    sock.set_read_timeout(Some(timeout))?;
    sock.send_to(question.as_bytes(), dst)?;
    let mut buf = [0u8; 1500];
    let (n, _) = sock
        .recv_from(&mut buf)
        .with_context(|| format!("no UDP answer from {dst}"))?;
    let answer = String::from_utf8_lossy(&buf[..n]).to_string();
    let (name, echoed) = answer.split_once(' ').context("malformed UDP answer")?;
    if echoed != question {
        bail!("UDP answer echoes {echoed:?}, not {question:?}");
    }
    Ok(name.to_string())
}

/// A TCP connection kept open across requests: each `ask` is one line out, one back.
pub struct Conversation {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conversation {
    pub fn open(src: Option<Ipv4Addr>, dst: SocketAddr, timeout: Duration) -> Result<Self> {
        let s = tcp_from(src, dst, timeout)?;
        Ok(Self {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// Sends `line`; returns the name of the backend that answered.
    pub fn ask(&mut self, line: &str) -> Result<String> {
        self.writer.write_all(format!("{line}\n").as_bytes())?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            bail!("the connection was closed");
        }
        let (name, echoed) = answer
            .trim_end()
            .split_once(' ')
            .context("malformed answer")?;
        if echoed != line {
            bail!("answer echoes {echoed:?}, not {line:?}");
        }
        Ok(name.to_string())
    }

    /// As `ask`, retried every 50 ms for up to `within` while the path is changing
    /// (a route or a node moving): the first answer, or the last error.
    pub fn ask_within(&mut self, line: &str, within: Duration) -> Result<String> {
        let deadline = std::time::Instant::now() + within;
        loop {
            match self.ask(line) {
                Ok(name) => return Ok(name),
                Err(e) if std::time::Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// `n` new connections (HTTP GETs) spread over the given source addresses; returns
/// how many each backend answered. Fails on the first failed request.
pub fn http_spread(
    sources: &[Ipv4Addr],
    dst: SocketAddr,
    n: usize,
    timeout: Duration,
) -> Result<BTreeMap<String, usize>> {
    let mut answers = BTreeMap::new();
    for i in 0..n {
        let src = sources.get(i % sources.len().max(1)).copied();
        let name = http_get(src, dst, timeout).with_context(|| format!("request {i}"))?;
        *answers.entry(name).or_default() += 1;
    }
    Ok(answers)
}

/// As `http_spread`, with UDP questions.
pub fn udp_spread(
    sources: &[Ipv4Addr],
    dst: SocketAddr,
    n: usize,
    timeout: Duration,
) -> Result<BTreeMap<String, usize>> {
    let mut answers = BTreeMap::new();
    for i in 0..n {
        let src = sources.get(i % sources.len().max(1)).copied();
        let name = udp_ask(src, dst, &format!("question {i}"), timeout)
            .with_context(|| format!("UDP question {i}"))?;
        *answers.entry(name).or_default() += 1;
    }
    Ok(answers)
}
