//! Servers that run inside a lab host and answer with the host's name, so a client can
//! tell which backend served it.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::netns::Netns;

/// A TCP server that writes its name to every connection and closes it. Stops on drop.
pub struct NameServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<u64>>>,
}

impl NameServer {
    /// Listens on all addresses of `ns` (including a VIP on its loopback) at `port`.
    pub fn start(ns: &Netns, port: u16, name: &str) -> Result<NameServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let name = name.to_string();
        let flag = stop.clone();
        let thread = ns.spawn(move || {
            let listener =
                TcpListener::bind(("0.0.0.0", port)).context("binding the name server")?;
            listener.set_nonblocking(true)?;
            let _ = ready_tx.send(());
            let mut served = 0;
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        conn.set_nonblocking(false)?;
                        let _ = conn.write_all(format!("{name}\n").as_bytes());
                        served += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => return Err(e).context("accepting"),
                }
            }
            Ok(served)
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("the name server did not start listening")?;
        Ok(NameServer {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the server; returns how many connections it served.
    pub fn stop(mut self) -> Result<u64> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("name server panicked"))?,
            None => Ok(0),
        }
    }
}

impl Drop for NameServer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Connects, reads the server's answer to EOF, returns it trimmed.
pub fn ask_name(addr: SocketAddr, timeout: Duration) -> Result<String> {
    let mut conn = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    conn.set_read_timeout(Some(timeout))?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)
        .with_context(|| format!("reading the answer from {addr}"))?;
    Ok(answer.trim().to_string())
}
