//! The few rtnetlink operations the mesh needs (links, addresses, routes), made
//! idempotent: adding what exists and removing what is gone both succeed, so a
//! reconcile can always be repeated.

use std::net::{IpAddr, Ipv6Addr};

use futures::TryStreamExt as _;
use rtnetlink::packet_route::route::{RouteMessage, RouteProtocol, RouteScope, RouteType};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// A netlink failure with the operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("netlink {what}: {source}")]
pub struct NetlinkError {
    what: String,
    source: rtnetlink::Error,
}

type Result<T> = std::result::Result<T, NetlinkError>;

fn errno(e: &rtnetlink::Error) -> i32 {
    match e {
        rtnetlink::Error::NetlinkError(m) => -m.raw_code(),
        _ => 0,
    }
}

/// A connection to the kernel's routing netlink in the caller's network namespace.
#[derive(Clone, Debug)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens the socket and spawns its driver on the current tokio runtime.
    pub fn connect() -> std::io::Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// The index of interface `name`, if it exists.
    pub async fn index(&self, name: &str) -> Result<Option<u32>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(l) => Ok(l.map(|l| l.header.index)),
            Err(e) if errno(&e) == libc::ENODEV => Ok(None),
            Err(source) => Err(NetlinkError {
                what: format!("get link {name}"),
                source,
            }),
        }
    }

    /// Creates a kernel WireGuard interface `name`. Fails (EOPNOTSUPP, or
    /// "unknown device type") on a kernel without WireGuard: see
    /// [`Netlink::kernel_wireguard`].
    pub async fn add_wireguard(&self, name: &str) -> Result<()> {
        match self
            .handle
            .link()
            .add(rtnetlink::LinkWireguard::new(name).build())
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == libc::EEXIST => Ok(()),
            Err(source) => Err(NetlinkError {
                what: format!("add wireguard link {name}"),
                source,
            }),
        }
    }

    /// Deletes interface `name` if it exists.
    pub async fn del_link(&self, name: &str) -> Result<()> {
        let Some(index) = self.index(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == libc::ENODEV => Ok(()),
            Err(source) => Err(NetlinkError {
                what: format!("delete link {name}"),
                source,
            }),
        }
    }

    /// True if this kernel can make WireGuard interfaces: a probe interface is
    /// created and deleted at once.
    pub async fn kernel_wireguard(&self, probe: &str) -> bool {
        if self.add_wireguard(probe).await.is_err() {
            return false;
        }
        let _ = self.del_link(probe).await;
        true
    }

    /// Brings the link up (setting its MTU if given).
    pub async fn up(&self, index: u32, mtu: Option<u32>) -> Result<()> {
        let mut b = LinkUnspec::new_with_index(index).up();
        if let Some(m) = mtu {
            b = b.mtu(m);
        }
        self.handle
            .link()
            .set(b.build())
            .execute()
            .await
            .map_err(|source| NetlinkError {
                what: format!("set link {index} up"),
                source,
            })
    }

    /// Adds an address (no DAD: 6PN addresses are unique by construction).
    pub async fn add_address(&self, index: u32, addr: Ipv6Addr, len: u8) -> Result<()> {
        let mut req = self.handle.address().add(index, addr.into(), len);
        // IFA_F_NODAD
        req.message_mut().header.flags |=
            rtnetlink::packet_route::address::AddressHeaderFlags::Nodad;
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == libc::EEXIST => Ok(()),
            Err(source) => Err(NetlinkError {
                what: format!("add address {addr}/{len}"),
                source,
            }),
        }
    }

    /// Removes `addr` from interface `index`; an address already gone is fine.
    pub async fn del_address(&self, index: u32, addr: Ipv6Addr) -> Result<()> {
        let mut found = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(addr.into())
            .execute();
        loop {
            match found.try_next().await {
                Ok(Some(msg)) => match self.handle.address().del(msg).execute().await {
                    Ok(()) => {}
                    Err(e) if matches!(errno(&e), libc::EADDRNOTAVAIL | libc::ENODEV) => {}
                    Err(source) => {
                        return Err(NetlinkError {
                            what: format!("delete address {addr}"),
                            source,
                        });
                    }
                },
                Ok(None) => return Ok(()),
                Err(e) if errno(&e) == libc::ENODEV => return Ok(()),
                Err(source) => {
                    return Err(NetlinkError {
                        what: format!("get address {addr}"),
                        source,
                    });
                }
            }
        }
    }

    /// Routes `dst/len` to interface `index` (replacing a route to the same
    /// prefix), with `src` as the preferred source of what the host sends there.
    pub async fn add_route(
        &self,
        dst: Ipv6Addr,
        len: u8,
        index: u32,
        src: Option<Ipv6Addr>,
    ) -> Result<()> {
        let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(dst, len)
            .output_interface(index);
        if let Some(src) = src {
            b = b.pref_source(src);
        }
        self.add(b.build(), || format!("add route {dst}/{len}"))
            .await
    }

    /// Removes the route `dst/len` via `index`; a route already gone is fine.
    pub async fn del_route(&self, dst: Ipv6Addr, len: u8, index: u32) -> Result<()> {
        let msg = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(dst, len)
            .output_interface(index)
            .build();
        self.del(msg, || format!("delete route {dst}/{len}")).await
    }

    /// Takes every address of `dst/len` in as this host's own (a `local`
    /// route on `index`, usually `lo`: AnyIP), so connections to any of them
    /// are delivered here (to whatever listens, or to eBPF steering).
    pub async fn add_local_route(&self, dst: IpAddr, len: u8, index: u32) -> Result<()> {
        let msg = table_route(dst, len, index, TABLE_LOCAL, RouteType::Local);
        self.add(msg, || format!("add local route {dst}/{len}"))
            .await
    }

    /// Removes what [`Netlink::add_local_route`] added; already gone is fine.
    pub async fn del_local_route(&self, dst: IpAddr, len: u8, index: u32) -> Result<()> {
        let msg = table_route(dst, len, index, TABLE_LOCAL, RouteType::Local);
        self.del(msg, || format!("delete local route {dst}/{len}"))
            .await
    }

    /// Puts the route `dst/len` to interface `index` in routing table `table`
    /// (protocol `static`, so a routing daemon learns it as another's).
    pub async fn add_table_route(
        &self,
        dst: IpAddr,
        len: u8,
        index: u32,
        table: u32,
    ) -> Result<()> {
        let msg = table_route(dst, len, index, table, RouteType::Unicast);
        self.add(msg, || format!("add route {dst}/{len} table {table}"))
            .await
    }

    /// Removes what [`Netlink::add_table_route`] added; already gone is fine.
    pub async fn del_table_route(
        &self,
        dst: IpAddr,
        len: u8,
        index: u32,
        table: u32,
    ) -> Result<()> {
        let msg = table_route(dst, len, index, table, RouteType::Unicast);
        self.del(msg, || format!("delete route {dst}/{len} table {table}"))
            .await
    }

    /// Adds (or replaces) a route.
    async fn add(&self, msg: RouteMessage, what: impl FnOnce() -> String) -> Result<()> {
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|source| NetlinkError {
                what: what(),
                source,
            })
    }

    /// Deletes a route; one already gone (or its device) is fine.
    async fn del(&self, msg: RouteMessage, what: impl FnOnce() -> String) -> Result<()> {
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), libc::ESRCH | libc::ENOENT | libc::ENODEV) => Ok(()),
            Err(source) => Err(NetlinkError {
                what: what(),
                source,
            }),
        }
    }
}

/// The kernel's `local` routing table.
const TABLE_LOCAL: u32 = 255;

fn table_route(dst: IpAddr, len: u8, index: u32, table: u32, kind: RouteType) -> RouteMessage {
    let scope = match kind {
        RouteType::Local => RouteScope::Host,
        _ => RouteScope::Link,
    };
    // `static`: a routing daemon (BIRD's `learn`) takes it as set by another.
    let protocol = RouteProtocol::Static;
    match dst {
        IpAddr::V4(a) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
            .destination_prefix(a, len)
            .output_interface(index)
            .table_id(table)
            .kind(kind)
            .scope(scope)
            .protocol(protocol)
            .build(),
        IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(a, len)
            .output_interface(index)
            .table_id(table)
            .kind(kind)
            .scope(scope)
            .protocol(protocol)
            .build(),
    }
}
