//! Persistent connections for the request/response and idle modes: each session connects,
//! sends the ClientHello and then exchanges echo round trips of a fixed size.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::client::{self, Outcome, Progress};
use crate::pattern;
use crate::sys::Timer;

const TIMER: Token = Token(usize::MAX);
/// Connects in flight at once while opening many sessions, so the listen backlog of the proxy
/// under test (HAProxy and nginx default to 511–1024) does not overflow into SYN retries.
const CONNECTS_IN_FLIGHT: usize = 256;

enum State {
    Connecting,
    Idle,
    Busy { intended: Instant },
    Failed,
}

struct Session {
    stream: TcpStream,
    state: State,
    hello_sent: usize,
    /// Pattern offsets: bytes of requests written and of echoes read.
    sent: u64,
    received: u64,
    /// Where the current round trip ends, in received-offset terms.
    target: u64,
}

/// A set of sessions on one poll.
pub struct Sessions {
    poll: Poll,
    events: Events,
    timer: Timer,
    sessions: Vec<Session>,
    hello: Arc<Vec<u8>>,
    request: usize,
    scratch: Vec<u8>,
    pub outcome: Outcome,
}

/// What one call to [`Sessions::step`] saw complete.
struct Completed {
    index: usize,
    intended: Instant,
    latency: Duration,
}

impl Sessions {
    pub fn new(hello: Arc<Vec<u8>>, request: usize) -> anyhow::Result<Sessions> {
        let poll = Poll::new()?;
        let timer = Timer::new()?;
        poll.registry()
            .register(&mut SourceFd(&timer.raw_fd()), TIMER, Interest::READABLE)?;
        Ok(Sessions {
            poll,
            events: Events::with_capacity(1024),
            timer,
            sessions: Vec::new(),
            hello,
            request: request.max(1),
            scratch: vec![0; request.clamp(1, 256 * 1024)],
            outcome: Outcome::new(),
        })
    }

    /// Opens `count` sessions and completes one round trip on each, so that every one is really
    /// established end to end (a proxy connects upstream only after the hello). Failures are
    /// counted and dropped. Returns how many sessions are established.
    pub fn open(
        &mut self,
        target: SocketAddr,
        count: usize,
        timeout: Duration,
        progress: &Progress,
    ) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        let mut opened = 0;
        let mut pending = 0usize;
        while opened < count || pending > 0 {
            while opened < count && pending < CONNECTS_IN_FLIGHT {
                opened += 1;
                match client::connect(target) {
                    Ok(mut stream) => {
                        let index = self.sessions.len();
                        self.poll.registry().register(
                            &mut stream,
                            Token(index),
                            Interest::READABLE | Interest::WRITABLE,
                        )?;
                        let mut session = Session {
                            stream,
                            state: State::Connecting,
                            hello_sent: 0,
                            sent: 0,
                            received: 0,
                            target: 0,
                        };
                        // Stagger pattern offsets so sessions do not all send the same bytes.
                        session.sent = index as u64 * 7919;
                        session.received = session.sent;
                        self.sessions.push(session);
                        pending += 1;
                    }
                    Err(e) => self
                        .outcome
                        .error(client::error_name("connect", &e), progress),
                }
            }
            if Instant::now() > deadline {
                break;
            }
            self.step(Some(Duration::from_millis(50)), progress)?;
            let failed_now = self
                .sessions
                .iter()
                .filter(|s| matches!(s.state, State::Failed))
                .count();
            let established = self
                .sessions
                .iter()
                .filter(|s| matches!(s.state, State::Idle))
                .count();
            pending = self.sessions.len() - failed_now - established;
            progress
                .operations
                .store(established as u64, Ordering::Relaxed);
        }
        for session in &self.sessions {
            if !matches!(session.state, State::Idle | State::Failed) {
                self.outcome
                    .errors
                    .entry("open_timeout".to_owned())
                    .and_modify(|c| *c += 1)
                    .or_insert(1);
            }
        }
        self.retain_idle();
        Ok(self.sessions.len())
    }

    /// Drops sessions that are not idle and renumbers the rest.
    fn retain_idle(&mut self) {
        let sessions = std::mem::take(&mut self.sessions);
        for mut session in sessions {
            if matches!(session.state, State::Idle) {
                let index = self.sessions.len();
                if self
                    .poll
                    .registry()
                    .reregister(
                        &mut session.stream,
                        Token(index),
                        Interest::READABLE | Interest::WRITABLE,
                    )
                    .is_ok()
                {
                    self.sessions.push(session);
                    continue;
                }
            }
            client::close_with_reset(session.stream);
        }
    }

    /// Starts a round trip on an idle session.
    fn begin(&mut self, index: usize, intended: Instant) -> Option<Completed> {
        let session = &mut self.sessions[index];
        session.target = session.received + self.request as u64;
        session.state = State::Busy { intended };
        self.advance(index)
    }

    /// Waits for events once and drives the sessions they name.
    /// Returns the round trips completed and how many busy sessions failed.
    fn step(
        &mut self,
        wait: Option<Duration>,
        progress: &Progress,
    ) -> anyhow::Result<(Vec<Completed>, usize)> {
        match self.poll.poll(&mut self.events, wait) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok((Vec::new(), 0)),
            Err(e) => return Err(e.into()),
        }
        let tokens: Vec<usize> = self.events.iter().map(|e| e.token().0).collect();
        let mut completed = Vec::new();
        let mut failed = 0;
        for token in tokens {
            if token == TIMER.0 {
                self.timer.clear();
                continue;
            }
            if token >= self.sessions.len() {
                continue;
            }
            match self.try_advance(token) {
                Ok(Some(done)) => completed.push(done),
                Ok(None) => {}
                Err(name) => {
                    if matches!(self.sessions[token].state, State::Busy { .. }) {
                        failed += 1;
                    }
                    self.sessions[token].state = State::Failed;
                    self.outcome.error(name, progress);
                }
            }
        }
        Ok((completed, failed))
    }

    fn advance(&mut self, index: usize) -> Option<Completed> {
        // Errors surface again at the next event for this session.
        self.try_advance(index).ok().flatten()
    }

    fn try_advance(&mut self, index: usize) -> Result<Option<Completed>, String> {
        let request = self.request;
        let session = &mut self.sessions[index];
        match session.state {
            State::Failed | State::Idle => return Ok(None),
            State::Connecting => match client::connect_finished(&session.stream) {
                Ok(true) => {
                    session.target = session.received + request as u64;
                    session.state = State::Busy {
                        intended: Instant::now(),
                    };
                }
                Ok(false) => return Ok(None),
                Err(e) => return Err(client::error_name("connect", &e)),
            },
            State::Busy { .. } => {}
        }
        let State::Busy { intended } = session.state else {
            return Ok(None);
        };
        while session.hello_sent < self.hello.len() {
            match session.stream.write(&self.hello[session.hello_sent..]) {
                Ok(written) => session.hello_sent += written,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(client::error_name("write", &e)),
            }
        }
        // The request of this round trip covers pattern offsets [target - request, target).
        while session.sent < session.target {
            let length = usize::try_from(session.target - session.sent).unwrap_or(usize::MAX);
            match session.stream.write(pattern::slice(session.sent, length)) {
                Ok(written) => {
                    session.sent += written as u64;
                    self.outcome.bytes_sent += written as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(client::error_name("write", &e)),
            }
        }
        while session.received < session.target {
            let want = usize::try_from(session.target - session.received)
                .unwrap_or(usize::MAX)
                .min(self.scratch.len());
            match session.stream.read(&mut self.scratch[..want]) {
                Ok(0) => return Err("read_eof".to_owned()),
                Ok(read) => {
                    if !pattern::matches(session.received, &self.scratch[..read]) {
                        return Err("verify_mismatch".to_owned());
                    }
                    session.received += read as u64;
                    self.outcome.bytes_received += read as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(client::error_name("read", &e)),
            }
        }
        session.state = State::Idle;
        Ok(Some(Completed {
            index,
            intended,
            latency: intended.elapsed(),
        }))
    }

    /// Round trips on every session for `duration` after `warmup`: back to back (closed loop)
    /// or at `rate` per second over all sessions (open loop, latency from the intended start).
    pub fn request_response(
        &mut self,
        rate: Option<f64>,
        warmup: Duration,
        duration: Duration,
        timeout: Duration,
        progress: &Progress,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        let measure_from = start + warmup;
        let stop_at = measure_from + duration;
        let mut idle: VecDeque<usize> = (0..self.sessions.len()).collect();
        let mut scheduled: u64 = 0;
        let mut busy = 0usize;
        loop {
            let now = Instant::now();
            let mut wait = Duration::from_millis(100).min(stop_at.saturating_duration_since(now));
            if now < stop_at {
                while let Some(&index) = idle.front() {
                    let intended = match rate {
                        Some(rate) => start + Duration::from_secs_f64(scheduled as f64 / rate),
                        None => now,
                    };
                    if intended >= stop_at {
                        break;
                    }
                    if intended > now {
                        self.timer.arm_after(intended - now)?;
                        break;
                    }
                    idle.pop_front();
                    scheduled += 1;
                    busy += 1;
                    if let Some(done) = self.begin(index, intended) {
                        self.finish(done, measure_from, progress);
                        idle.push_back(index);
                        busy -= 1;
                    }
                }
                if self.sessions.is_empty() {
                    break;
                }
            } else if busy == 0 || now > stop_at + timeout {
                break;
            } else {
                wait = Duration::from_millis(10);
            }
            let (completed, failed) = self.step(Some(wait), progress)?;
            for done in completed {
                let index = done.index;
                self.finish(done, measure_from, progress);
                idle.push_back(index);
                busy -= 1;
            }
            // Failed sessions are no longer busy; they are never rescheduled.
            busy -= failed;
            if busy == 0 && idle.is_empty() {
                break;
            }
        }
        let busy_at_end = self
            .sessions
            .iter()
            .filter(|s| matches!(s.state, State::Busy { .. }))
            .count();
        if busy_at_end > 0 {
            *self
                .outcome
                .errors
                .entry("response_timeout".to_owned())
                .or_default() += busy_at_end as u64;
        }
        self.outcome.window = stop_at
            .min(Instant::now())
            .saturating_duration_since(measure_from);
        Ok(())
    }

    fn finish(&mut self, done: Completed, measure_from: Instant, progress: &Progress) {
        if done.intended >= measure_from {
            self.outcome.operations += 1;
            client::record(&mut self.outcome.latency, done.latency);
            progress.operations.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One more round trip on every `step`-th session; counts the successes.
    pub fn check_sample(
        &mut self,
        sample: usize,
        timeout: Duration,
        progress: &Progress,
    ) -> anyhow::Result<usize> {
        if self.sessions.is_empty() || sample == 0 {
            return Ok(0);
        }
        let stride = (self.sessions.len() / sample.min(self.sessions.len())).max(1);
        let chosen: Vec<usize> = (0..self.sessions.len())
            .step_by(stride)
            .take(sample)
            .collect();
        let mut outstanding = 0usize;
        let mut ok = 0usize;
        for &index in &chosen {
            match self.begin(index, Instant::now()) {
                Some(_) => ok += 1,
                None => outstanding += 1,
            }
        }
        let deadline = Instant::now() + timeout;
        while outstanding > 0 && Instant::now() < deadline {
            let (completed, _) = self.step(Some(Duration::from_millis(20)), progress)?;
            ok += completed.len();
            outstanding = chosen
                .iter()
                .filter(|&&i| matches!(self.sessions[i].state, State::Busy { .. }))
                .count();
        }
        Ok(ok)
    }

    /// Closes every session with RST.
    pub fn close_all(&mut self) {
        for session in self.sessions.drain(..) {
            client::close_with_reset(session.stream);
        }
    }
}
