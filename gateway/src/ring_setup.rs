//! How a worker's io_uring is set up, for both engines: the readiness engine builds its monoio
//! runtime with it (`worker`), the completion engine its own ring (`uring`).

/// How the worker's io_uring is set up. The default flags keep completions raised by another
/// CPU (the loopback softirq of a peer) from interrupting the worker: without them every poll
/// completion sends an inter-processor interrupt to run task work at once (perf/RESULTS.md,
/// issue 9: "Ring setup").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingSetup {
    /// `SINGLE_ISSUER|DEFER_TASKRUN` (Linux 6.1+): completions are only run when the worker
    /// itself waits on the ring, never by interrupt. Valid because a worker's ring is created,
    /// submitted to and dropped on the worker's own thread only.
    Defer,
    /// `COOP_TASKRUN|TASKRUN_FLAG` (Linux 5.19+): completion work waits for the worker's next
    /// transition into the kernel instead of interrupting it.
    Coop,
    /// No setup flags: what monoio does by default, and every io_uring kernel accepts.
    Plain,
}

impl RingSetup {
    /// The setups to try, best first. `GATEWAY_RING_SETUP=defer|coop|plain` starts the list
    /// elsewhere, for measurement and for the syscall regression guard (scripts/syscall-guard).
    pub(crate) fn preference() -> &'static [RingSetup] {
        const ALL: [RingSetup; 3] = [RingSetup::Defer, RingSetup::Coop, RingSetup::Plain];
        match std::env::var("GATEWAY_RING_SETUP").as_deref() {
            Ok("coop") => &ALL[1..],
            Ok("plain") => &ALL[2..],
            _ => &ALL,
        }
    }

    pub(crate) fn uring_builder(self) -> io_uring::Builder {
        let mut builder = io_uring::IoUring::builder();
        match self {
            RingSetup::Defer => {
                builder.setup_single_issuer().setup_defer_taskrun();
            }
            RingSetup::Coop => {
                builder.setup_coop_taskrun().setup_taskrun_flag();
            }
            RingSetup::Plain => {}
        }
        builder
    }

    /// The name used in logs and in `GATEWAY_RING_SETUP`.
    pub fn name(self) -> &'static str {
        match self {
            RingSetup::Defer => "defer",
            RingSetup::Coop => "coop",
            RingSetup::Plain => "plain",
        }
    }
}
