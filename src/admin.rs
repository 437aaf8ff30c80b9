//! The admin boundary of the listener: the admin token, the console's
//! one-time links and sessions, and the layers that guard the routes.
//!
//! The listener's routes come in three kinds, and this module decides who
//! may use each ([`Gate`]):
//!
//! - **changing** (retry, cancel, minting a console link, ...): wrapped by
//!   [`Gate::changing`]. A request a browser marks as cross-site
//!   (`Sec-Fetch-Site`), or whose `Origin` is not the host it was sent to, is
//!   refused with 403 whatever it carries (tower-http's `CsrfLayer`); then
//!   `Authorization: Bearer TOKEN` or the console's session cookie is needed,
//!   else 401 and the handler never runs.
//! - **reading** (`/status`, the console): wrapped by [`Gate::reading`]; open
//!   when the listener is on a loopback address, else as guarded as changing
//!   routes (without the cross-site check: nothing changes).
//! - **open**: `/metrics`, `GET /login?ticket=…` (the ticket is the
//!   credential) and the callback route (its secret path is the credential).
//!
//! On top of all of them, [`Gate::check_host`] refuses (421) a `Host` that is
//! not one of the listener's own names, so that a page whose name was
//! rebound to 127.0.0.1 (DNS rebinding) cannot read the listener.
//!
//! This module must never let a handler decide on authentication itself, and
//! never log the token, a ticket or a session value.
//!
//! The token lives in `STATE/admin-token` (mode 0600), created at the
//! daemon's first start and read by the CLI. Tickets (single use, five
//! minutes) and sessions (twelve hours) live in memory only: a restart ends
//! them.

use std::fmt;
use std::fs::{File, OpenOptions, Permissions};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tower_http::csrf::{CsrfLayer, ProtectionError};

/// Name of the token file in the state folder.
pub const TOKEN_FILE: &str = "admin-token";
/// Name of the console's session cookie.
pub const SESSION_COOKIE: &str = "infinitetalk_session";
/// How long a console link can be opened.
pub const TICKET_TTL: Duration = Duration::from_secs(5 * 60);
/// How long a console session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Console links not yet opened, at most (the oldest is dropped).
const MAX_TICKETS: usize = 16;
/// Console sessions at once, at most (the oldest ends).
const MAX_SESSIONS: usize = 64;
/// Random bytes in a token, a ticket or a session value.
const SECRET_BYTES: usize = 32;

/// Why the admin token could not be created or read.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be created, opened or read (missing, permissions,
    /// a symlink in its place).
    #[error("admin token {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Something other than a regular file is at its name.
    #[error("admin token {path}: not a regular file; remove it and start the daemon again")]
    NotRegular { path: PathBuf },
    /// The file does not hold a token.
    #[error(
        "admin token {path}: not a token (expected {} hex digits); remove it and start the daemon again",
        SECRET_BYTES * 2
    )]
    Malformed { path: PathBuf },
}

/// The admin token. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// The token, for an `Authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn matches(&self, candidate: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), candidate.as_bytes())
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Where the token of the state folder `state` lives.
pub fn token_path(state: &Path) -> PathBuf {
    state.join(TOKEN_FILE)
}

fn random_hex() -> String {
    use rand::Rng;
    let bytes: [u8; SECRET_BYTES] = rand::rng().random();
    crate::ingest::hex(&bytes)
}

/// Compares two secrets in time that does not depend on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The daemon's token: read from `STATE/admin-token`, or created there (mode
/// 0600, exclusively, whole or not at all) at the first start. A token file
/// readable by others is made private again, with a warning.
pub fn load_or_create(state: &Path) -> Result<AdminToken, TokenError> {
    let path = token_path(state);
    let io_err = |source| TokenError::Io {
        path: path.clone(),
        source,
    };
    match open_token(&path) {
        Ok(file) => return read_open(&path, file, true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let token = random_hex();
    let mut tmp = tempfile::Builder::new()
        .prefix(".admin-token.")
        .suffix(".tmp")
        .permissions(Permissions::from_mode(0o600))
        .tempfile_in(state)
        .map_err(io_err)?;
    tmp.write_all(format!("{token}\n").as_bytes())
        .map_err(io_err)?;
    tmp.as_file().sync_all().map_err(io_err)?;
    // A hard link: fails if anything (a symlink included) took the name.
    match tmp.persist_noclobber(&path) {
        Ok(_) => {
            crate::fsutil::sync_dir(state).map_err(io_err)?;
            tracing::info!(path = %path.display(), "admin token created (mode 0600)");
            Ok(AdminToken(token))
        }
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => read_token(state),
        Err(e) => Err(io_err(e.error)),
    }
}

/// The token of a daemon's state folder, as the CLI reads it.
pub fn read_token(state: &Path) -> Result<AdminToken, TokenError> {
    let path = token_path(state);
    let file = open_token(&path).map_err(|source| TokenError::Io {
        path: path.clone(),
        source,
    })?;
    read_open(&path, file, false)
}

/// Opens without following a symlink and without blocking on a FIFO.
fn open_token(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

fn read_open(path: &Path, mut file: File, fix_mode: bool) -> Result<AdminToken, TokenError> {
    let io_err = |source| TokenError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(TokenError::NotRegular {
            path: path.to_owned(),
        });
    }
    if fix_mode && meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "the admin token was readable by others; made private (0600)");
        file.set_permissions(Permissions::from_mode(0o600))
            .map_err(io_err)?;
    }
    let mut text = String::new();
    (&mut file)
        .take(1024)
        .read_to_string(&mut text)
        .map_err(|_| TokenError::Malformed {
            path: path.to_owned(),
        })?;
    let token = text.trim();
    if token.len() != SECRET_BYTES * 2 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TokenError::Malformed {
            path: path.to_owned(),
        });
    }
    Ok(AdminToken(token.to_owned()))
}

/// What the gate needs to know about the listener it guards.
#[derive(Debug, Clone)]
pub struct GateConfig {
    pub token: AdminToken,
    /// The main listener's bound address.
    pub listen: SocketAddr,
    /// `--callback-url`: its host is one of the listener's names.
    pub callback_url: Option<url::Url>,
    /// Further public URLs of the listener (`--media-url`): their hosts are
    /// its names too.
    pub public_urls: Vec<url::Url>,
}

/// The guard of the main listener's routes. Cheap to clone.
#[derive(Clone)]
pub struct Gate(Arc<Inner>);

struct Inner {
    token: AdminToken,
    /// Reading routes need no token (the listener is on loopback).
    reading_open: bool,
    /// Accepted `Host` names, lowercase, without port.
    hosts: Vec<String>,
    /// Any IP literal is a name of the listener (bound to 0.0.0.0 or ::).
    any_ip: bool,
    /// Hosts of the public URLs (`--callback-url`, `--media-url`): the
    /// console's origin when a reverse proxy serves it.
    public_hosts: Vec<String>,
    tickets: Mutex<Vec<Secret>>,
    sessions: Mutex<Vec<Secret>>,
}

struct Secret {
    value: String,
    expires: Instant,
}

/// What `POST /admin/ticket` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ticket {
    /// Path and query of the one-time console link, e.g. `/login?ticket=T`.
    pub path: String,
    /// How long the link can be opened.
    pub expires_in_secs: u64,
}

impl Gate {
    pub fn new(config: GateConfig) -> Gate {
        let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
            .map(String::from)
            .to_vec();
        let ip = config.listen.ip();
        if !ip.is_unspecified() {
            hosts.push(ip_host(ip));
        }
        let public_hosts: Vec<String> = config
            .callback_url
            .iter()
            .chain(&config.public_urls)
            .filter_map(|url| url.host_str().map(normalize_host))
            .collect();
        hosts.extend(public_hosts.iter().cloned());
        hosts.sort();
        hosts.dedup();
        Gate(Arc::new(Inner {
            token: config.token,
            reading_open: ip.is_loopback(),
            hosts,
            any_ip: ip.is_unspecified(),
            public_hosts,
            tickets: Mutex::new(Vec::new()),
            sessions: Mutex::new(Vec::new()),
        }))
    }

    /// Whether reading routes are open to anyone who reaches the listener.
    pub fn reading_is_open(&self) -> bool {
        self.0.reading_open
    }

    /// Guards changing routes: cross-site refused (403), then the token or
    /// a session needed (401).
    pub fn changing<S: Clone + Send + Sync + 'static>(&self, routes: Router<S>) -> Router<S> {
        routes
            .layer(middleware::from_fn_with_state(self.clone(), require_admin))
            .layer(
                CsrfLayer::new()
                    .with_rejection_response(refuse_cross_site as fn(ProtectionError) -> Response),
            )
            .layer(middleware::from_fn_with_state(
                self.clone(),
                require_own_origin,
            ))
    }

    /// Guards reading routes: open on loopback, else the token or a session.
    pub fn reading<S: Clone + Send + Sync + 'static>(&self, routes: Router<S>) -> Router<S> {
        if self.0.reading_open {
            routes
        } else {
            routes.layer(middleware::from_fn_with_state(self.clone(), require_admin))
        }
    }

    /// Refuses requests whose `Host` is not one of the listener's names.
    pub fn check_host<S: Clone + Send + Sync + 'static>(&self, router: Router<S>) -> Router<S> {
        router.layer(middleware::from_fn_with_state(self.clone(), check_host))
    }

    /// `POST /admin/ticket` (changing: token or session) and `GET /login`.
    pub fn routes(&self) -> Router {
        let mint = Router::new()
            .route("/admin/ticket", post(ticket_handler))
            .with_state(self.clone());
        self.changing(mint).merge(
            Router::new()
                .route("/login", get(login_handler))
                .with_state(self.clone()),
        )
    }

    /// Whether `host` (a `Host` header or an authority) names this listener.
    pub fn host_allowed(&self, authority: &str) -> bool {
        let Some(host) = host_of(authority) else {
            return false;
        };
        if self.0.hosts.contains(&host) {
            return true;
        }
        self.0.any_ip && is_ip_literal(&host)
    }

    /// Whether the request carries the token or a live session.
    pub fn authorized(&self, headers: &HeaderMap) -> bool {
        let bearer = headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| {
                let (scheme, rest) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .any(|t| self.0.token.matches(t));
        if bearer {
            return true;
        }
        let cookies: Vec<&str> = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| {
                let (name, value) = c.trim().split_once('=')?;
                (name == SESSION_COOKIE).then(|| value.trim_matches('"'))
            })
            .collect();
        if cookies.is_empty() {
            return false;
        }
        let mut sessions = lock(&self.0.sessions);
        prune(&mut sessions);
        cookies.iter().any(|c| {
            sessions
                .iter()
                .any(|s| constant_time_eq(s.value.as_bytes(), c.as_bytes()))
        })
    }

    /// A new single-use ticket for the console link.
    pub fn issue_ticket(&self) -> String {
        let value = random_hex();
        let mut tickets = lock(&self.0.tickets);
        prune(&mut tickets);
        if tickets.len() >= MAX_TICKETS {
            tickets.remove(0);
        }
        tickets.push(Secret {
            value: value.clone(),
            expires: Instant::now() + TICKET_TTL,
        });
        value
    }

    /// Spends `ticket` for a new session; `None` if it is unknown, used or
    /// expired.
    pub fn redeem(&self, ticket: &str) -> Option<String> {
        {
            let mut tickets = lock(&self.0.tickets);
            prune(&mut tickets);
            let found = tickets
                .iter()
                .position(|t| constant_time_eq(t.value.as_bytes(), ticket.as_bytes()))?;
            tickets.remove(found);
        }
        let value = random_hex();
        let mut sessions = lock(&self.0.sessions);
        prune(&mut sessions);
        if sessions.len() >= MAX_SESSIONS {
            sessions.remove(0);
        }
        sessions.push(Secret {
            value: value.clone(),
            expires: Instant::now() + SESSION_TTL,
        });
        Some(value)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn prune(secrets: &mut Vec<Secret>) {
    let now = Instant::now();
    secrets.retain(|s| s.expires > now);
}

fn ip_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn is_ip_literal(host: &str) -> bool {
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => host.parse::<std::net::Ipv4Addr>().is_ok(),
    }
}

/// The host of `host[:port]` (IPv6 in brackets), lowercase, without a
/// trailing dot; `None` if it is not of that form.
fn host_of(authority: &str) -> Option<String> {
    let a = authority.trim();
    if a.is_empty() || a.contains(['@', '/', ' ']) {
        return None;
    }
    let port_ok = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    let host = if a.starts_with('[') {
        let end = a.find(']')?;
        let after = &a[end + 1..];
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(port_ok)) {
            return None;
        }
        &a[..=end]
    } else {
        match a.split_once(':') {
            Some((h, p)) if port_ok(p) => h,
            Some(_) => return None,
            None => a,
        }
    };
    let host = normalize_host(host);
    (!host.is_empty()).then_some(host)
}

fn refuse_cross_site(_: ProtectionError) -> Response {
    cross_site_refused()
}

fn cross_site_refused() -> Response {
    tracing::warn!(
        "changing request refused: it comes from another site (Origin / Sec-Fetch-Site)"
    );
    (
        StatusCode::FORBIDDEN,
        "cross-site request refused: admin actions are taken only from this daemon's own pages or the command line\n",
    )
        .into_response()
}

/// Refuses a changing request whose `Origin` names another site, whatever
/// its `Sec-Fetch-Site` says (tower-http's layer trusts a `same-origin`
/// there without looking at `Origin`). Its own origin is the `Host` it was
/// sent to, its `X-Forwarded-Host`, or a public URL's host.
async fn require_own_origin(State(gate): State<Gate>, req: Request, next: Next) -> Response {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return next.run(req).await;
    };
    let own = origin.to_str().ok().is_some_and(|origin| {
        let Some(authority) = origin
            .split_once("://")
            .map(|(_, rest)| rest.trim_end_matches('/'))
        else {
            return false;
        };
        let header_is = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|h| h.to_str().ok())
                .is_some_and(|h| h.trim().eq_ignore_ascii_case(authority))
        };
        // A reverse proxy that rewrites Host says where it was sent in
        // X-Forwarded-Host; a browser cannot set that header cross-site.
        header_is(header::HOST.as_str())
            || req
                .uri()
                .authority()
                .is_some_and(|a| a.as_str().eq_ignore_ascii_case(authority))
            || header_is("x-forwarded-host")
            || host_of(authority).is_some_and(|h| gate.0.public_hosts.contains(&h))
    });
    if own {
        return next.run(req).await;
    }
    cross_site_refused()
}

async fn require_admin(State(gate): State<Gate>, req: Request, next: Next) -> Response {
    if gate.authorized(req.headers()) {
        return next.run(req).await;
    }
    tracing::warn!(method = %req.method(), path = %crate::redact::request_path(req.uri().path()), "request refused: no valid admin token or console session");
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))],
        "admin token required: send Authorization: Bearer TOKEN (the token is in STATE/admin-token), or open the link `infinitetalk-batch console` prints\n",
    )
        .into_response()
}

async fn check_host(State(gate): State<Gate>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    let authority = req.uri().authority().map(|a| a.as_str());
    let ok = (host.is_some() || authority.is_some())
        && host.is_none_or(|h| gate.host_allowed(h))
        && authority.is_none_or(|a| gate.host_allowed(a));
    if ok {
        return next.run(req).await;
    }
    tracing::warn!(host = host.unwrap_or(""), path = %crate::redact::request_path(req.uri().path()), "request refused: Host is not one of this listener's names");
    (
        StatusCode::MISDIRECTED_REQUEST,
        "Host not served here: use localhost, 127.0.0.1, [::1], the listen address, or the host of --callback-url\n",
    )
        .into_response()
}

async fn ticket_handler(State(gate): State<Gate>) -> Response {
    let ticket = gate.issue_ticket();
    tracing::info!("one-time console link issued");
    (
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        axum::Json(Ticket {
            path: format!("/login?ticket={ticket}"),
            expires_in_secs: TICKET_TTL.as_secs(),
        }),
    )
        .into_response()
}

#[derive(Deserialize)]
struct LoginQuery {
    ticket: Option<String>,
}

async fn login_handler(
    State(gate): State<Gate>,
    query: Result<Query<LoginQuery>, QueryRejection>,
) -> Response {
    let ticket = query.ok().and_then(|Query(q)| q.ticket).unwrap_or_default();
    let Some(session) = gate.redeem(&ticket) else {
        tracing::warn!("console link refused: unknown, used or expired ticket");
        return (
            StatusCode::UNAUTHORIZED,
            [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
            "this console link is used or expired: run `infinitetalk-batch console` for a new one\n",
        )
            .into_response();
    };
    tracing::info!("console session opened");
    let cookie = format!(
        "{SESSION_COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SEE_OTHER;
    let headers = resp.headers_mut();
    headers.insert(header::LOCATION, HeaderValue::from_static("/"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        headers.insert(header::SET_COOKIE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(listen: &str, callback: Option<&str>) -> Gate {
        Gate::new(GateConfig {
            token: AdminToken("ab".repeat(SECRET_BYTES)),
            listen: listen.parse().expect("addr"),
            callback_url: callback.map(|u| url::Url::parse(u).expect("url")),
            public_urls: vec![url::Url::parse("https://media.example:8443/m/").expect("url")],
        })
    }

    #[test]
    fn host_names_of_the_listener() {
        let g = gate("127.0.0.1:8686", Some("https://Batch.Example.com/it"));
        for ok in [
            "localhost",
            "localhost:8686",
            "LOCALHOST.:1",
            "127.0.0.1",
            "127.0.0.1:8686",
            "[::1]",
            "[::1]:8686",
            "batch.example.com",
            "batch.example.com:443",
            "media.example",
        ] {
            assert!(g.host_allowed(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:8686",
            "localhost.evil.example",
            "127.0.0.2",
            "10.0.0.1:8686",
            "2130706433",
            "user@localhost",
            "localhost:80:80",
            "[::1",
        ] {
            assert!(!g.host_allowed(bad), "{bad}");
        }
        let any = gate("0.0.0.0:8686", None);
        assert!(any.host_allowed("192.168.1.5:8686"));
        assert!(any.host_allowed("[fe80::1]:8686"));
        assert!(!any.host_allowed("rebound.example:8686"));
        assert!(!any.reading_is_open());
        assert!(g.reading_is_open());
        let lan = gate("192.168.1.5:8686", None);
        assert!(lan.host_allowed("192.168.1.5"));
        assert!(!lan.host_allowed("192.168.1.6"));
    }

    #[test]
    fn bearer_and_sessions() {
        let g = gate("127.0.0.1:8686", None);
        let mut h = HeaderMap::new();
        assert!(!g.authorized(&h));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("bearer {}", "ab".repeat(SECRET_BYTES)))
                .expect("header"),
        );
        assert!(g.authorized(&h));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer nope"),
        );
        assert!(!g.authorized(&h));

        let ticket = g.issue_ticket();
        let session = g.redeem(&ticket).expect("fresh ticket");
        assert!(g.redeem(&ticket).is_none(), "a ticket works once");
        assert!(g.redeem("").is_none());
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b; {SESSION_COOKIE}={session}")).expect("cookie"),
        );
        assert!(g.authorized(&h));
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("{SESSION_COOKIE}={ticket}")).expect("cookie"),
        );
        assert!(!g.authorized(&h));
    }

    #[test]
    fn sessions_and_tickets_are_bounded() {
        let g = gate("127.0.0.1:8686", None);
        let first = g.issue_ticket();
        for _ in 0..MAX_TICKETS {
            g.issue_ticket();
        }
        assert!(g.redeem(&first).is_none(), "the oldest ticket was dropped");
        for _ in 0..MAX_SESSIONS * 2 {
            let t = g.issue_ticket();
            g.redeem(&t).expect("ticket");
        }
        assert_eq!(lock(&g.0.sessions).len(), MAX_SESSIONS);
    }

    #[test]
    fn token_file_is_private_exclusive_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = load_or_create(dir.path()).expect("created");
        let path = token_path(dir.path());
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create(dir.path()).expect("read"), token);
        assert_eq!(read_token(dir.path()).expect("read"), token);
        assert!(!format!("{token:?}").contains(token.expose()));

        // Made private again if someone opened it up.
        std::fs::set_permissions(&path, Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(load_or_create(dir.path()).expect("read"), token);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // A symlink in its place is not followed.
        let other = tempfile::tempdir().expect("tempdir");
        let target = other.path().join("elsewhere");
        std::fs::write(&target, "cd".repeat(SECRET_BYTES)).expect("write");
        std::os::unix::fs::symlink(&target, token_path(other.path())).expect("symlink");
        assert!(load_or_create(other.path()).is_err());
        assert!(read_token(other.path()).is_err());

        // Garbage is refused, not replaced.
        std::fs::write(&path, "short\n").expect("write");
        assert!(matches!(
            load_or_create(dir.path()),
            Err(TokenError::Malformed { .. })
        ));
    }
}
