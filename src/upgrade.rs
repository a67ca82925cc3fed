//! Binary upgrade without refusing a connection (SIGUSR2, as nginx's), and systemd's
//! readiness protocol.
//!
//! On SIGUSR2 the running rampart starts the binary again from the path it was started
//! from (so a new version installed there), with the same arguments, and hands it its
//! listening sockets as inherited descriptors (`RAMPART_LISTEN_FDS`). The new process
//! loads its config, serves on those very sockets, and says so through a pipe
//! (`RAMPART_UPGRADE_READY_FD`); only then does the old one stop accepting and drain,
//! as on SIGTERM. The sockets never close, so no connection is refused or reset, not
//! even one waiting in an accept queue. A new process that fails (a bad config, a
//! binary that does not start) exits, and the old one goes on serving.
//!
//! With the sockets go the backends' verdicts (health, the checks passed or failed in
//! a row, ejections: `state::Handed`), in a memory file (`RAMPART_UPGRADE_STATE_FD`),
//! so that a backend down before the upgrade gets no traffic after it.
//!
//! This module owns the inventory of listening sockets the handover passes
//! (`Inventory`, a duplicate of every worker's socket, kept in step with reloads), the
//! new process's side (`Inherited`), and `sd_notify` (`READY=1`, and `MAINPID=` so
//! that systemd follows the new process).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

/// Names the inherited listening sockets: `listen:ADDR=FD,FD;admin:ADDR=FD`, where ADDR
/// is the `bind` as configured (so `127.0.0.1:0` finds its socket again).
pub const LISTEN_FDS: &str = "RAMPART_LISTEN_FDS";
/// The pipe on which the new process says it serves.
pub const READY_FD: &str = "RAMPART_UPGRADE_READY_FD";
/// A memory file holding the old process's backend verdicts (`state::Handed`, JSON).
pub const STATE_FD: &str = "RAMPART_UPGRADE_STATE_FD";

/// A duplicate of every listening socket, by configured address, for a handover.
/// Control plane only (start, reload, SIGUSR2), never the request path.
#[derive(Default)]
pub struct Inventory {
    listeners: Vec<(SocketAddr, Vec<OwnedFd>)>,
    admin: Option<(SocketAddr, OwnedFd)>,
}

impl Inventory {
    /// Records the workers' sockets of each listener just bound.
    pub fn add(&mut self, bound: &[crate::listener::Bound]) -> Result<(), crate::StartupError> {
        for b in bound {
            self.push(b.config.bind, &b.sockets)
                .map_err(|e| crate::StartupError::Bind {
                    addr: b.addr,
                    source: e,
                })?;
        }
        Ok(())
    }

    fn push(&mut self, bind: SocketAddr, sockets: &[TcpListener]) -> io::Result<()> {
        let fds = sockets
            .iter()
            .map(|s| s.try_clone().map(OwnedFd::from))
            .collect::<io::Result<Vec<_>>>()?;
        self.listeners.push((bind, fds));
        Ok(())
    }

    pub fn set_admin(&mut self, bind: SocketAddr, socket: &TcpListener) -> io::Result<()> {
        self.admin = Some((bind, socket.try_clone()?.into()));
        Ok(())
    }

    /// Takes in the sockets of listeners a reload added.
    pub fn absorb(&mut self, other: Inventory) {
        self.listeners.extend(other.listeners);
    }

    /// Forgets the listeners a reload removed, so their sockets really close.
    pub fn retain(&mut self, kept: impl Fn(SocketAddr) -> bool) {
        self.listeners.retain(|(bind, _)| kept(*bind));
    }

    /// Closes every duplicate: at shutdown, so the listening sockets close as the
    /// workers stop accepting (a connection then is refused at once, not left
    /// waiting in a queue nobody reads).
    pub fn clear(&mut self) {
        self.listeners.clear();
        self.admin = None;
    }

    fn spec(&self) -> String {
        let list = |fds: &[OwnedFd]| {
            fds.iter()
                .map(|f| f.as_raw_fd().to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut parts: Vec<String> = self
            .listeners
            .iter()
            .map(|(bind, fds)| format!("listen:{bind}={}", list(fds)))
            .collect();
        if let Some((bind, fd)) = &self.admin {
            parts.push(format!("admin:{bind}={}", fd.as_raw_fd()));
        }
        parts.join(";")
    }

    fn fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self
            .listeners
            .iter()
            .flat_map(|(_, f)| f.iter().map(|f| f.as_raw_fd()))
            .collect();
        fds.extend(self.admin.as_ref().map(|(_, f)| f.as_raw_fd()));
        fds
    }
}

/// The new process, started and not yet known to serve.
pub struct Upgrade {
    pub child: Child,
    ready: std::fs::File,
}

/// Starts `exe` with `args`, handing it every socket in `inventory`, and `state`.
pub fn spawn(
    exe: &std::path::Path,
    args: &[std::ffi::OsString],
    inventory: &Inventory,
    state: &[u8],
) -> io::Result<Upgrade> {
    let (read, write) = pipe()?;
    let state = memory_file(state)?;
    let mut inherit = inventory.fds();
    inherit.push(write.as_raw_fd());
    inherit.push(state.as_raw_fd());
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env(LISTEN_FDS, inventory.spec())
        .env(READY_FD, write.as_raw_fd().to_string())
        .env(STATE_FD, state.as_raw_fd().to_string());
    // SAFETY: runs in the forked child before exec and calls only fcntl, which is
    // async-signal-safe; the descriptors are open in the parent, so in the child too.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    // Our end of the pipe's write side closes here, so the read sees EOF if the new
    // process exits without saying it serves.
    drop((write, state));
    Ok(Upgrade { child, ready: read })
}

impl Upgrade {
    /// Blocks until the new process says it serves (true) or its end of the pipe
    /// closes without a word: it exited, or is exiting (false).
    pub fn wait_ready(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.ready.read(&mut byte), Ok(1))
    }
}

/// An anonymous file in memory holding `bytes`, read from its start.
fn memory_file(bytes: &[u8]) -> io::Result<std::fs::File> {
    use std::io::Seek;
    // SAFETY: memfd_create takes a NUL-terminated name and flags, and returns a new
    // descriptor that nothing else owns.
    let fd = unsafe { libc::memfd_create(c"rampart-state".as_ptr(), libc::MFD_CLOEXEC) };
    if fd == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just opened, owned here alone.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(bytes)?;
    file.rewind()?;
    Ok(file)
}

fn pipe() -> io::Result<(std::fs::File, std::fs::File)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just opened and are owned by nobody else.
    unsafe { Ok((std::fs::File::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1]))) }
}

/// The sockets a process started by a handover inherited. Empty otherwise.
#[derive(Default)]
pub struct Inherited {
    listeners: HashMap<SocketAddr, Vec<TcpListener>>,
    admin: Option<(SocketAddr, TcpListener)>,
    ready: Option<std::fs::File>,
    state: Option<Vec<u8>>,
}

impl Inherited {
    /// Takes the descriptors `RAMPART_LISTEN_FDS` and `RAMPART_UPGRADE_READY_FD`
    /// name, and removes both variables so nothing started later inherits them. Call
    /// once, at start, before any other thread runs.
    pub fn from_env() -> Result<Inherited, String> {
        let spec = std::env::var(LISTEN_FDS).ok();
        let ready = std::env::var(READY_FD).ok();
        let state = std::env::var(STATE_FD).ok();
        for var in [LISTEN_FDS, READY_FD, STATE_FD] {
            std::env::remove_var(var);
        }
        let mut inherited = Inherited::default();
        let file = |var: &str, fd: String| {
            let fd = parse_fd(&fd).ok_or_else(|| format!("{var}: not a descriptor: {fd:?}"))?;
            // SAFETY: the parent opened it for us (`spawn`) and nothing else owns it.
            Ok::<_, String>(unsafe { std::fs::File::from_raw_fd(fd) })
        };
        if let Some(fd) = ready {
            inherited.ready = Some(file(READY_FD, fd)?);
        }
        if let Some(fd) = state {
            let mut bytes = Vec::new();
            file(STATE_FD, fd)?
                .read_to_end(&mut bytes)
                .map_err(|e| format!("{STATE_FD}: {e}"))?;
            inherited.state = Some(bytes);
        }
        let Some(spec) = spec.filter(|s| !s.is_empty()) else {
            return Ok(inherited);
        };
        for part in spec.split(';') {
            let bad = || format!("{LISTEN_FDS}: cannot read {part:?}");
            let (kind, rest) = part.split_once(':').ok_or_else(bad)?;
            let (bind, fds) = rest.rsplit_once('=').ok_or_else(bad)?;
            let bind: SocketAddr = bind.parse().map_err(|_| bad())?;
            let mut sockets = Vec::new();
            for fd in fds.split(',') {
                let fd = parse_fd(fd).ok_or_else(bad)?;
                sockets
                    .push(listening_socket(fd).map_err(|e| format!("{LISTEN_FDS}: descriptor {fd} for {bind}: {e}"))?);
            }
            match kind {
                "listen" => inherited.listeners.entry(bind).or_default().extend(sockets),
                "admin" => inherited.admin = sockets.pop().map(|s| (bind, s)),
                _ => return Err(bad()),
            }
        }
        Ok(inherited)
    }

    /// The backend verdicts the old process handed over, if any.
    pub fn take_state(&mut self) -> Option<Vec<u8>> {
        self.state.take()
    }

    /// The sockets inherited for listener `bind`, if any; they are then ours.
    pub fn take(&mut self, bind: SocketAddr) -> Vec<TcpListener> {
        self.listeners.remove(&bind).unwrap_or_default()
    }

    pub fn take_admin(&mut self, bind: SocketAddr) -> Option<TcpListener> {
        match self.admin.take() {
            Some((b, s)) if b == bind => Some(s),
            other => {
                self.admin = other;
                None
            }
        }
    }

    /// The addresses inherited and not taken: listeners the new config dropped.
    /// Their sockets close when `self` drops.
    pub fn left_over(&self) -> Vec<SocketAddr> {
        let mut left: Vec<SocketAddr> = self.listeners.keys().copied().collect();
        left.extend(self.admin.as_ref().map(|(b, _)| *b));
        left
    }

    /// Tells the process that started us that we serve: systemd first (`MAINPID`, so
    /// it follows us rather than stop the service when the old process exits), then
    /// the old process, which stops accepting and drains.
    pub fn serving(&mut self) {
        match self.ready.take() {
            Some(mut pipe) => {
                notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
                let _ = pipe.write_all(b"1");
            }
            None => notify("READY=1"),
        }
    }
}

fn parse_fd(s: &str) -> Option<RawFd> {
    s.parse::<RawFd>().ok().filter(|fd| *fd > 2)
}

/// Adopts `fd` if it is a listening TCP socket.
fn listening_socket(fd: RawFd) -> io::Result<TcpListener> {
    // SAFETY: the parent passed this descriptor to us alone; we own it from here.
    let socket = unsafe { socket2::Socket::from_raw_fd(fd) };
    if socket.r#type()? != socket2::Type::STREAM || !socket.is_listener()? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a listening TCP socket",
        ));
    }
    socket.set_cloexec(true)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Sends `state` to systemd (`sd_notify`) when it supervises us with `Type=notify`;
/// does nothing otherwise.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> io::Result<()> {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr)?;
            }
            None => {
                socket.send_to(state.as_bytes(), &path)?;
            }
        }
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_names_each_listener_and_the_admin_socket_by_configured_address() {
        let socket = || TcpListener::bind("127.0.0.1:0").unwrap();
        let c = socket();
        let mut inv = Inventory::default();
        inv.push("127.0.0.1:0".parse().unwrap(), &[socket(), socket()]).unwrap();
        inv.push("[::1]:443".parse().unwrap(), &[socket()]).unwrap();
        inv.set_admin("127.0.0.1:9901".parse().unwrap(), &c).unwrap();
        let fds = inv.fds();
        assert_eq!(fds.len(), 4);
        assert_eq!(
            inv.spec(),
            format!(
                "listen:127.0.0.1:0={},{};listen:[::1]:443={};admin:127.0.0.1:9901={}",
                fds[0], fds[1], fds[2], fds[3]
            )
        );
        inv.retain(|bind| bind.port() == 0);
        assert_eq!(inv.fds().len(), 3);
        inv.clear();
        assert_eq!(inv.spec(), "");
    }
}
