//! The lab's backend server: answers with its own name, so a client sees who served it.
//! TCP: an HTTP GET gets `200` with the name as the body; any other line gets
//! `<name> <line>` back, for as long as the connection stays open (long-lived flows).
//! UDP: every datagram gets `<name> <datagram>` back.

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    thread,
};

use anyhow::{Context, Result};

fn serve_tcp(conn: TcpStream, name: &str) -> Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut writer = conn;
    let mut line = String::new();
    let mut first = true;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if first && line.starts_with("GET ") {
            // Headers up to the blank line, then one answer and close.
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
                    break;
                }
            }
            let body = format!("{name}\n");
            write!(
                writer,
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )?;
            return Ok(());
        }
        first = false;
        writer.write_all(format!("{name} {}\n", line.trim_end()).as_bytes())?;
    }
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let name = args.next().context("usage: lab-server NAME PORT")?;
    let port: u16 = args
        .next()
        .context("usage: lab-server NAME PORT")?
        .parse()?;
    // Dual stack: IPv4 clients arrive as mapped addresses.
    let udp = UdpSocket::bind(("::", port)).context("binding UDP")?;
    let udp_name = name.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let reply = format!(
                "{udp_name} {}",
                String::from_utf8_lossy(&buf[..n]).trim_end()
            );
            let _ = udp.send_to(reply.as_bytes(), from);
        }
    });
    let tcp = TcpListener::bind(("::", port)).context("binding TCP")?;
    eprintln!("lab-server {name} listening on TCP and UDP port {port}");
    for conn in tcp.incoming() {
        let Ok(conn) = conn else { continue };
        let name = name.clone();
        thread::spawn(move || {
            let _ = serve_tcp(conn, &name);
        });
    }
    Ok(())
}
