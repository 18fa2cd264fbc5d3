//! Who may use the admin API, and for what.
//!
//! On the Unix socket the kernel tells us who is calling (SO_PEERCRED): uid 0, the daemon's
//! own uid and members of `admin.group` may change state ([`Role::Write`]); members of
//! `admin.read_group` may read ([`Role::Read`]); everyone else is refused with 403. The role is
//! decided once per connection, at accept, from the peer's uid and the groups the system lists
//! for that user (so a group change applies to the next connection). The socket's mode 0660
//! and group are a second fence, not the only one: a process that inherits a connected socket
//! still carries the credentials of whoever connected.
//!
//! On the optional loopback TCP listener nobody is identified by the kernel, so every request
//! must carry `Authorization: Bearer <token>` with the token of `admin.token_file`, compared
//! in constant time. The token grants writing, never a private key (only uid 0 on the socket).

use std::ffi::{CStr, CString};
use std::net::SocketAddr;

use axum::extract::Request;
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::identity::Secret;

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Nothing: every request is refused with 403.
    None,
    /// GET only.
    Read,
    /// Everything.
    Write,
}

/// Who is on the other end of a connection (a request extension).
#[derive(Clone, Debug)]
pub enum Caller {
    /// A local process on the Unix socket, as the kernel reported it at connect.
    Local {
        /// Its user id.
        uid: u32,
        /// Its group id.
        gid: u32,
        /// What it may do.
        role: Role,
    },
    /// A client of the loopback TCP listener; authorized per request by its bearer token.
    Tcp {
        /// Its address.
        peer: SocketAddr,
    },
}

impl Caller {
    /// Whether the caller is root on the Unix socket (the only one that may receive a
    /// private key).
    pub fn is_root(&self) -> bool {
        matches!(self, Caller::Local { uid: 0, .. })
    }
}

/// The groups that grant rights, resolved from the config at start.
#[derive(Clone, Debug)]
pub struct AccessPolicy {
    write_group: Option<(String, u32)>,
    read_group: Option<(String, u32)>,
    daemon_uid: u32,
}

impl AccessPolicy {
    /// Resolves `group` (write) and `read_group` (read; empty = none). A group that does not
    /// exist on this system grants nothing (logged), so a missing group never opens the API.
    pub fn resolve(group: &str, read_group: &str) -> Self {
        let lookup = |name: &str, key: &str| {
            if name.is_empty() {
                return None;
            }
            match group_id(name) {
                Some(gid) => Some((name.to_string(), gid)),
                None => {
                    tracing::warn!(
                        "{key}: group {name:?} does not exist on this system; it grants no admin rights (create it with groupadd)"
                    );
                    None
                }
            }
        };
        AccessPolicy {
            write_group: lookup(group, "admin.group"),
            read_group: lookup(read_group, "admin.read_group"),
            // SAFETY: geteuid has no preconditions and cannot fail.
            daemon_uid: unsafe { libc::geteuid() },
        }
    }

    /// The gid of the write group, if it exists (the socket is chowned to it).
    pub fn write_gid(&self) -> Option<u32> {
        self.write_group.as_ref().map(|(_, gid)| *gid)
    }

    /// Root or the daemon's own user: never limited.
    pub fn is_privileged(&self, uid: u32) -> bool {
        uid == 0 || uid == self.daemon_uid
    }

    /// The role of a local peer with `uid` and primary `gid`.
    pub fn role_of(&self, uid: u32, gid: u32) -> Role {
        if uid == 0 || uid == self.daemon_uid {
            return Role::Write;
        }
        let groups = groups_of(uid, gid);
        let member =
            |g: &Option<(String, u32)>| g.as_ref().is_some_and(|(_, id)| groups.contains(id));
        if member(&self.write_group) {
            Role::Write
        } else if member(&self.read_group) {
            Role::Read
        } else {
            Role::None
        }
    }
}

/// The gid of group `name`, if it exists.
fn group_id(name: &str) -> Option<u32> {
    let cname = CString::new(name).ok()?;
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf outlives the use of `grp`'s strings
    // (we only read gr_gid).
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        )
    };
    (rc == 0 && !out.is_null()).then_some(grp.gr_gid)
}

/// The name of the calling process's primary group, if the system knows it (the demo makes it
/// the admin group of its private, in-process gateway).
pub fn own_group_name() -> Option<String> {
    // SAFETY: getgid cannot fail.
    let gid = unsafe { libc::getgid() };
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: valid pointers; gr_name points into buf, copied before buf is dropped.
    let rc =
        unsafe { libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr().cast(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() || grp.gr_name.is_null() {
        return None;
    }
    // SAFETY: gr_name is a NUL-terminated string inside buf, which is still alive.
    let name = unsafe { std::ffi::CStr::from_ptr(grp.gr_name) };
    name.to_str().ok().map(str::to_string)
}

/// The user name of `uid`, if the system knows it.
fn user_name(uid: u32) -> Option<CString> {
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16 * 1024];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: valid pointers; pw_name points into buf, copied before buf is dropped.
    let rc =
        unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() || pwd.pw_name.is_null() {
        return None;
    }
    // SAFETY: pw_name is a NUL-terminated string inside buf.
    Some(unsafe { CStr::from_ptr(pwd.pw_name) }.to_owned())
}

/// Every group `uid` belongs to: its primary `gid` plus the supplementary groups the system
/// lists for its user name.
fn groups_of(uid: u32, gid: u32) -> Vec<u32> {
    let mut groups = vec![gid];
    let Some(name) = user_name(uid) else {
        return groups;
    };
    let mut n: libc::c_int = 64;
    loop {
        let mut list: Vec<libc::gid_t> = vec![0; n as usize];
        let mut count = n;
        // SAFETY: list has room for `count` entries; getgrouplist writes at most that many
        // and reports the needed size when it is too small.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, list.as_mut_ptr(), &mut count) };
        if rc >= 0 {
            list.truncate(count.max(0) as usize);
            groups.extend(list);
            return groups;
        }
        if count <= n || count > 65_536 {
            return groups;
        }
        n = count;
    }
}

/// Bearer token check of the TCP listener.
#[derive(Clone)]
pub struct BearerToken(Secret);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken([redacted])")
    }
}

/// Why the token file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// It could not be read.
    #[error("admin.token_file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It holds too short a token.
    #[error("admin.token_file {path}: the token has {len} characters; use at least 32 (e.g. `openssl rand -hex 32`)")]
    TooShort {
        /// The file.
        path: String,
        /// Its length.
        len: usize,
    },
}

impl BearerToken {
    /// Reads the token (surrounding whitespace trimmed) from `path`; at least 32 characters.
    pub fn from_file(path: &std::path::Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let token = text.trim();
        if token.len() < 32 {
            return Err(TokenError::TooShort {
                path: path.display().to_string(),
                len: token.len(),
            });
        }
        Ok(BearerToken(Secret::from(token.to_string())))
    }

    /// Whether `presented` is the token, in time independent of where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        constant_time_eq(self.0.expose(), presented)
    }
}

/// Compares in time that depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    diff == 0
}

/// Middleware: refuses callers without the right role for the request's method.
pub async fn authorize(req: Request, next: Next) -> Response {
    let token = req.extensions().get::<BearerToken>().cloned();
    let role = match req.extensions().get::<Caller>() {
        Some(Caller::Local { role, .. }) => *role,
        Some(Caller::Tcp { .. }) => {
            let presented = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
            match (token, presented) {
                (Some(t), Some(p)) if t.matches(p) => Role::Write,
                (_, None) => {
                    return ApiError::new(
                        axum::http::StatusCode::UNAUTHORIZED,
                        "Unauthorized",
                        "send Authorization: Bearer <token> with the token of admin.token_file",
                    )
                    .into_response()
                }
                _ => {
                    return ApiError::new(
                        axum::http::StatusCode::UNAUTHORIZED,
                        "Unauthorized",
                        "the bearer token is wrong; use the one in admin.token_file",
                    )
                    .into_response()
                }
            }
        }
        None => Role::None,
    };
    let needed = if matches!(*req.method(), Method::GET | Method::HEAD) {
        Role::Read
    } else {
        Role::Write
    };
    if role < needed {
        let message = if role == Role::None {
            "this user may not use the admin API: add it to admin.group (write) or admin.read_group (read), or use sudo"
        } else {
            "this user may only read: add it to admin.group to change state, or use sudo"
        };
        return ApiError::forbidden(message).into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
        // A prefix padded with the bytes the comparison pads with is still different.
        assert!(!constant_time_eq(b"ab\0", b"ab"));
    }

    #[test]
    fn root_and_the_daemon_write_and_a_missing_group_grants_nothing() {
        let p = AccessPolicy::resolve("no-such-group-fleetgw-test", "");
        assert_eq!(p.role_of(0, 0), Role::Write);
        // SAFETY: no preconditions.
        let me = unsafe { libc::geteuid() };
        assert_eq!(p.role_of(me, 0), Role::Write);
        assert_eq!(p.role_of(65_534, 65_534), Role::None);
    }

    #[test]
    fn membership_by_primary_group() {
        // "root" (gid 0) exists everywhere; a uid whose primary gid is 0 is a member.
        let p = AccessPolicy::resolve("root", "");
        assert_eq!(p.write_gid(), Some(0));
        assert_eq!(p.role_of(65_533, 0), Role::Write);
        let p = AccessPolicy::resolve("no-such-group-fleetgw-test", "root");
        assert_eq!(p.role_of(65_533, 0), Role::Read);
    }
}
