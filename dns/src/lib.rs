//! The DNS plane: an embedded server that answers Kubernetes Service names
//! (`svc.cluster.local`) and `.internal` machine names from the live catalog,
//! scoped to the asker's organization network, and forwards the rest.
//!
//! Status: the crate is in the workspace so the layout is fixed; the plane lands
//! with its own issue. It will depend on `skein-catalog` only.
