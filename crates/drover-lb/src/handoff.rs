//! Handing listening sockets from one balancer process to the next (a seamless restart, as
//! HAProxy's `expose-fd listeners`): the old process sends `dup`s of its sockets over a Unix
//! socket (`SCM_RIGHTS`) with a header of the caller's; the new one accepts on the very same
//! sockets, so no connection queued in the kernel is lost and the port is never closed.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// Most sockets one handoff carries.
pub const MAX_SOCKETS: usize = 253;
/// Longest header one handoff carries.
pub const MAX_HEADER: usize = 16 << 20;

/// Send `header` and the sockets `fds` (in order) over `stream`.
pub fn send(stream: &UnixStream, header: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    if fds.len() > MAX_SOCKETS || header.len() > MAX_HEADER {
        return Err(std::io::Error::other(format!(
            "a handoff carries at most {MAX_SOCKETS} sockets and {MAX_HEADER} header bytes"
        )));
    }
    // The sockets ride on the first 8 bytes (the header's length); the header follows.
    let len = (header.len() as u64).to_be_bytes();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(std::io::Error::other(
            "no room for the sockets in the message",
        ));
    }
    let sent = sendmsg(
        stream,
        &[IoSlice::new(&len)],
        &mut control,
        SendFlags::empty(),
    )?;
    if sent != len.len() {
        return Err(std::io::Error::other("short handoff message"));
    }
    let mut w = stream;
    w.write_all(header)?;
    w.flush()
}

/// Receive what [`send`] sent: the header and the sockets, in order.
pub fn recv(stream: &UnixStream) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut len = [0u8; 8];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(
        stream,
        &mut [IoSliceMut::new(&mut len)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = msg {
            fds.extend(received);
        }
    }
    let mut r = stream;
    if got.bytes < len.len() {
        r.read_exact(&mut len[got.bytes..])?;
    }
    let n = u64::from_be_bytes(len) as usize;
    if n > MAX_HEADER {
        return Err(std::io::Error::other(format!(
            "handoff header of {n} bytes is over {MAX_HEADER}"
        )));
    }
    let mut header = vec![0u8; n];
    r.read_exact(&mut header)?;
    Ok((header, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A listening socket handed over keeps the connection the kernel queued on it before:
    /// the receiver accepts it.
    #[test]
    fn a_handed_over_socket_accepts_what_was_queued_before() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Queued in the kernel, not accepted by anyone yet.
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        client.write_all(b"queued").unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        send(&a, b"{\"names\":[\"web/local\"]}", &[listener.as_fd()]).unwrap();
        // The sender's copy goes away, as the old process's does.
        drop(listener);
        let (header, mut fds) = recv(&b).unwrap();
        assert_eq!(header, b"{\"names\":[\"web/local\"]}");
        assert_eq!(fds.len(), 1);
        let taken = std::net::TcpListener::from(fds.remove(0));
        assert_eq!(taken.local_addr().unwrap(), addr);
        let (mut conn, _) = taken.accept().unwrap();
        let mut buf = [0u8; 6];
        conn.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"queued");
    }

    #[test]
    fn a_handoff_without_sockets_carries_its_header() {
        let (a, b) = UnixStream::pair().unwrap();
        let big = vec![7u8; 300_000];
        let t = std::thread::spawn(move || send(&a, &big, &[]).unwrap());
        let (header, fds) = recv(&b).unwrap();
        t.join().unwrap();
        assert_eq!(header.len(), 300_000);
        assert!(fds.is_empty());
    }
}
