//! Socket activation: listeners passed by a service manager (systemd's protocol:
//! `LISTEN_PID`, `LISTEN_FDS`, optionally `LISTEN_FDNAMES`, descriptors from 3 on), used
//! instead of binding, so that a restart loses no connection: connections that arrive while
//! no daemon runs wait in the socket's backlog for the next one.
//!
//! A passed TCP listener is the dispatcher's (`--http`), a Unix one the control API's
//! (`--api-sock`); the names `http` and `api` in `LISTEN_FDNAMES` say so explicitly.
//! Variables meant for another process (`LISTEN_PID` not this one's) are ignored; anything
//! passed to this one that is not a stream listener of a known kind is an error.

use std::net::TcpListener;
use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;

use crate::sys::{self, SocketInfo};

/// The first passed descriptor (after stdin, stdout, stderr).
const FIRST_FD: RawFd = 3;
/// Most descriptors accepted: the daemon uses two.
const MAX_FDS: usize = 16;
/// The `LISTEN_FDNAMES` name of the dispatcher's listener.
pub const HTTP_NAME: &str = "http";
/// The `LISTEN_FDNAMES` name of the control API's listener.
pub const API_NAME: &str = "api";

/// Listeners the daemon was handed instead of binding them.
#[derive(Debug, Default)]
pub struct Inherited {
    /// The dispatcher's TCP listener.
    pub http: Option<TcpListener>,
    /// The control API's Unix listener.
    pub api: Option<UnixListener>,
}

/// The listener a passed descriptor is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The dispatcher's TCP listener (`--http`).
    Http = 0,
    /// The control API's Unix listener (`--api-sock`).
    Api = 1,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Http => "the dispatcher (TCP)",
            Role::Api => "the control API (Unix)",
        }
    }
}

/// Why the passed descriptors cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// A variable is not what the protocol says.
    #[error("{name}={value:?} is not {want}")]
    Variable {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// What it should be.
        want: &'static str,
    },
    /// More descriptors than the daemon could use.
    #[error("LISTEN_FDS={count}: at most {MAX_FDS} descriptors are accepted")]
    TooMany {
        /// How many were passed.
        count: usize,
    },
    /// `LISTEN_FDNAMES` names more or fewer descriptors than `LISTEN_FDS` passes.
    #[error("LISTEN_FDNAMES has {names} names for {count} descriptors")]
    NameCount {
        /// Names given.
        names: usize,
        /// Descriptors passed.
        count: usize,
    },
    /// A passed descriptor is not open, or cannot be examined.
    #[error("descriptor {fd} passed by LISTEN_FDS is unusable")]
    Unusable {
        /// The descriptor.
        fd: RawFd,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A passed descriptor is not a socket.
    #[error("descriptor {fd} passed by LISTEN_FDS is not a socket")]
    NotSocket {
        /// The descriptor.
        fd: RawFd,
    },
    /// A passed socket is not a listening stream socket.
    #[error("descriptor {fd} passed by LISTEN_FDS is not a listening stream socket")]
    NotListener {
        /// The descriptor.
        fd: RawFd,
    },
    /// A passed socket is neither TCP nor Unix.
    #[error("descriptor {fd} passed by LISTEN_FDS is neither a TCP nor a Unix socket (address family {family})")]
    Family {
        /// The descriptor.
        fd: RawFd,
        /// Its address family.
        family: i32,
    },
    /// A name says one kind of socket, the descriptor is another.
    #[error("descriptor {fd} is named `{name}` but is not a socket for {}", role.name())]
    WrongKind {
        /// The descriptor.
        fd: RawFd,
        /// Its name.
        name: String,
        /// What the name asks for.
        role: Role,
    },
    /// Two descriptors for one listener.
    #[error("descriptors {first} and {second} are both for {}; name them `http` and `api` in LISTEN_FDNAMES", role.name())]
    Ambiguous {
        /// The listener.
        role: Role,
        /// The first descriptor for it.
        first: RawFd,
        /// The second.
        second: RawFd,
    },
}

/// The protocol's variables, as read from the environment.
#[derive(Debug, Default, Clone)]
struct Variables {
    pid: Option<String>,
    fds: Option<String>,
    names: Option<String>,
}

impl Variables {
    fn from_env() -> Result<Variables, ActivationError> {
        let read = |name: &'static str| match std::env::var(name) {
            Ok(value) => Ok(Some(value)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(value)) => {
                Err(ActivationError::Variable { name, value: value.to_string_lossy().into_owned(), want: "UTF-8" })
            }
        };
        Ok(Variables { pid: read("LISTEN_PID")?, fds: read("LISTEN_FDS")?, names: read("LISTEN_FDNAMES")? })
    }

    /// The descriptors passed to process `own_pid`, each with its name if any; empty if none
    /// were passed or they were passed to another process.
    fn passed(&self, own_pid: u32) -> Result<Vec<(RawFd, Option<String>)>, ActivationError> {
        let Some(fds) = &self.fds else { return Ok(Vec::new()) };
        let number = |name: &'static str, value: &str, want: &'static str| {
            value.trim().parse::<u64>().map_err(|_| ActivationError::Variable { name, value: value.to_string(), want })
        };
        match &self.pid {
            None => {
                log::warn!("LISTEN_FDS is set without LISTEN_PID: ignoring it, binding the listeners");
                return Ok(Vec::new());
            }
            Some(pid) if number("LISTEN_PID", pid, "a process id")? != u64::from(own_pid) => {
                log::warn!("LISTEN_PID={pid} is not this process ({own_pid}): ignoring LISTEN_FDS");
                return Ok(Vec::new());
            }
            Some(_) => {}
        }
        let count = number("LISTEN_FDS", fds, "a number of descriptors")?;
        let count = usize::try_from(count)
            .ok()
            .filter(|c| *c <= MAX_FDS)
            .ok_or(ActivationError::TooMany { count: usize::try_from(count).unwrap_or(usize::MAX) })?;
        let names: Vec<Option<String>> = match &self.names {
            None => vec![None; count],
            Some(names) => {
                let names: Vec<Option<String>> = names.split(':').map(|n| Some(n.to_string())).collect();
                if names.len() != count {
                    return Err(ActivationError::NameCount { names: names.len(), count });
                }
                names
            }
        };
        // `count` <= MAX_FDS, so the descriptor numbers fit.
        Ok(names.into_iter().enumerate().map(|(i, name)| (FIRST_FD + i as RawFd, name)).collect())
    }
}

/// Decides which descriptor is which listener, from each one's name and what it is.
fn assign(passed: &[(RawFd, Option<String>, SocketInfo)]) -> Result<[Option<RawFd>; 2], ActivationError> {
    let mut roles: [Option<RawFd>; 2] = [None, None];
    for (fd, name, info) in passed {
        let fd = *fd;
        if !info.stream || !info.listening {
            return Err(ActivationError::NotListener { fd });
        }
        let kind = match info.family {
            libc::AF_INET | libc::AF_INET6 => Role::Http,
            libc::AF_UNIX => Role::Api,
            family => return Err(ActivationError::Family { fd, family }),
        };
        let named = match name.as_deref() {
            Some(HTTP_NAME) => Some(Role::Http),
            Some(API_NAME) => Some(Role::Api),
            // systemd names a descriptor after its socket unit unless told otherwise: the
            // kind of socket decides then.
            _ => None,
        };
        if let Some(role) = named.filter(|role| *role != kind) {
            return Err(ActivationError::WrongKind { fd, name: name.clone().unwrap_or_default(), role });
        }
        let slot = &mut roles[kind as usize];
        if let Some(first) = *slot {
            return Err(ActivationError::Ambiguous { role: kind, first, second: fd });
        }
        *slot = Some(fd);
    }
    Ok(roles)
}

/// The listeners passed to this process, if any. Call it before the process opens any
/// descriptor of its own: the passed ones are numbered from 3.
pub fn from_env() -> Result<Inherited, ActivationError> {
    let passed = Variables::from_env()?.passed(std::process::id())?;
    let mut examined = Vec::with_capacity(passed.len());
    for (fd, name) in passed {
        let info = sys::socket_info(fd)
            .map_err(|source| ActivationError::Unusable { fd, source })?
            .ok_or(ActivationError::NotSocket { fd })?;
        examined.push((fd, name, info));
    }
    let [http, api] = assign(&examined)?;
    let claim = |fd| sys::claim_inherited_fd(fd).map_err(|source| ActivationError::Unusable { fd, source });
    let inherited = Inherited {
        http: http.map(claim).transpose()?.map(TcpListener::from),
        api: api.map(claim).transpose()?.map(UnixListener::from),
    };
    if inherited.http.is_some() || inherited.api.is_some() {
        log::info!(
            "socket activation: {} passed listener(s) (dispatcher: {}, control API: {})",
            examined.len(),
            if inherited.http.is_some() { "passed" } else { "bound" },
            if inherited.api.is_some() { "passed" } else { "bound" },
        );
    }
    Ok(inherited)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pid: Option<&str>, fds: Option<&str>, names: Option<&str>) -> Variables {
        Variables { pid: pid.map(Into::into), fds: fds.map(Into::into), names: names.map(Into::into) }
    }

    #[test]
    fn descriptors_for_another_process_are_ignored() {
        assert!(vars(Some("41"), Some("2"), None).passed(42).expect("ignored").is_empty());
        assert!(vars(None, Some("2"), None).passed(42).expect("ignored").is_empty());
        assert!(vars(None, None, None).passed(42).expect("nothing").is_empty());
    }

    #[test]
    fn descriptors_for_this_process_are_numbered_from_3_with_their_names() {
        let passed = vars(Some("42"), Some("2"), Some("api:http")).passed(42).expect("passed");
        assert_eq!(passed, vec![(3, Some("api".into())), (4, Some("http".into()))]);
        assert_eq!(vars(Some("42"), Some("1"), None).passed(42).expect("passed"), vec![(3, None)]);
    }

    #[test]
    fn malformed_variables_are_errors() {
        let err = |v: Variables| v.passed(42).expect_err("refused").to_string();
        assert!(err(vars(Some("42"), Some("two"), None)).contains("LISTEN_FDS=\"two\""));
        assert!(err(vars(Some("x"), Some("1"), None)).contains("LISTEN_PID"));
        assert!(err(vars(Some("42"), Some("99"), None)).contains("at most 16"));
        assert!(err(vars(Some("42"), Some("18446744073709551615"), None)).contains("at most 16"));
        assert!(err(vars(Some("42"), Some("2"), Some("http"))).contains("1 names for 2"));
    }

    const TCP: SocketInfo = SocketInfo { family: libc::AF_INET6, stream: true, listening: true };
    const UNIX: SocketInfo = SocketInfo { family: libc::AF_UNIX, stream: true, listening: true };

    #[test]
    fn listeners_are_assigned_by_kind_or_by_name() {
        assert_eq!(assign(&[(3, None, UNIX), (4, None, TCP)]).expect("by kind"), [Some(4), Some(3)]);
        let named = [(3, Some("http".into()), TCP), (4, Some("mu2.socket".into()), UNIX)];
        assert_eq!(assign(&named).expect("by name"), [Some(3), Some(4)]);
        assert_eq!(assign(&[(3, None, TCP)]).expect("only http"), [Some(3), None]);
    }

    #[test]
    fn unusable_or_ambiguous_listeners_are_errors() {
        let udp = SocketInfo { family: libc::AF_INET, stream: false, listening: false };
        assert!(matches!(assign(&[(3, None, udp)]), Err(ActivationError::NotListener { fd: 3 })));
        let netlink = SocketInfo { family: libc::AF_NETLINK, ..TCP };
        assert!(matches!(assign(&[(3, None, netlink)]), Err(ActivationError::Family { fd: 3, .. })));
        assert!(matches!(
            assign(&[(3, None, TCP), (4, None, TCP)]),
            Err(ActivationError::Ambiguous { role: Role::Http, first: 3, second: 4 })
        ));
        assert!(matches!(
            assign(&[(3, Some("api".into()), TCP)]),
            Err(ActivationError::WrongKind { fd: 3, role: Role::Api, .. })
        ));
    }
}
