//! Batched UDP for the WireGuard device: many datagrams per system call.
//!
//! - [`Outbox`]: encrypted packets collect in place (no copy) while the TUN
//!   queue has more; a run of equal-size datagrams to one peer leaves in one
//!   `sendmsg` with UDP GSO (`UDP_SEGMENT`): one trip down the stack, cut into
//!   datagrams at the bottom. Where GSO is refused (old kernel, odd route), the
//!   batch goes out with one `sendmmsg`, and GSO is not tried again.
//! - [`Inbox`]: one `recvmmsg` takes every datagram waiting, up to [`BATCH`].
#![allow(unsafe_code)]

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd as _;

use socket2::SockAddr;

/// Datagrams per batch.
pub const BATCH: usize = 32;
/// Most segments the kernel takes in one GSO send (`UDP_MAX_SEGMENTS`).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes in one GSO send (an IP packet's payload).
const GSO_MAX_BYTES: usize = 65_000;
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;

/// Encrypted datagrams waiting to be sent.
pub struct Outbox {
    bufs: Vec<Vec<u8>>,
    /// (start, len) of each datagram inside its buffer.
    spans: Vec<(usize, usize)>,
    to: Vec<SockAddr>,
    gso: bool,
}

impl Outbox {
    /// An empty outbox whose buffers hold `size` bytes each.
    pub fn new(size: usize) -> Outbox {
        Outbox {
            bufs: (0..BATCH).map(|_| vec![0u8; size]).collect(),
            spans: Vec::with_capacity(BATCH),
            to: Vec::with_capacity(BATCH),
            gso: true,
        }
    }

    /// True when no more fits.
    pub fn is_full(&self) -> bool {
        self.spans.len() == BATCH
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// How many datagrams wait.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Forgets what waits.
    pub fn clear(&mut self) {
        self.spans.clear();
        self.to.clear();
    }

    /// The buffer the next datagram is written into.
    pub fn next_buf(&mut self) -> &mut [u8] {
        let i = self.spans.len().min(BATCH - 1);
        &mut self.bufs[i]
    }

    /// Keeps the datagram just written into [`Outbox::next_buf`], at
    /// `start..start + len` of that buffer, for `to`.
    pub fn commit(&mut self, start: usize, len: usize, to: SocketAddr) {
        let i = self.spans.len();
        if i == BATCH
            || start
                .checked_add(len)
                .is_none_or(|end| end > self.bufs[i].len())
        {
            return;
        }
        self.spans.push((start, len));
        self.to.push(SockAddr::from(to));
    }

    fn datagram(&self, i: usize) -> &[u8] {
        let (s, n) = self.spans[i];
        &self.bufs[i][s..s + n]
    }

    /// Sends what waits. Datagrams the kernel refuses are dropped and counted
    /// in [`Flush::failed`]; when the socket's buffer is full (a non-blocking
    /// socket says `WouldBlock`) the rest stays, in order, for the next flush
    /// once the socket is writable again.
    pub fn flush(&mut self, sock: &UdpSocket) -> Flush {
        let mut failed = 0;
        let mut i = 0;
        let n = self.spans.len();
        while i < n {
            // A run to one peer, of equal sizes but for a shorter last one.
            let seg = self.spans[i].1;
            let mut j = i + 1;
            let mut bytes = seg;
            while self.gso
                && j < n
                && j - i < GSO_MAX_SEGMENTS
                && self.to[j] == self.to[i]
                && self.spans[j - 1].1 == seg
                && self.spans[j].1 <= seg
                && bytes + self.spans[j].1 <= GSO_MAX_BYTES
            {
                bytes += self.spans[j].1;
                j += 1;
            }
            if j - i > 1 {
                match self.send_gso(sock, i, j, seg) {
                    Ok(()) => {
                        i = j;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return self.blocked(i, failed);
                    }
                    Err(e) if is_gso_refusal(&e) => {
                        tracing::debug!(error = %e, "UDP GSO refused; sending datagrams one by one");
                        self.gso = false;
                    }
                    Err(_) => {
                        failed += j - i;
                        i = j;
                        continue;
                    }
                }
            }
            // The rest without GSO, one sendmmsg for what is left.
            let end = if self.gso { i + 1 } else { n };
            let (done, lost, blocked) = self.send_many(sock, i, end);
            failed += lost;
            i += done;
            if blocked {
                return self.blocked(i, failed);
            }
        }
        self.spans.clear();
        self.to.clear();
        Flush {
            failed,
            blocked: false,
        }
    }

    /// Keeps the datagrams from `first` on (moved to the front, buffers and
    /// all) for the next flush.
    fn blocked(&mut self, first: usize, failed: usize) -> Flush {
        self.bufs.rotate_left(first);
        self.spans.drain(..first);
        self.to.drain(..first);
        Flush {
            failed,
            blocked: true,
        }
    }

    /// The datagrams `from..to` as an I/O vector (on the stack: a flush
    /// allocates nothing).
    fn iovecs(&self, from: usize, to: usize) -> [libc::iovec; BATCH] {
        // SAFETY: an iovec is plain data; all-zero (null, 0) is valid.
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        for (slot, k) in iov.iter_mut().zip(from..to) {
            let d = self.datagram(k);
            slot.iov_base = d.as_ptr() as *mut libc::c_void;
            slot.iov_len = d.len();
        }
        iov
    }

    fn send_gso(&self, sock: &UdpSocket, from: usize, to: usize, seg: usize) -> io::Result<()> {
        let mut iov = self.iovecs(from, to);
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
        // Aligned for a cmsghdr, and room for one u16 (24 bytes on 64-bit Linux).
        let mut control = [0u64; 4];
        if space > std::mem::size_of_val(&control) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let addr = &self.to[from];
        // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = addr.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = addr.len();
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = to - from;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space;
        // SAFETY: msg_control points at `space` bytes, enough for one u16 cmsg.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = SOL_UDP;
            (*c).cmsg_type = UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
            let seg = u16::try_from(seg).unwrap_or(u16::MAX);
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg);
        }
        // SAFETY: msg is fully initialised and its buffers are alive.
        let rc = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// One `sendmmsg` (repeated while the kernel takes part of it): how many
    /// datagrams it got past (sent or dropped), how many it dropped, and
    /// whether it stopped at a full socket buffer.
    fn send_many(&self, sock: &UdpSocket, from: usize, to: usize) -> (usize, usize, bool) {
        let mut iov = self.iovecs(from, to);
        let count = to - from;
        // SAFETY: a zeroed mmsghdr is valid; the pointers set below outlive the call.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (k, (m, v)) in msgs.iter_mut().zip(iov.iter_mut()).take(count).enumerate() {
            let addr = &self.to[from + k];
            m.msg_hdr.msg_name = addr.as_ptr() as *mut libc::c_void;
            m.msg_hdr.msg_namelen = addr.len();
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
        }
        let msgs = &mut msgs[..count];
        let mut sent = 0;
        let mut failed = 0;
        while sent < msgs.len() {
            let left = &mut msgs[sent..];
            // SAFETY: `left` is a valid array of initialised mmsghdr.
            let rc = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    left.as_mut_ptr(),
                    left.len() as libc::c_uint,
                    0,
                )
            };
            if rc > 0 {
                sent += rc as usize;
            } else if rc < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock {
                return (sent, failed, true);
            } else {
                // Skip the one that failed and go on.
                failed += 1;
                sent += 1;
            }
        }
        (sent, failed, false)
    }
}

/// What a [`Outbox::flush`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flush {
    /// Datagrams the kernel refused (dropped).
    pub failed: usize,
    /// The socket's buffer filled: what is left waits in the outbox.
    pub blocked: bool,
}

fn is_gso_refusal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
}

/// Datagrams received in one call.
pub struct Inbox {
    bufs: Vec<Vec<u8>>,
    lens: Vec<usize>,
    from: Vec<Option<SocketAddr>>,
    storage: Vec<libc::sockaddr_storage>,
}

impl Inbox {
    /// Buffers of `size` bytes each.
    pub fn new(size: usize) -> Inbox {
        Inbox {
            bufs: (0..BATCH).map(|_| vec![0u8; size]).collect(),
            lens: vec![0; BATCH],
            from: vec![None; BATCH],
            // SAFETY: sockaddr_storage is plain data; zeroed is valid.
            storage: (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect(),
        }
    }

    /// Takes every datagram waiting, up to [`BATCH`]; returns how many. On a
    /// blocking socket it waits (up to its read timeout) for the first; on a
    /// non-blocking one, none waiting is `WouldBlock`.
    pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        // On the stack: a receive allocates nothing.
        // SAFETY: iovec and mmsghdr are plain data; all-zero is valid, and
        // every pointer set below outlives the call.
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (((m, v), b), a) in msgs
            .iter_mut()
            .zip(iov.iter_mut())
            .zip(self.bufs.iter_mut())
            .zip(self.storage.iter_mut())
        {
            v.iov_base = b.as_mut_ptr() as *mut libc::c_void;
            v.iov_len = b.len();
            m.msg_hdr.msg_name = a as *mut _ as *mut libc::c_void;
            m.msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: msgs points at BATCH initialised headers whose buffers are alive.
        let rc = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = rc as usize;
        for (k, m) in msgs.iter().enumerate().take(n) {
            self.lens[k] = m.msg_len as usize;
            let mut storage = socket2::SockAddrStorage::zeroed();
            // SAFETY: sockaddr_storage is one of this platform's sockaddr
            // types; the kernel wrote an address of msg_namelen bytes into it.
            let addr = unsafe {
                *storage.view_as::<libc::sockaddr_storage>() = self.storage[k];
                SockAddr::new(storage, m.msg_hdr.msg_namelen)
            };
            self.from[k] = addr.as_socket();
        }
        Ok(n)
    }

    /// The `i`th datagram of the last [`Inbox::recv`] and its sender.
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        Some((&self.bufs[i][..self.lens[i]], self.from[i]?))
    }
}
