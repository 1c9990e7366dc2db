//! How the agent configures its WireGuard device: through the cross-platform
//! UAPI socket of a userspace device (skein's own, wireguard-go, boringtun), or,
//! for the kernel's device, with `wg set` from wireguard-tools (which speaks the
//! kernel's generic netlink). One [`DeviceUpdate`] drives both.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::uapi::{self, DeviceUpdate};

/// Where a device's configuration goes.
#[derive(Clone, Debug)]
pub enum Control {
    /// A userspace device's UAPI socket.
    Uapi(PathBuf),
    /// A kernel WireGuard interface, by name.
    Kernel(String),
}

/// A configuration change the device did not take.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Through the UAPI socket.
    #[error(transparent)]
    Uapi(#[from] uapi::ClientError),
    /// Through `wg set`.
    #[error("wg set {interface}: {reason}")]
    Kernel {
        /// The interface.
        interface: String,
        /// Why.
        reason: String,
    },
}

impl Control {
    /// Applies `update` (blocking: run it off the async threads).
    pub fn set(&self, update: &DeviceUpdate) -> Result<(), ControlError> {
        match self {
            Control::Uapi(path) => Ok(uapi::set(path, update)?),
            Control::Kernel(interface) => {
                let err = |reason: String| ControlError::Kernel {
                    interface: interface.clone(),
                    reason,
                };
                let (args, stdin) = wg_set_args(interface, update).map_err(err)?;
                run_wg(&args, stdin.as_deref()).map_err(err)
            }
        }
    }
}

/// The arguments of `wg set` for `update`, and what goes on its standard input
/// (the private key: never on a command line, where any user could read it).
pub fn wg_set_args(
    interface: &str,
    update: &DeviceUpdate,
) -> Result<(Vec<String>, Option<String>), String> {
    if update.replace_peers {
        return Err("replacing every peer is not a `wg set` operation".into());
    }
    let mut args = vec!["set".to_owned(), interface.to_owned()];
    let mut stdin = None;
    if let Some(port) = update.listen_port {
        args.extend(["listen-port".into(), port.to_string()]);
    }
    if let Some(mark) = update.fwmark {
        args.extend(["fwmark".into(), mark.to_string()]);
    }
    match &update.private_key {
        Some(Some(key)) => {
            args.extend(["private-key".into(), "/dev/stdin".into()]);
            stdin = Some(format!("{}\n", key.to_base64()));
        }
        // an empty file removes the key
        Some(None) => args.extend(["private-key".into(), "/dev/null".into()]),
        None => {}
    }
    for p in &update.peers {
        if p.update_only || p.preshared_key.is_some() {
            return Err("update-only peers and preshared keys are not supported here".into());
        }
        args.extend(["peer".into(), p.public_key.to_base64()]);
        if p.remove {
            args.push("remove".into());
            continue;
        }
        if let Some(e) = p.endpoint {
            args.extend(["endpoint".into(), e.to_string()]);
        }
        if let Some(k) = p.persistent_keepalive {
            let k = if k == 0 {
                "off".to_owned()
            } else {
                k.to_string()
            };
            args.extend(["persistent-keepalive".into(), k]);
        }
        if p.replace_allowed_ips || !p.allowed_ips.is_empty() {
            // `allowed-ips` replaces the list; `+` entries add to it
            let plus = if p.replace_allowed_ips { "" } else { "+" };
            let list: Vec<String> = p.allowed_ips.iter().map(|a| format!("{plus}{a}")).collect();
            args.extend(["allowed-ips".into(), list.join(",")]);
        }
    }
    Ok((args, stdin))
}

fn run_wg(args: &[String], stdin: Option<&str>) -> Result<(), String> {
    let mut child = Command::new("wg")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running wg (wireguard-tools): {e}"))?;
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin.unwrap_or_default().as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for wg: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::Key;
    use crate::uapi::{PeerUpdate, Prefix};

    #[test]
    fn updates_become_wg_set_arguments_with_the_key_on_stdin() {
        let private = Key::generate();
        let peer = Key::generate().public();
        let gone = Key::generate().public();
        let mut p = PeerUpdate::new(peer);
        p.endpoint = Some("[fd00:99::2]:51820".parse().unwrap());
        p.persistent_keepalive = Some(0);
        p.replace_allowed_ips = true;
        p.allowed_ips = vec![
            "fdaa:0:0:3::/48".parse::<Prefix>().unwrap(),
            "fdaa:0:18:0:3::/80".parse::<Prefix>().unwrap(),
        ];
        let mut r = PeerUpdate::new(gone);
        r.remove = true;
        let u = DeviceUpdate {
            private_key: Some(Some(private)),
            listen_port: Some(51820),
            peers: vec![p, r],
            ..Default::default()
        };
        let (args, stdin) = wg_set_args("skein0", &u).unwrap();
        let pk = peer.to_base64();
        let gk = gone.to_base64();
        let want = format!(
            "set skein0 listen-port 51820 private-key /dev/stdin peer {pk} endpoint \
             [fd00:99::2]:51820 persistent-keepalive off allowed-ips \
             fdaa:0:0:3::/48,fdaa:0:18:0:3::/80 peer {gk} remove"
        );
        assert_eq!(args.join(" "), want);
        assert_eq!(stdin.unwrap().trim(), private.to_base64());
        assert!(!args.join(" ").contains(&private.to_base64()));
        // adding to a peer's list, and what wg set cannot express
        let mut add = PeerUpdate::new(peer);
        add.allowed_ips = vec!["fdaa:0:0:4::/48".parse().unwrap()];
        let u = DeviceUpdate {
            peers: vec![add],
            ..Default::default()
        };
        let (args, stdin) = wg_set_args("skein0", &u).unwrap();
        assert_eq!(args.last().unwrap(), "+fdaa:0:0:4::/48");
        assert!(stdin.is_none());
        let u = DeviceUpdate {
            replace_peers: true,
            ..Default::default()
        };
        assert!(wg_set_args("skein0", &u).is_err());
    }
}
