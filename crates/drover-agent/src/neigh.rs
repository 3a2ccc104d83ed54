//! Teach the host's neighbor (ARP) table where a container that just started is.
//!
//! While a bridged container restarts, packets for its address (a client reconnecting through
//! the published port) find no interface answering ARP, and the kernel marks the neighbor entry
//! incomplete; it asks again only after `retrans_time` (1 s by default), so the container, up
//! after a few hundred milliseconds, stays unreachable for up to a second more. Once the
//! container runs, the agent writes the entry (its address and MAC, both known from the engine)
//! as `STALE`: the kernel uses it at once, sends what it had queued, and confirms it as usual.
//! Best effort: without CAP_NET_ADMIN this fails and nothing else changes.

use std::io;
use std::net::Ipv4Addr;

/// `ip neigh replace IP lladdr MAC dev IFACE nud stale`, where IFACE is the interface that holds
/// `gateway` (the container network's bridge).
pub(crate) fn refresh(gateway: Ipv4Addr, ip: Ipv4Addr, mac: [u8; 6]) -> io::Result<()> {
    let ifindex = interface_with(gateway)?;
    // SAFETY: plain socket syscalls on a descriptor we own, buffers of the stated sizes.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let r = send_and_ack(fd, &message(ifindex, ip, mac));
        libc::close(fd);
        r
    }
}

/// RTM_NEWNEIGH (create or replace): nlmsghdr, ndmsg, NDA_DST, NDA_LLADDR.
fn message(ifindex: i32, ip: Ipv4Addr, mac: [u8; 6]) -> Vec<u8> {
    let mut body = Vec::with_capacity(40);
    // struct ndmsg { u8 family, u8 pad1, u16 pad2, i32 ifindex, u16 state, u8 flags, u8 type }
    body.push(libc::AF_INET as u8);
    body.extend_from_slice(&[0, 0, 0]);
    body.extend_from_slice(&ifindex.to_ne_bytes());
    body.extend_from_slice(&(libc::NUD_STALE).to_ne_bytes());
    body.push(0);
    body.push(libc::RTN_UNICAST);
    attr(&mut body, libc::NDA_DST, &ip.octets());
    attr(&mut body, libc::NDA_LLADDR, &mac);
    let len = 16 + body.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&libc::RTM_NEWNEIGH.to_ne_bytes());
    let flags =
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE) as u16;
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    msg.extend_from_slice(&body);
    msg
}

/// A route attribute, padded to 4 bytes.
fn attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    buf.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    while buf.len() % 4 != 0 {
        buf.push(0);
    }
}

/// Send one request and read the kernel's acknowledgement (an `NLMSG_ERROR` with code 0).
unsafe fn send_and_ack(fd: i32, msg: &[u8]) -> io::Result<()> {
    let mut addr: libc::sockaddr_nl = std::mem::zeroed();
    addr.nl_family = libc::AF_NETLINK as u16;
    let sent = libc::sendto(
        fd,
        msg.as_ptr().cast(),
        msg.len(),
        0,
        (&addr as *const libc::sockaddr_nl).cast(),
        std::mem::size_of::<libc::sockaddr_nl>() as u32,
    );
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    libc::setsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVTIMEO,
        (&tv as *const libc::timeval).cast(),
        std::mem::size_of::<libc::timeval>() as u32,
    );
    let mut buf = [0u8; 512];
    let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == libc::NLMSG_ERROR as u16 {
        let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        if code != 0 {
            return Err(io::Error::from_raw_os_error(-code));
        }
    }
    Ok(())
}

/// The index of the interface that has `addr` (IPv4).
fn interface_with(addr: Ipv4Addr) -> io::Result<i32> {
    // SAFETY: getifaddrs' list is walked read-only and freed once.
    unsafe {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut list) != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut found = None;
        let mut cur = list;
        while !cur.is_null() {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null() && (*ifa.ifa_addr).sa_family as i32 == libc::AF_INET {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                if Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)) == addr {
                    found = Some(libc::if_nametoindex(ifa.ifa_name) as i32);
                    break;
                }
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(list);
        match found {
            Some(i) if i > 0 => Ok(i),
            _ => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no interface has {addr}"),
            )),
        }
    }
}

/// `02:42:ac:11:00:02` as bytes.
pub(crate) fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_messages() {
        assert_eq!(
            parse_mac("02:42:ac:11:00:02"),
            Some([2, 0x42, 0xac, 0x11, 0, 2])
        );
        assert_eq!(parse_mac("02:42:ac:11:00"), None);
        assert_eq!(parse_mac("02:42:ac:11:00:02:03"), None);
        let m = message(7, Ipv4Addr::new(172, 17, 0, 2), [2, 0x42, 0xac, 0x11, 0, 2]);
        // header 16 + ndmsg 12 + dst 8 + lladdr 12 (10, padded)
        assert_eq!(m.len(), 48);
        assert_eq!(u32::from_ne_bytes([m[0], m[1], m[2], m[3]]), 48);
        assert!(interface_with(Ipv4Addr::new(127, 0, 0, 1)).is_ok());
    }
}
