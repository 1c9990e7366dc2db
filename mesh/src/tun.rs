//! A Linux TUN device (L3, no packet-info header), one or several queues. The
//! interface lives as long as its file descriptors: dropping the [`Tun`]s
//! removes it, so a stopped or crashed daemon leaves no device behind.
#![allow(unsafe_code)]

use std::{
    fs::{File, OpenOptions},
    io,
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `<linux/if_tun.h>`: one interface, several queues.
const IFF_MULTI_QUEUE: libc::c_int = 0x0100;
/// The kernel's limit (`MAX_TAP_QUEUES`).
const MAX_QUEUES: usize = 256;

/// An open TUN interface.
#[derive(Debug)]
pub struct Tun {
    file: File,
    name: String,
}

impl Tun {
    /// Creates the TUN interface `name` with `queues` queues (one file
    /// descriptor each; more than one: `IFF_MULTI_QUEUE`, and the kernel
    /// spreads the flows it sends over them).
    pub fn create(name: &str, queues: usize) -> io::Result<Vec<Tun>> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("interface name {name:?}: 1 to 15 characters, no '/'"),
            ));
        }
        if !(1..=MAX_QUEUES).contains(&queues) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{queues} queues: 1 to {MAX_QUEUES}"),
            ));
        }
        let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
        if queues > 1 {
            flags |= IFF_MULTI_QUEUE;
        }
        (0..queues).map(|_| Tun::open(name, flags)).collect()
    }

    fn open(name: &str, flags: libc::c_int) -> io::Result<Tun> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            // Non-blocking: the device drains the queue until it is empty,
            // and waits on the runtime's reactor only then.
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open("/dev/net/tun")?;
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which outlives the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Tun {
            file,
            name: name.to_owned(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one packet; `WouldBlock` when none is queued.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        use std::io::Read as _;
        (&self.file).read(buf)
    }

    /// Writes one packet.
    pub fn send(&self, packet: &[u8]) -> io::Result<usize> {
        use std::io::Write as _;
        (&self.file).write(packet)
    }
}

impl std::os::fd::AsRawFd for Tun {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

/// A value that owns its descriptor for its whole life: what may be
/// registered with the runtime's reactor.
pub(crate) trait Registrable: std::os::fd::AsRawFd {}
impl Registrable for Tun {}
impl Registrable for std::net::UdpSocket {}

/// Registers `inner` with the current runtime's reactor.
pub(crate) fn register<T: Registrable>(inner: T) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: a `Tun` and a `UdpSocket` own their descriptor from creation to
    // drop and always return that same one.
    Ok(unsafe { tokio::io::unix::AsyncFd::register(inner) }?)
}

/// Waits up to `timeout` for `fd` to become readable; false on timeout.
pub fn readable(fd: &impl std::os::fd::AsFd, timeout: std::time::Duration) -> io::Result<bool> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(n) => Ok(n > 0),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
