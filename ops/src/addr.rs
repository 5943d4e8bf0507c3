//! Addresses a daemon's own CLI uses to reach the running daemon.

use std::net::SocketAddr;

/// The address to reach a server listening on `listen`: wildcard addresses become loopback.
pub fn local_addr(listen: SocketAddr) -> SocketAddr {
    let mut a = listen;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => [127, 0, 0, 1].into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_become_loopback() {
        let a: SocketAddr = "0.0.0.0:7000".parse().unwrap();
        assert_eq!(local_addr(a), "127.0.0.1:7000".parse().unwrap());
        let a: SocketAddr = "[::]:7000".parse().unwrap();
        assert_eq!(local_addr(a), "[::1]:7000".parse().unwrap());
        let a: SocketAddr = "10.0.0.5:7000".parse().unwrap();
        assert_eq!(local_addr(a), a);
    }
}
