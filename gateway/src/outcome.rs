//! How a connection ended: one `Close { side, reason }` value, the single home of its metric
//! label, its Envoy-style response flag and its termination text (pingora's `ErrorSource` and
//! linkerd's `errno` are the models). Every path that ends a connection, whatever engine runs
//! it, builds one of these; nothing else spells a flag or a termination literal.

use crate::clienthello::Reject;

/// Outcome of reading the first flight, beyond the parser's own rejections (counted per
/// listener in `metrics`; its failures end a connection as `Reason::Hello`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloOutcome {
    SniFound,
    SniMissing,
    Rejected(Reject),
    /// The deadline passed before a whole ClientHello arrived.
    Timeout,
    /// The client closed before a whole ClientHello arrived.
    Eof,
    /// Reading from the client failed (reset).
    ReadError,
}

/// Which party a close is attributed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client (the connection the gateway accepted).
    Downstream,
    /// The upstream endpoint (the connection the gateway opened).
    Upstream,
    /// The gateway's own decision: a timeout or a limit.
    Gateway,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Reading the first flight failed: no whole ClientHello arrived in time, the client left,
    /// or the parser refused it. Only the failure outcomes of `HelloOutcome` occur here.
    Hello(HelloOutcome),
    /// The ClientHello named no route.
    NoRoute,
    /// No endpoint of the route answered; `none_healthy` when every one was held out by
    /// passive health before the first attempt (UH rather than UF).
    Connect { none_healthy: bool },
    /// Refused at accept: the worker is at `limits.max_connections`.
    MaxConnections,
    /// Both directions finished; `side` sent its FIN first.
    Finished,
    /// No byte either way for `timeouts.idle`.
    Idle,
    /// `side` took none of the pending bytes for `timeouts.write_stall`.
    WriteStall,
    /// A reset or IO error on `side`'s socket.
    Error,
}

/// One connection's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    pub side: Side,
    pub reason: Reason,
}

impl Close {
    pub const fn new(side: Side, reason: Reason) -> Close {
        Close { side, reason }
    }

    /// Every `reason` label of `gateway_connections_closed_total` (the closes of relayed
    /// pairs), in the order of the per-destination counter array. Both write-stall sides share
    /// one label; the access log names the side.
    pub const ALL: [&'static str; 5] = [
        "downstream_close",
        "upstream_close",
        "idle_timeout",
        "write_stall",
        "error",
    ];

    /// This close's index in [`Close::ALL`], or `None` for a connection that ended before
    /// relaying (those are counted by the ClientHello, route and connect counters instead).
    pub fn label_index(self) -> Option<usize> {
        let label = self.metric_label()?;
        Close::ALL.iter().position(|known| *known == label)
    }

    /// The `reason` label of `gateway_connections_closed_total`.
    pub fn metric_label(self) -> Option<&'static str> {
        match (self.reason, self.side) {
            (Reason::Finished, Side::Upstream) => Some("upstream_close"),
            (Reason::Finished, _) => Some("downstream_close"),
            (Reason::Idle, _) => Some("idle_timeout"),
            (Reason::WriteStall, _) => Some("write_stall"),
            (Reason::Error, _) => Some("error"),
            (
                Reason::Hello(_)
                | Reason::NoRoute
                | Reason::Connect { .. }
                | Reason::MaxConnections,
                _,
            ) => None,
        }
    }

    /// The access log's `response_flags` (Envoy's letters; `-` for none).
    pub fn flag(self) -> &'static str {
        match (self.reason, self.side) {
            (Reason::Hello(_) | Reason::NoRoute, _) => "NR",
            (Reason::Connect { none_healthy: true }, _) => "UH",
            (
                Reason::Connect {
                    none_healthy: false,
                },
                _,
            ) => "UF",
            (Reason::MaxConnections, _) => "UO",
            (Reason::Finished, Side::Upstream) => "UC",
            (Reason::Finished, _) => "DC",
            (Reason::Idle, _) => "SI",
            // Envoy has no flag for a peer that stops reading (its SI counts silence both
            // ways, its DT/UT are duration limits); HAProxy says sD/cD. "WS", write stall,
            // keeps Envoy's two letters, and the side is in the termination details.
            (Reason::WriteStall, _) => "WS",
            (Reason::Error, _) => "-",
        }
    }

    /// The access log's `connection_termination_details`, also used in debug logs.
    pub fn termination(self) -> &'static str {
        match (self.reason, self.side) {
            (Reason::Hello(outcome), _) => match outcome {
                HelloOutcome::Rejected(reason) => reason.as_str(),
                HelloOutcome::Timeout => "client_hello_timeout",
                HelloOutcome::Eof => "client_hello_eof",
                HelloOutcome::ReadError => "client_hello_read_error",
                HelloOutcome::SniFound | HelloOutcome::SniMissing => "",
            },
            (Reason::NoRoute, _) => "no_route",
            (Reason::Connect { .. }, _) => "upstream_connect_failure",
            (Reason::MaxConnections, _) => "max_connections",
            (Reason::Finished, Side::Upstream) => "upstream_close",
            (Reason::Finished, _) => "downstream_close",
            (Reason::Idle, _) => "idle_timeout",
            (Reason::WriteStall, Side::Upstream) => "upstream_write_stall",
            (Reason::WriteStall, _) => "downstream_write_stall",
            (Reason::Error, _) => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clienthello::Reject;

    #[test]
    fn relayed_closes_answer_their_label_flag_and_termination() {
        let cases = [
            (Side::Downstream, Reason::Finished, "downstream_close", "DC"),
            (Side::Upstream, Reason::Finished, "upstream_close", "UC"),
            (Side::Gateway, Reason::Idle, "idle_timeout", "SI"),
            (Side::Upstream, Reason::WriteStall, "write_stall", "WS"),
            (Side::Downstream, Reason::WriteStall, "write_stall", "WS"),
            (Side::Upstream, Reason::Error, "error", "-"),
        ];
        for (side, reason, label, flag) in cases {
            let close = Close::new(side, reason);
            assert_eq!(close.metric_label(), Some(label), "{close:?}");
            assert_eq!(close.flag(), flag, "{close:?}");
            let index = close.label_index().expect("a relayed close has a counter");
            assert_eq!(Close::ALL[index], label);
        }
        assert_eq!(
            Close::new(Side::Upstream, Reason::WriteStall).termination(),
            "upstream_write_stall"
        );
        assert_eq!(
            Close::new(Side::Downstream, Reason::WriteStall).termination(),
            "downstream_write_stall"
        );
    }

    #[test]
    fn closes_before_relaying_have_flags_but_no_pair_counter() {
        let cases = [
            (
                Close::new(
                    Side::Downstream,
                    Reason::Hello(HelloOutcome::Rejected(Reject::NotTls)),
                ),
                "NR",
                Reject::NotTls.as_str(),
            ),
            (
                Close::new(Side::Downstream, Reason::Hello(HelloOutcome::Timeout)),
                "NR",
                "client_hello_timeout",
            ),
            (
                Close::new(Side::Downstream, Reason::NoRoute),
                "NR",
                "no_route",
            ),
            (
                Close::new(Side::Upstream, Reason::Connect { none_healthy: true }),
                "UH",
                "upstream_connect_failure",
            ),
            (
                Close::new(
                    Side::Upstream,
                    Reason::Connect {
                        none_healthy: false,
                    },
                ),
                "UF",
                "upstream_connect_failure",
            ),
            (
                Close::new(Side::Gateway, Reason::MaxConnections),
                "UO",
                "max_connections",
            ),
        ];
        for (close, flag, termination) in cases {
            assert_eq!(close.flag(), flag, "{close:?}");
            assert_eq!(close.termination(), termination, "{close:?}");
            assert_eq!(close.label_index(), None, "{close:?}");
        }
    }

    #[test]
    fn every_label_is_reachable() {
        let reachable: Vec<&str> = [
            Close::new(Side::Downstream, Reason::Finished),
            Close::new(Side::Upstream, Reason::Finished),
            Close::new(Side::Gateway, Reason::Idle),
            Close::new(Side::Upstream, Reason::WriteStall),
            Close::new(Side::Downstream, Reason::Error),
        ]
        .iter()
        .filter_map(|close| close.metric_label())
        .collect();
        assert_eq!(reachable, Close::ALL);
    }
}
