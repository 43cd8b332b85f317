//! The cluster's control messages (the RAIS seed's Figs. 2B–2D) and their framing:
//! `LBC1`, body length (u32 BE), JSON body, HMAC-SHA256 over everything before it.
//! Decoding checks, in this order: size, magic and length, MAC, body; a message that
//! fails any of them is reported with the reason, to be counted and never acted on.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

const MAGIC: &[u8; 4] = b"LBC1";
const HEADER: usize = 8;
const MAC_LEN: usize = 32;
/// Larger datagrams are refused before any parsing (a UDP datagram carries 64 KiB).
pub const MAX_MESSAGE: usize = 60 * 1024;

/// State of a service address on the host that reports it (Fig. 2D).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddrState {
    Acquiring,
    Releasing,
    Online,
}

/// Host Information Entry (Fig. 2C), with the preferred addresses of the seed's text
/// and the group's service addresses this host is configured to carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// The host's id: its first control address. The lowest alive id leads.
    pub id: IpAddr,
    pub control_addresses: Vec<IpAddr>,
    /// The host's own tests pass (interface up, XDP attached, a backend reachable).
    pub ok: bool,
    /// Acquires nothing new; keeps what it serves.
    pub quiesce: bool,
    /// Leaving the group for good: its VIPs go to others, which acquire them before
    /// it releases them.
    #[serde(default)]
    pub leaving: bool,
    pub load: u32,
    pub capacity: u32,
    /// Service addresses this host prefers (none: a hot spare).
    pub preferred: Vec<IpAddr>,
    /// Service addresses this host serves, and in what state.
    pub serving: BTreeMap<IpAddr, AddrState>,
    /// The group's service addresses as this host's configuration lists them.
    pub addresses: Vec<IpAddr>,
    /// This host is the directory's master (sticky: it stays master while alive).
    #[serde(default)]
    pub dir_master: bool,
    /// This host is the directory's backup, of that master: it stored every change
    /// the master acknowledged, so it takes over when the master dies (a claim as
    /// sticky as the master's, so that stale versions in heartbeats cannot pick
    /// another node; naming the master tells a new master's backup from the old one).
    #[serde(default)]
    pub dir_backup_of: Option<IpAddr>,
    /// The version of this host's directory replica ...
    #[serde(default)]
    pub dir_version: u64,
    /// ... and the digest of its content (`Tables::digest`): equal versions with
    /// different digests are replicas that diverged.
    #[serde(default)]
    pub dir_digest: u64,
    /// The host has finished its start-up sync (directory and availability); until
    /// then it takes no VIP (it may lack what the cluster decided while it was away).
    #[serde(default = "yes")]
    pub ready: bool,
    /// A digest of the tables of the services on each VIP, as this host's data plane
    /// holds them (`layout::fingerprint` combined): a host whose digest differs from
    /// the VIP's owner's would steer flows elsewhere, so it does not take the VIP.
    #[serde(default)]
    pub digests: BTreeMap<IpAddr, u64>,
    /// VIPs whose every service has no usable backend from this host: it does not
    /// take them (it would only refuse their clients).
    #[serde(default)]
    pub unable: BTreeSet<IpAddr>,
}

fn yes() -> bool {
    true
}

/// A message of the group. Every kind carries the sender's id and a sequence number
/// that ascends over all of the sender's messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Message {
    /// The periodic heartbeat (Fig. 2B).
    Info {
        seq: u64,
        host: HostInfo,
        /// What the sender knows of the others, with the age of that knowledge (ms).
        others: Vec<(HostInfo, u64)>,
        /// Service addresses with the time since they were last served by their
        /// preferred host (ms).
        service_addresses: Vec<(IpAddr, u64)>,
    },
    /// The leader tells `to` to serve `address`.
    Acquire {
        seq: u64,
        from: IpAddr,
        to: IpAddr,
        address: IpAddr,
    },
    /// The leader tells `to` to stop serving `address`.
    Release {
        seq: u64,
        from: IpAddr,
        to: IpAddr,
        address: IpAddr,
    },
}

impl Message {
    pub fn sender(&self) -> IpAddr {
        match self {
            Message::Info { host, .. } => host.id,
            Message::Acquire { from, .. } | Message::Release { from, .. } => *from,
        }
    }

    pub fn seq(&self) -> u64 {
        match self {
            Message::Info { seq, .. }
            | Message::Acquire { seq, .. }
            | Message::Release { seq, .. } => *seq,
        }
    }
}

/// Why a datagram was dropped. Each has its own metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reject {
    Oversized,
    Malformed,
    BadMac,
    Replayed,
    Duplicate,
    FromSelf,
}

impl Reject {
    pub const ALL: [Reject; 6] = [
        Reject::Oversized,
        Reject::Malformed,
        Reject::BadMac,
        Reject::Replayed,
        Reject::Duplicate,
        Reject::FromSelf,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Reject::Oversized => "oversized",
            Reject::Malformed => "malformed",
            Reject::BadMac => "bad_mac",
            Reject::Replayed => "replayed",
            Reject::Duplicate => "duplicate",
            Reject::FromSelf => "from_self",
        }
    }
}

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8], data: &[u8]) -> [u8; MAC_LEN] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(data);
    m.finalize().into_bytes().into()
}

pub fn encode(message: &Message, key: &[u8]) -> Vec<u8> {
    encode_body(
        &serde_json::to_vec(message).expect("messages serialize"),
        key,
    )
}

/// Frames and signs any body (the directory's replication uses the same framing).
pub fn encode_body(body: &[u8], key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + body.len() + MAC_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    let tag = mac(key, &out);
    out.extend_from_slice(&tag);
    out
}

/// Checks and parses one datagram. Replays are the receiver's business (`Replay`).
pub fn decode(datagram: &[u8], key: &[u8]) -> Result<Message, Reject> {
    let body = decode_body(datagram, key, MAX_MESSAGE)?;
    serde_json::from_slice(body).map_err(|_| Reject::Malformed)
}

/// Checks size, framing and MAC; returns the authenticated body.
pub fn decode_body<'a>(datagram: &'a [u8], key: &[u8], max: usize) -> Result<&'a [u8], Reject> {
    if datagram.len() > max {
        return Err(Reject::Oversized);
    }
    if datagram.len() < HEADER + MAC_LEN || &datagram[..4] != MAGIC {
        return Err(Reject::Malformed);
    }
    let len = u32::from_be_bytes(datagram[4..8].try_into().expect("4 bytes")) as usize;
    if HEADER + len + MAC_LEN != datagram.len() {
        return Err(Reject::Malformed);
    }
    let (signed, tag) = datagram.split_at(HEADER + len);
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(signed);
    // Constant-time comparison: a forger learns nothing from timing.
    m.verify_slice(tag).map_err(|_| Reject::BadMac)?;
    Ok(&signed[HEADER..])
}

// ---- bodies of HTTP requests between nodes and to the registry ----------------------

const STREAM_MAGIC: &[u8; 4] = b"LBS1";
/// Magic, length (u32 BE), Unix seconds (u64 BE), then the first 16 bytes of the
/// HMAC over those 16 bytes.
pub const STREAM_HEADER: usize = 32;
/// A signed body older or newer than this (seconds) is refused as a replay.
pub const STREAM_MAX_AGE: u64 = 60;

fn header_tag(key: &[u8], fields: &[u8]) -> [u8; 16] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(b"lb stream header");
    m.update(fields);
    m.finalize().into_bytes()[..16]
        .try_into()
        .expect("16 bytes")
}

/// Frames an HTTP body so that the receiver can authenticate it before reading it:
/// a signed header (length and time), the payload, and an HMAC over both.
pub fn encode_stream(body: &[u8], key: &[u8], now_secs: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(STREAM_HEADER + body.len() + MAC_LEN);
    out.extend_from_slice(STREAM_MAGIC);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&now_secs.to_be_bytes());
    let tag = header_tag(key, &out);
    out.extend_from_slice(&tag);
    out.extend_from_slice(body);
    let whole = mac(key, &out);
    out.extend_from_slice(&whole);
    out
}

/// Checks a stream's first `STREAM_HEADER` bytes; returns the length of the whole
/// framed body to read. Refuses, before anything more is read: a wrong magic, a
/// header not signed with `key`, a body longer than `max`, a time more than
/// `STREAM_MAX_AGE` away from `now_secs` (a replay).
pub fn check_stream_header(
    head: &[u8],
    key: &[u8],
    max: usize,
    now_secs: u64,
) -> Result<usize, Reject> {
    if head.len() < STREAM_HEADER || &head[..4] != STREAM_MAGIC {
        return Err(Reject::Malformed);
    }
    let tag = header_tag(key, &head[..16]);
    // Constant time, like the whole-body check.
    use subtle_eq::eq;
    if !eq(&tag, &head[16..32]) {
        return Err(Reject::BadMac);
    }
    let len = u32::from_be_bytes(head[4..8].try_into().expect("4 bytes")) as usize;
    let at = u64::from_be_bytes(head[8..16].try_into().expect("8 bytes"));
    if at.abs_diff(now_secs) > STREAM_MAX_AGE {
        return Err(Reject::Replayed);
    }
    if len > max {
        return Err(Reject::Oversized);
    }
    Ok(STREAM_HEADER + len + MAC_LEN)
}

/// Checks a whole framed body (header included); returns the payload.
pub fn decode_stream<'a>(
    framed: &'a [u8],
    key: &[u8],
    max: usize,
    now_secs: u64,
) -> Result<&'a [u8], Reject> {
    let total = check_stream_header(framed, key, max, now_secs)?;
    if framed.len() != total {
        return Err(Reject::Malformed);
    }
    let (signed, tag) = framed.split_at(total - MAC_LEN);
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(signed);
    m.verify_slice(tag).map_err(|_| Reject::BadMac)?;
    Ok(&signed[STREAM_HEADER..])
}

/// The current time in Unix seconds, as the stream framing uses it.
pub fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

mod subtle_eq {
    /// Compares without an early exit, so that timing tells nothing about where two
    /// tags first differ.
    pub fn eq(a: &[u8], b: &[u8]) -> bool {
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// Per-sender sequence numbers seen: refuses anything not newer than the last one,
/// which covers both replays (old) and duplicates (the same again).
#[derive(Debug, Default)]
pub struct Replay {
    last: BTreeMap<IpAddr, u64>,
}

impl Replay {
    pub fn check(&mut self, me: IpAddr, message: &Message) -> Result<(), Reject> {
        let sender = message.sender();
        if sender == me {
            return Err(Reject::FromSelf);
        }
        let seq = message.seq();
        match self.last.get(&sender) {
            Some(&last) if seq == last => Err(Reject::Duplicate),
            Some(&last) if seq < last => Err(Reject::Replayed),
            _ => {
                self.last.insert(sender, seq);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(seq: u64) -> Message {
        Message::Info {
            seq,
            host: HostInfo {
                id: "198.18.0.2".parse().unwrap(),
                control_addresses: vec!["198.18.0.2".parse().unwrap()],
                ok: true,
                quiesce: false,
                leaving: false,
                load: 1,
                capacity: 10,
                preferred: vec!["198.18.0.100".parse().unwrap()],
                serving: BTreeMap::from([("198.18.0.100".parse().unwrap(), AddrState::Online)]),
                addresses: vec!["198.18.0.100".parse().unwrap()],
                dir_master: false,
                dir_backup_of: None,
                dir_version: 0,
                dir_digest: 0,
                ready: true,
                digests: BTreeMap::from([("198.18.0.100".parse().unwrap(), 7)]),
                unable: BTreeSet::new(),
            },
            others: vec![],
            service_addresses: vec![("198.18.0.100".parse().unwrap(), 0)],
        }
    }

    #[test]
    fn round_trips_with_the_right_key() {
        let m = info(7);
        assert_eq!(decode(&encode(&m, b"secret"), b"secret"), Ok(m));
    }

    #[test]
    fn a_wrong_key_or_any_flipped_bit_fails_the_mac() {
        let bytes = encode(&info(7), b"secret");
        assert_eq!(decode(&bytes, b"other"), Err(Reject::BadMac));
        for i in HEADER..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            assert_eq!(decode(&b, b"secret"), Err(Reject::BadMac), "byte {i}");
        }
    }

    #[test]
    fn framing_errors_are_malformed_and_size_is_checked_first() {
        let bytes = encode(&info(7), b"secret");
        assert_eq!(decode(&bytes[..10], b"secret"), Err(Reject::Malformed));
        let mut b = bytes.clone();
        b[0] = b'X';
        assert_eq!(decode(&b, b"secret"), Err(Reject::Malformed));
        let mut b = bytes.clone();
        b.push(0);
        assert_eq!(decode(&b, b"secret"), Err(Reject::Malformed));
        assert_eq!(
            decode(&vec![0u8; MAX_MESSAGE + 1], b"secret"),
            Err(Reject::Oversized)
        );
        // Authentic but not a message: signed garbage is still refused.
        let mut forged = Vec::from(*MAGIC);
        forged.extend_from_slice(&4u32.to_be_bytes());
        forged.extend_from_slice(b"junk");
        let tag = mac(b"secret", &forged);
        forged.extend_from_slice(&tag);
        assert_eq!(decode(&forged, b"secret"), Err(Reject::Malformed));
    }

    #[test]
    fn replays_and_duplicates_are_refused_per_sender() {
        let me: IpAddr = "198.18.0.3".parse().unwrap();
        let mut r = Replay::default();
        assert_eq!(r.check(me, &info(5)), Ok(()));
        assert_eq!(r.check(me, &info(5)), Err(Reject::Duplicate));
        assert_eq!(r.check(me, &info(4)), Err(Reject::Replayed));
        assert_eq!(r.check(me, &info(6)), Ok(()));
        assert_eq!(
            r.check("198.18.0.2".parse().unwrap(), &info(9)),
            Err(Reject::FromSelf)
        );
    }

    #[test]
    fn a_stream_is_refused_at_its_header_without_the_key_and_when_old_or_long() {
        let key = b"0123456789abcdef0123";
        let now = 1_000_000;
        let framed = encode_stream(b"{\"hello\":1}", key, now);
        assert_eq!(
            decode_stream(&framed, key, 1024, now + 5),
            Ok(&b"{\"hello\":1}"[..])
        );
        let total = check_stream_header(&framed[..STREAM_HEADER], key, 1024, now).unwrap();
        assert_eq!(total, framed.len());
        assert_eq!(
            check_stream_header(&framed[..STREAM_HEADER], b"another key at all..", 1024, now),
            Err(Reject::BadMac)
        );
        assert_eq!(
            check_stream_header(&framed, key, 4, now),
            Err(Reject::Oversized)
        );
        assert_eq!(
            check_stream_header(&framed, key, 1024, now + STREAM_MAX_AGE + 1),
            Err(Reject::Replayed)
        );
        let mut garbage = vec![b'x'; 64];
        assert_eq!(
            check_stream_header(&garbage, key, 1024, now),
            Err(Reject::Malformed)
        );
        garbage[..4].copy_from_slice(STREAM_MAGIC);
        assert_eq!(
            check_stream_header(&garbage, key, 1024, now),
            Err(Reject::BadMac)
        );
        // A body changed after the header: caught by the whole-body MAC.
        let mut tampered = framed.clone();
        tampered[STREAM_HEADER] ^= 1;
        assert_eq!(
            decode_stream(&tampered, key, 1024, now),
            Err(Reject::BadMac)
        );
    }
}
