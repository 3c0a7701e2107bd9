//! The registry of open connections: who may start a handshake, which connection is shed when
//! the broker is full, and which established connections a TLS reload must close.
//!
//! A connection is *pending* from `accept()` until its TLS handshake and HTTP/2 preface are
//! done, then *established* until it closes. The accept loop never waits on this registry: it
//! accepts first and then asks [`Connections::admit`], which answers at once:
//!
//! 1. A source address with [`ConnectionLimits::max_handshakes_per_source`] pending connections
//!    gets no more: the new one is closed at once. One address cannot fill the broker with idle
//!    or slow sockets.
//! 2. At [`ConnectionLimits::max_connections`] in all, the oldest pending connection is shed
//!    (its task is cancelled) to make room; only when none is pending is the newcomer refused.
//!    An authenticated connection is never shed for an unauthenticated one.
//!
//! Established connections keep their client certificate chain and a cancellation token, so a
//! reload can check them against the new verifier and close those it now refuses
//! ([`Connections::close_refused`]).

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
};

use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio_util::sync::CancellationToken;

use crate::config::ConnectionLimits;

/// Why a new connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refused {
    /// Its source address already has the most handshakes in progress it may have.
    PerSourceCap,
    /// The broker holds the most connections it may, all of them established.
    Full,
}

impl Refused {
    /// A short label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::PerSourceCap => "per_source_cap",
            Refused::Full => "full",
        }
    }
}

/// The open connections, shared by the accept loop, the connections' own tasks and streams,
/// and the reloader.
pub struct Connections {
    limits: ConnectionLimits,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// Pending connections by id: the smallest id is the oldest.
    pending: BTreeMap<u64, PendingEntry>,
    /// Pending connections per source address.
    per_source: HashMap<IpAddr, usize>,
    established: HashMap<u64, EstablishedEntry>,
}

struct PendingEntry {
    source: IpAddr,
    cancel: CancellationToken,
}

struct EstablishedEntry {
    peer: SocketAddr,
    common_name: Option<String>,
    chain: Vec<CertificateDer<'static>>,
    cancel: CancellationToken,
}

/// How many connections are open, as [`Connections::counts`] reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// In their handshake.
    pub pending: usize,
    /// Established.
    pub established: usize,
}

/// What a reload's check of the established connections found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedConnection {
    /// The peer's address.
    pub peer: SocketAddr,
    /// The Common Name of its certificate.
    pub common_name: Option<String>,
    /// Why the new material refuses it.
    pub reason: String,
}

impl Connections {
    /// An empty registry with these limits.
    pub fn new(limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(Connections {
            limits,
            state: Mutex::new(State::default()),
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held leaves counts that are still consistent enough to
        // go on with: each operation below leaves the maps valid at every step.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides at once whether a connection just accepted from `source` may start its
    /// handshake. Returns its registration, and whether an older pending connection was shed
    /// to make room for it.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<(Pending, bool), Refused> {
        let source = source_key(source);
        let mut state = self.state();
        if state.per_source.get(&source).copied().unwrap_or(0)
            >= self.limits.max_handshakes_per_source
        {
            return Err(Refused::PerSourceCap);
        }
        let mut shed = false;
        if state.pending.len() + state.established.len() >= self.limits.max_connections {
            let Some((_, oldest)) = state.pending.pop_first() else {
                return Err(Refused::Full);
            };
            state.release_source(oldest.source);
            oldest.cancel.cancel();
            shed = true;
        }
        let id = state.next_id;
        state.next_id += 1;
        let cancel = CancellationToken::new();
        state.pending.insert(
            id,
            PendingEntry {
                source,
                cancel: cancel.clone(),
            },
        );
        *state.per_source.entry(source).or_insert(0) += 1;
        Ok((
            Pending {
                id,
                cancel,
                connections: self.clone(),
            },
            shed,
        ))
    }

    /// How many connections are pending and established.
    pub fn counts(&self) -> Counts {
        let state = self.state();
        Counts {
            pending: state.pending.len(),
            established: state.established.len(),
        }
    }

    /// How many established connections each certificate Common Name holds (an agency's or
    /// auditor's id), for the status view.
    pub fn established_by_name(&self) -> BTreeMap<String, usize> {
        let state = self.state();
        let mut out = BTreeMap::new();
        for name in state
            .established
            .values()
            .filter_map(|e| e.common_name.clone())
        {
            *out.entry(name).or_insert(0) += 1;
        }
        out
    }

    /// Checks every established connection's certificate chain with `verifier` (the one a
    /// reload has just built) and closes those it refuses. Returns what was closed.
    pub fn close_refused(&self, verifier: &dyn ClientCertVerifier) -> Vec<ClosedConnection> {
        let now = UnixTime::now();
        let state = self.state();
        let mut closed = Vec::new();
        for entry in state.established.values() {
            let verdict = match entry.chain.split_first() {
                Some((leaf, intermediates)) => verifier
                    .verify_client_cert(leaf, intermediates, now)
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                None => Err("no client certificate".to_owned()),
            };
            if let Err(reason) = verdict {
                entry.cancel.cancel();
                closed.push(ClosedConnection {
                    peer: entry.peer,
                    common_name: entry.common_name.clone(),
                    reason,
                });
            }
        }
        closed
    }
}

/// The address a source is counted under: an IPv4 address as itself (also when it arrives
/// IPv4-mapped on an IPv6 socket), an IPv6 address by its /64 prefix, which is what one host
/// or one customer usually gets.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

impl State {
    fn release_source(&mut self, source: IpAddr) {
        if let Some(n) = self.per_source.get_mut(&source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
    }
}

/// A connection in its handshake. Dropping it releases its place; a connection shed to make
/// room sees [`Pending::cancelled`] fire.
pub struct Pending {
    id: u64,
    cancel: CancellationToken,
    connections: Arc<Connections>,
}

impl Pending {
    /// Completes when this connection has been shed.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// Moves the connection to the established ones, with the peer's certificate chain (leaf
    /// first). Returns `None` if it was shed in the meantime.
    pub fn establish(
        self,
        peer: SocketAddr,
        common_name: Option<String>,
        chain: Vec<CertificateDer<'static>>,
    ) -> Option<Established> {
        let cancel = CancellationToken::new();
        {
            let mut state = self.connections.state();
            let entry = state.pending.remove(&self.id)?;
            state.release_source(entry.source);
            state.established.insert(
                self.id,
                EstablishedEntry {
                    peer,
                    common_name,
                    chain,
                    cancel: cancel.clone(),
                },
            );
        } // The lock is released before `self` drops (its `Drop` takes it, and finds no entry).
        Some(Established {
            id: self.id,
            cancel,
            connections: self.connections.clone(),
        })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut state = self.connections.state();
        if let Some(entry) = state.pending.remove(&self.id) {
            state.release_source(entry.source);
        }
    }
}

/// An established connection's place in the registry, held by its stream: dropping it (the
/// connection closed) removes the entry.
pub struct Established {
    id: u64,
    cancel: CancellationToken,
    connections: Arc<Connections>,
}

impl Established {
    /// The token a reload cancels to close this connection.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

impl Drop for Established {
    fn drop(&mut self) {
        self.connections.state().established.remove(&self.id);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn limits(per_source: usize, total: usize) -> ConnectionLimits {
        ConnectionLimits {
            max_handshakes_per_source: per_source,
            max_connections: total,
            ..ConnectionLimits::default()
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    fn peer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1))
    }

    #[test]
    fn one_source_gets_only_its_share_of_handshakes() {
        let c = Connections::new(limits(2, 100));
        let a = c.admit(ip(2)).unwrap();
        let _b = c.admit(ip(2)).unwrap();
        assert_eq!(c.admit(ip(2)).err(), Some(Refused::PerSourceCap));
        // Another address is unaffected.
        assert!(c.admit(ip(1)).is_ok());
        // A finished handshake frees its source's place.
        let _est = a.0.establish(peer(), None, Vec::new()).unwrap();
        assert!(c.admit(ip(2)).is_ok());
    }

    #[test]
    fn a_full_broker_sheds_the_oldest_pending_connection_first() {
        let c = Connections::new(limits(10, 3));
        let (oldest, _) = c.admit(ip(2)).unwrap();
        let (second, _) = c.admit(ip(2)).unwrap();
        let (third, _) = c.admit(ip(3)).unwrap();
        let _est = third.establish(peer(), None, Vec::new()).unwrap();
        let (_newcomer, shed) = c.admit(ip(1)).unwrap();
        assert!(shed);
        assert!(oldest.cancel.is_cancelled());
        assert!(!second.cancel.is_cancelled());
        assert_eq!(
            c.counts(),
            Counts {
                pending: 2,
                established: 1
            }
        );
        // A shed connection cannot establish itself afterwards.
        assert!(oldest.establish(peer(), None, Vec::new()).is_none());
    }

    #[test]
    fn established_connections_are_never_shed() {
        let c = Connections::new(limits(10, 2));
        let held: Vec<_> = (0..2)
            .map(|_| {
                let (p, _) = c.admit(ip(1)).unwrap();
                p.establish(peer(), None, Vec::new()).unwrap()
            })
            .collect();
        assert_eq!(c.admit(ip(2)).err(), Some(Refused::Full));
        assert!(held.iter().all(|e| !e.cancel.is_cancelled()));
        drop(held);
        assert!(c.admit(ip(2)).is_ok());
    }

    #[test]
    fn sources_are_counted_by_ipv4_address_and_ipv6_prefix() {
        let cases: &[(&str, &str, bool)] = &[
            ("127.0.0.2", "127.0.0.2", true),
            ("127.0.0.2", "127.0.0.3", false),
            ("127.0.0.2", "::ffff:127.0.0.2", true),
            ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", true),
            ("2001:db8:1:2::1", "2001:db8:1:3::1", false),
        ];
        for (a, b, same) in cases {
            let (a, b): (IpAddr, IpAddr) = (a.parse().unwrap(), b.parse().unwrap());
            assert_eq!(source_key(a) == source_key(b), *same, "{a} vs {b}");
            // And the cap sees it the same way.
            let c = Connections::new(limits(1, 10));
            let _first = c.admit(a).unwrap();
            assert_eq!(c.admit(b).is_err(), *same, "{a} then {b}");
        }
    }

    #[test]
    fn established_connections_are_counted_by_name() {
        let c = Connections::new(limits(10, 10));
        let mut held = Vec::new();
        for name in [Some("ico"), Some("ico"), Some("nca"), None] {
            let (p, _) = c.admit(ip(1)).unwrap();
            held.push(
                p.establish(peer(), name.map(str::to_owned), Vec::new())
                    .unwrap(),
            );
        }
        // One still in its handshake is not connected yet.
        let _pending = c.admit(ip(2)).unwrap();
        let want = BTreeMap::from([("ico".to_owned(), 2), ("nca".to_owned(), 1)]);
        assert_eq!(c.established_by_name(), want);
        held.remove(0);
        assert_eq!(c.established_by_name().get("ico"), Some(&1));
    }

    #[test]
    fn dropping_releases_every_count() {
        let c = Connections::new(limits(1, 10));
        for _ in 0..3 {
            let p = c.admit(ip(2)).unwrap();
            drop(p);
        }
        let (p, _) = c.admit(ip(2)).unwrap();
        let e = p.establish(peer(), None, Vec::new()).unwrap();
        drop(e);
        assert_eq!(
            c.counts(),
            Counts {
                pending: 0,
                established: 0
            }
        );
    }
}
