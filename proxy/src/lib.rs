//! The edge proxy plane: TLS termination with certificates chosen by SNI from the
//! live catalog, apps found by SNI/Host, each request or connection sent to the
//! closest healthy machine with spare capacity. HTTP/1.1, h2, h2c, websockets, raw
//! TCP, PROXY protocol, retries and replays.
//!
//! Status: the crate is in the workspace so the layout is fixed; the plane lands
//! with its own issue. It will depend on `skein-catalog` only.
