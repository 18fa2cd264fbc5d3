//! The admin API over its real Unix socket (and loopback TCP listener): entity tags as the
//! IoT Hub table says, filters, ordering and keyset paging over 10,000 devices, the actions,
//! the error shape, and hostile callers (wrong uid, no or wrong token, oversize and mistyped
//! bodies, malformed filters).

#[path = "common/admin.rs"]
mod admin_common;

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;

use admin_common::{error_code, tcp_request, unix_request, Api};
use fleetgw::admission::AdmissionMode;
use fleetgw::device_id::DeviceId;
use fleetgw::store::DeviceState;
use hyper::StatusCode;
use serde_json::{json, Value};

fn ids(range: std::ops::Range<usize>) -> impl Iterator<Item = String> {
    range.map(|i| format!("dev-{i:05}"))
}

#[tokio::test]
async fn etag_table_rows() {
    let api = Api::start(AdmissionMode::Approve, |_, _| {}).await;
    api.seed(ids(0..1), DeviceState::WaitingApproval).await;
    let etag = api.get("/devices/dev-00000").await.header("etag").unwrap();
    let patch = json!({"displayName": "pump"});
    // (method, exists, header, value, expected status)
    let rows: [(&str, bool, &str, &str, StatusCode); 16] = [
        // PATCH (the table's PUT rows, for an update; creation is by the device's request)
        ("PATCH", true, "", "", StatusCode::OK),
        ("PATCH", true, "if-match", "*", StatusCode::OK),
        ("PATCH", true, "if-match", "CURRENT", StatusCode::OK),
        (
            "PATCH",
            true,
            "if-match",
            "\"999\"",
            StatusCode::PRECONDITION_FAILED,
        ),
        (
            "PATCH",
            true,
            "if-none-match",
            "*",
            StatusCode::PRECONDITION_FAILED,
        ),
        (
            "PATCH",
            false,
            "if-match",
            "*",
            StatusCode::PRECONDITION_FAILED,
        ),
        (
            "PATCH",
            false,
            "if-match",
            "\"xyz\"",
            StatusCode::PRECONDITION_FAILED,
        ),
        ("PATCH", false, "", "", StatusCode::NOT_FOUND),
        // DELETE
        ("DELETE", false, "", "", StatusCode::NO_CONTENT),
        ("DELETE", false, "if-match", "*", StatusCode::NO_CONTENT),
        (
            "DELETE",
            false,
            "if-match",
            "\"xyz\"",
            StatusCode::NO_CONTENT,
        ),
        (
            "DELETE",
            true,
            "if-match",
            "\"999\"",
            StatusCode::PRECONDITION_FAILED,
        ),
        ("DELETE", true, "if-match", "CURRENT", StatusCode::OK),
        ("DELETE", true, "if-match", "*", StatusCode::OK),
        ("DELETE", true, "", "", StatusCode::OK),
        ("DELETE", true, "if-match", "\"\"", StatusCode::OK),
    ];
    for (i, (method, exists, header, value, want)) in rows.into_iter().enumerate() {
        let id = if exists {
            let id = format!("row-{i}");
            api.seed([id.clone()], DeviceState::WaitingApproval).await;
            id
        } else {
            format!("absent-{i}")
        };
        let current = api.get(&format!("/devices/{id}")).await.header("etag");
        let value = if value == "CURRENT" {
            current.clone().unwrap()
        } else {
            value.to_string()
        };
        let headers: Vec<(&str, &str)> = if header.is_empty() {
            vec![]
        } else {
            vec![(header, value.as_str())]
        };
        let body = (method == "PATCH").then_some(&patch);
        let r = api
            .send(method, &format!("/devices/{id}"), &headers, body)
            .await;
        assert_eq!(
            r.status,
            want,
            "row {i}: {method} exists={exists} {header}: {value}: {:?}",
            r.json()
        );
        let after = api.store.device(&DeviceId::parse(&id).unwrap()).unwrap();
        match (method, r.status) {
            ("PATCH", StatusCode::OK) => {
                let after = after.unwrap();
                assert_eq!(after.display_name.as_deref(), Some("pump"), "row {i}");
                assert_eq!(r.header("etag").unwrap(), format!("\"{}\"", after.etag));
                assert_ne!(r.header("etag"), current, "row {i}: the etag changed");
            }
            ("DELETE", StatusCode::OK) => assert!(after.is_none(), "row {i}: deleted"),
            (_, StatusCode::PRECONDITION_FAILED) if exists => {
                let after = after.unwrap();
                assert_eq!(after.display_name, None, "row {i}: nothing changed");
                assert_eq!(error_code(&r), "PreconditionFailed");
            }
            _ => {}
        }
    }
    // GET with If-None-Match of the current etag: 304.
    let r = unix_request(
        &api.socket,
        "GET",
        "/devices/dev-00000",
        &[("if-none-match", &etag)],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
}

#[tokio::test]
async fn actions_follow_the_state_machine() {
    let api = Api::start(AdmissionMode::Approve, |_, _| {}).await;
    api.seed(["wait-1".to_string()], DeviceState::WaitingApproval)
        .await;
    let r = api.send("POST", "/devices/wait-1/approve", &[], None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
    assert_eq!(r.json()["state"], "approved");
    assert_eq!(r.json()["approved"], true);
    let r = api.send("POST", "/devices/wait-1/block", &[], None).await;
    assert_eq!(r.json()["status"], "blocked");
    let r = api.send("POST", "/devices/wait-1/approve", &[], None).await;
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (StatusCode::CONFLICT, "DeviceBlocked")
    );
    let r = api.send("POST", "/devices/wait-1/unblock", &[], None).await;
    assert_eq!(r.json()["status"], "waitingApproval");
    let r = api.send("POST", "/devices/wait-1/unblock", &[], None).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = api
        .send(
            "PATCH",
            "/devices/wait-1",
            &[],
            Some(&json!({"approved": true, "enabled": false})),
        )
        .await;
    assert_eq!(
        (r.json()["state"].as_str(), r.json()["enabled"].as_bool()),
        (Some("approved"), Some(false))
    );
    let stored = api
        .store
        .device(&DeviceId::parse("wait-1").unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(stored.state, DeviceState::Approved);
    assert!(!stored.enabled);
    let r = api.send("POST", "/devices/nope/approve", &[], None).await;
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (StatusCode::NOT_FOUND, "NotFound")
    );
}

#[tokio::test]
async fn unblock_outside_approve_mode_requests_again() {
    let api = Api::start(AdmissionMode::Open, |_, _| {}).await;
    api.seed(["blk-1".to_string()], DeviceState::Blocked).await;
    let r = api.send("POST", "/devices/blk-1/unblock", &[], None).await;
    assert_eq!(r.json()["state"], "requested");
}

async fn walk(
    api: &Api,
    first: &str,
    mut during: impl FnMut(usize) -> Option<Vec<String>>,
) -> Vec<Value> {
    let mut all = Vec::new();
    let mut next = Some(first.to_string());
    let mut pages = 0;
    while let Some(link) = next.take() {
        let r = api.get(&link).await;
        assert_eq!(r.status, StatusCode::OK, "{link}: {:?}", r.json());
        let v = r.json();
        all.extend(v["value"].as_array().unwrap().iter().cloned());
        next = v["nextLink"].as_str().map(str::to_string);
        pages += 1;
        if let Some(new) = during(pages) {
            api.seed(new, DeviceState::WaitingApproval).await;
        }
    }
    all
}

#[tokio::test]
async fn filter_orderby_and_paging_over_10000_devices() {
    let api = Api::start(AdmissionMode::Approve, |_, _| {}).await;
    api.seed(ids(0..5000), DeviceState::WaitingApproval).await;
    api.seed(ids(5000..10_000), DeviceState::Delivered).await;

    // Default page and order.
    let v = api.get("/devices").await.json();
    assert_eq!(v["value"].as_array().unwrap().len(), 25);
    assert_eq!(v["value"][0]["id"], "dev-00000");
    assert!(v["nextLink"].as_str().unwrap().starts_with("/devices?"));

    // A walk in id order while devices are added between pages: each device present from
    // the start is listed exactly once, and none twice.
    let mut added = 0usize;
    let all = walk(&api, "/devices?maxpagesize=100", |page| {
        (page % 10 == 0).then(|| {
            added += 1;
            // Ids before and after the cursor.
            vec![
                format!("aaa-{added}"),
                format!("dev-{:05}x", page * 100),
                format!("zzz-{added}"),
            ]
        })
    })
    .await;
    let listed: Vec<&str> = all.iter().map(|d| d["id"].as_str().unwrap()).collect();
    let unique: HashSet<&str> = listed.iter().copied().collect();
    assert_eq!(unique.len(), listed.len(), "a device was listed twice");
    for id in ids(0..10_000) {
        assert!(unique.contains(id.as_str()), "{id} missing from the walk");
    }

    // Filtered and ordered by a field that is not the key, descending.
    let all = walk(
        &api,
        "/devices?%24filter=status%20eq%20%27provisioned%27%20and%20not%20startswith(id,%27dev-09%27)&%24orderby=id%20desc&maxpagesize=100",
        |_| None,
    )
    .await;
    assert_eq!(all.len(), 4000);
    assert_eq!(all[0]["id"], "dev-08999");
    assert!(all.iter().all(|d| d["provisioned"] == true));
    let mut sorted = all.clone();
    sorted.sort_by(|a, b| b["id"].as_str().cmp(&a["id"].as_str()));
    assert_eq!(all, sorted);

    // Order by status (ties broken by id ascending), walking while adding.
    let all = walk(
        &api,
        "/devices?orderby=status%20desc&maxpagesize=100&filter=startswith(id,%27dev-%27)",
        |page| (page == 3).then(|| vec!["dev-00000a".to_string()]),
    )
    .await;
    let listed: HashSet<&str> = all.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(listed.len(), all.len());
    assert!(listed.len() >= 10_000);
    assert_eq!(all[0]["status"], "waitingApproval");
    assert_eq!(all[0]["id"], "dev-00000");
    assert_eq!(all.last().unwrap()["status"], "provisioned");
}

#[tokio::test]
async fn bad_queries_name_what_is_wrong() {
    let api = Api::start(AdmissionMode::Approve, |_, _| {}).await;
    let r = api.get("/devices?%24filter=id%20eqq%20%27x%27").await;
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (StatusCode::BAD_REQUEST, "InvalidFilter")
    );
    let m = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(m.contains("position 3") && m.contains("eqq"), "{m}");
    for (q, code) in [
        ("maxpagesize=0", "InvalidPageSize"),
        ("maxpagesize=101", "InvalidPageSize"),
        ("maxpagesize=ten", "InvalidPageSize"),
        ("%24orderby=colour", "InvalidOrderBy"),
        ("%24skiptoken=forged", "InvalidSkipToken"),
        ("filter=((((", "InvalidFilter"),
    ] {
        let r = api.get(&format!("/devices?{q}")).await;
        assert_eq!(
            (r.status, error_code(&r)),
            (StatusCode::BAD_REQUEST, code.to_string()),
            "{q}"
        );
    }
    // A skiptoken made for one order is refused for another.
    api.seed(ids(0..3), DeviceState::WaitingApproval).await;
    let link = api.get("/devices?maxpagesize=1").await.json()["nextLink"]
        .as_str()
        .unwrap()
        .to_string();
    let r = api.get(&format!("{link}&%24orderby=status")).await;
    assert_eq!(error_code(&r), "InvalidSkipToken");
}

#[tokio::test]
async fn hostile_bodies_and_paths_get_the_error_shape() {
    let api = Api::start(AdmissionMode::Approve, |_, _| {}).await;
    api.seed(["dev-1".to_string()], DeviceState::WaitingApproval)
        .await;
    // Oversize body: 413, nothing changed.
    let big = vec![b' '; (1 << 20) + 10];
    let r = unix_request(
        &api.socket,
        "PATCH",
        "/devices/dev-1",
        &[("content-type", "application/json")],
        Some(big),
    )
    .await;
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge")
    );
    // Wrong content type: 415.
    let r = unix_request(
        &api.socket,
        "PATCH",
        "/devices/dev-1",
        &[("content-type", "text/plain")],
        Some(b"{\"enabled\":false}".to_vec()),
    )
    .await;
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedMediaType")
    );
    // Unknown fields and wrong types: 400 naming the field.
    let r = api
        .send(
            "PATCH",
            "/devices/dev-1",
            &[],
            Some(&json!({"state": "delivered"})),
        )
        .await;
    assert_eq!(error_code(&r), "InvalidBody");
    let r = api
        .send(
            "PATCH",
            "/devices/dev-1",
            &[],
            Some(&json!({"enabled": "yes"})),
        )
        .await;
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("enabled"));
    let r = api
        .send(
            "PATCH",
            "/devices/dev-1",
            &[],
            Some(&json!({"displayName": "x".repeat(200)})),
        )
        .await;
    assert_eq!(error_code(&r), "InvalidDisplayName");
    let stored = api
        .store
        .device(&DeviceId::parse("dev-1").unwrap())
        .unwrap()
        .unwrap();
    assert!(
        stored.enabled
            && stored.display_name.is_none()
            && stored.state == DeviceState::WaitingApproval
    );
    // Unknown ids, ids that break the rules, unknown paths and methods.
    for (m, p, s) in [
        ("GET", "/devices/nope", StatusCode::NOT_FOUND),
        ("GET", "/devices/..%2F..%2Fetc", StatusCode::NOT_FOUND),
        ("GET", "/nothing-here", StatusCode::NOT_FOUND),
        ("PUT", "/devices/dev-1", StatusCode::METHOD_NOT_ALLOWED),
    ] {
        let r = unix_request(&api.socket, m, p, &[], None).await;
        assert_eq!(r.status, s, "{m} {p}");
        error_code(&r);
    }
    // Every response has a request id, successes too, and they differ.
    let a = api.get("/devices").await.header("x-ms-request-id").unwrap();
    let b = api.get("/devices").await.header("x-ms-request-id").unwrap();
    assert_ne!(a, b);
}

#[tokio::test]
async fn socket_is_0660_and_a_stale_socket_is_replaced_but_a_live_one_is_not() {
    let api = Api::start(AdmissionMode::Approve, |_, _| {}).await;
    let mode = std::fs::metadata(&api.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    // A second server on the same path refuses to take it over.
    let opts = fleetgw::admin::AdminOptions {
        socket: api.socket.clone(),
        group: "x".into(),
        read_group: String::new(),
        listen: None,
        token_file: None,
    };
    let parts = fleetgw::admin::AdminParts::new(api.store.clone(), AdmissionMode::Approve);
    let e = fleetgw::admin::AdminServer::start(&opts, parts.clone())
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("already running"), "{e}");
    // After shutdown the path is free; a leftover socket file nobody serves is replaced.
    let mut api = api;
    api.server.take().unwrap().shutdown().await;
    let _leftover = std::os::unix::net::UnixListener::bind(&api.socket).unwrap();
    drop(_leftover);
    let s = fleetgw::admin::AdminServer::start(&opts, parts)
        .await
        .unwrap();
    assert_eq!(api.get("/status").await.status, StatusCode::OK);
    s.shutdown().await;
}

#[tokio::test]
async fn tcp_listener_needs_the_bearer_token() {
    let token = "0123456789abcdef0123456789abcdef-secret";
    let api = Api::start(AdmissionMode::Approve, |dir, o| {
        let path = dir.join("admin.token");
        std::fs::write(&path, format!("{token}\n")).unwrap();
        o.listen = Some("127.0.0.1:0".parse().unwrap());
        o.token_file = Some(path);
    })
    .await;
    let addr = api.server.as_ref().unwrap().tcp_addr().unwrap();
    api.seed(["dev-1".to_string()], DeviceState::WaitingApproval)
        .await;
    let bearer = format!("Bearer {token}");
    let cases: [(&[(&str, &str)], StatusCode); 5] = [
        (&[], StatusCode::UNAUTHORIZED),
        (
            &[("authorization", "Bearer wrong")],
            StatusCode::UNAUTHORIZED,
        ),
        (
            &[(
                "authorization",
                "Bearer 0123456789abcdef0123456789abcdef-secreT",
            )],
            StatusCode::UNAUTHORIZED,
        ),
        (&[("authorization", token)], StatusCode::UNAUTHORIZED),
        (&[("authorization", bearer.as_str())], StatusCode::OK),
    ];
    for (headers, want) in cases {
        let r = tcp_request(addr, "GET", "/devices/dev-1", headers).await;
        assert_eq!(r.status, want, "{headers:?}");
        if want != StatusCode::OK {
            error_code(&r);
            assert!(r.json().get("value").is_none() && r.json().get("id").is_none());
        }
        // The health view names the store's directory: not for a caller without the token.
        let r = tcp_request(addr, "GET", "/health", headers).await;
        assert_eq!(r.status, want, "GET /health {headers:?}");
        assert_eq!(r.json().get("store").is_some(), want == StatusCode::OK);
        let r = tcp_request(addr, "POST", "/devices/dev-1/block", headers).await;
        assert_eq!(r.status, want, "POST {headers:?}");
        if want != StatusCode::OK {
            let stored = api
                .store
                .device(&DeviceId::parse("dev-1").unwrap())
                .unwrap()
                .unwrap();
            assert_eq!(
                stored.state,
                DeviceState::WaitingApproval,
                "a refused caller changed nothing"
            );
        }
    }
}

#[tokio::test]
async fn a_short_token_file_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    std::fs::write(&path, "short").unwrap();
    let store = fleetgw::store::Store::open(&dir.path().join("s"), &Default::default()).unwrap();
    let e = fleetgw::admin::AdminServer::start(
        &fleetgw::admin::AdminOptions {
            socket: dir.path().join("a.sock"),
            group: "x".into(),
            read_group: String::new(),
            listen: Some("127.0.0.1:0".parse().unwrap()),
            token_file: Some(path),
        },
        fleetgw::admin::AdminParts::new(store, AdmissionMode::Approve),
    )
    .await
    .err()
    .unwrap();
    assert!(
        e.to_string().contains("admin.token_file") && e.to_string().contains("at least 32"),
        "{e}"
    );
}

#[tokio::test]
async fn status_and_metrics() {
    let api = Api::start(AdmissionMode::Approve, |_, _| {}).await;
    api.seed(ids(0..3), DeviceState::WaitingApproval).await;
    api.seed(ids(3..5), DeviceState::Delivered).await;
    let v = api.get("/status").await.json();
    assert_eq!(v["devices"]["waitingApproval"], 3);
    assert_eq!(v["devices"]["provisioned"], 2);
    assert_eq!(v["devices"]["blocked"], 0);
    assert_eq!(v["admissionMode"], "approve");
    let r = api.get("/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
    let sample = |name: &str, label: Option<(&str, &str)>| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    };
    assert_eq!(
        sample("fleetgw_devices", Some(("status", "waitingApproval"))),
        Some(3.0)
    );
    assert_eq!(
        sample("fleetgw_devices", Some(("status", "provisioned"))),
        Some(2.0)
    );
    assert_eq!(sample("fleetgw_outbox_messages", None), Some(0.0));
    assert!(sample("fleetgw_provision_delivered_total", None).is_some());
    assert!(sample("fleetgw_upstream_connects_total", None).is_some());
    // Every family has HELP and TYPE.
    assert!(scrape.docs.contains_key("fleetgw_devices"));
}

/// Root only: a process of another uid is refused by its peer credentials even when the
/// socket's mode lets it connect, a read-group member reads but cannot write, and the CLI
/// reports both with exit 77.
#[tokio::test]
async fn peer_credentials_decide_per_uid() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "SKIPPED peer_credentials_decide_per_uid: needs root to run a child under another uid"
        );
        return;
    }
    // gid 65534 is "nogroup" on Debian; the read group.
    let api = Api::start(AdmissionMode::Approve, |_, o| {
        o.group = "root".into();
        o.read_group = "nogroup".into();
    })
    .await;
    api.seed(["dev-1".to_string()], DeviceState::WaitingApproval)
        .await;
    // Let other uids reach the socket: the file mode is the first fence, the peer
    // credentials the second, tested here.
    for p in [api.dir.path(), &api.dir.path().join("run")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&api.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let bin = env!("CARGO_BIN_EXE_fleetgw");
    let run = |uid: u32, gid: u32, args: &[&str]| {
        let socket = api.socket.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        async move {
            tokio::task::spawn_blocking(move || {
                use std::os::unix::process::CommandExt;
                std::process::Command::new(bin)
                    .args(&args)
                    .arg("--socket")
                    .arg(&socket)
                    .uid(uid)
                    .gid(gid)
                    .env_remove("RUST_LOG")
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    // Neither group: 403 -> exit 77, nothing changed.
    let out = run(65_533, 65_533, &["devices", "show", "dev-1"]).await;
    assert_eq!(
        out.status.code(),
        Some(77),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin.group"));
    let out = run(65_533, 65_533, &["devices", "block", "dev-1"]).await;
    assert_eq!(out.status.code(), Some(77));
    // Read group: reads, cannot write.
    let out = run(65_533, 65_534, &["devices", "show", "dev-1", "--json"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["id"], "dev-1");
    let out = run(65_533, 65_534, &["devices", "approve", "dev-1"]).await;
    assert_eq!(out.status.code(), Some(77));
    assert!(String::from_utf8_lossy(&out.stderr).contains("may only read"));
    let stored = api
        .store
        .device(&DeviceId::parse("dev-1").unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(stored.state, DeviceState::WaitingApproval);
    // Write group by its primary gid: approves.
    let out = run(65_533, 0, &["devices", "approve", "dev-1", "--json"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = api
        .store
        .device(&DeviceId::parse("dev-1").unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(stored.state, DeviceState::Approved);
    // A write-group member is not root: no private key.
    let out = run(65_533, 0, &["devices", "export", "dev-1", "--out", "/tmp"]).await;
    assert_eq!(
        out.status.code(),
        Some(77),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("only root"));
    // With the socket back at 0660 root:root, another uid cannot even connect: exit 77 too.
    std::fs::set_permissions(&api.socket, std::fs::Permissions::from_mode(0o660)).unwrap();
    let out = run(65_533, 65_533, &["status"]).await;
    assert_eq!(
        out.status.code(),
        Some(77),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The list benchmark of the issue: p99 of `GET /devices?maxpagesize=100` over 10,000 devices
/// (one client, pages walked in a loop) and requests/s from 32 concurrent clients. Prints the
/// figures; run with `cargo test --release --test admin_api -- --ignored --nocapture list_benchmark`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: prints figures, asserts nothing about timing"]
async fn list_benchmark() {
    let api = Api::start(AdmissionMode::Approve, |_, _| {}).await;
    api.seed(ids(0..10_000), DeviceState::WaitingApproval).await;
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let mut link = "/devices?maxpagesize=100".to_string();
    for _ in 0..1000 {
        let t = std::time::Instant::now();
        let r = api.get(&link).await;
        hist.record(t.elapsed().as_micros() as u64).unwrap();
        assert_eq!(r.json()["value"].as_array().unwrap().len(), 100);
        link = r.json()["nextLink"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| "/devices?maxpagesize=100".to_string());
    }
    println!(
        "GET /devices?maxpagesize=100 over 10000 devices, 1 client, 1000 requests: p50 {} us, p99 {} us, max {} us",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.max()
    );
    let socket = api.socket.clone();
    let per_client = 100;
    let t = std::time::Instant::now();
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let socket = socket.clone();
            tokio::spawn(async move {
                // Each client walks the pages from the first.
                let mut lat = Vec::with_capacity(per_client);
                let mut path = "/devices?maxpagesize=100".to_string();
                for _ in 0..per_client {
                    let s = std::time::Instant::now();
                    let r = unix_request(&socket, "GET", &path, &[], None).await;
                    assert_eq!(r.status, StatusCode::OK);
                    lat.push(s.elapsed().as_micros() as u64);
                    path = r.json()["nextLink"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| "/devices?maxpagesize=100".to_string());
                }
                lat
            })
        })
        .collect();
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    for task in tasks {
        for l in task.await.unwrap() {
            hist.record(l).unwrap();
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "32 concurrent clients walking pages of 100, {} requests (connection per request): {:.0} req/s, p50 {} us, p99 {} us",
        32 * per_client,
        f64::from(32 * per_client as u32) / secs,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99)
    );
}

/// A provisioned device whose key the gateway generated, with its (test) PEM key stored.
async fn provisioned_with_key(api: &Api, id: &str) {
    let mut rec = fleetgw::store::DeviceRecord::new(DeviceId::parse(id).unwrap(), "json", 1);
    rec.state = DeviceState::Delivered;
    rec.provision.gateway_key = true;
    rec.provision.certificate_id = Some("cert-1".into());
    rec.provision.certificate_pem =
        Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into());
    rec.provision.thing_name = Some(id.into());
    api.store.put_device(&rec).await.unwrap();
    api.store
        .put_secret(
            &rec.id,
            b"-----BEGIN PRIVATE KEY-----\nMIIC\n-----END PRIVATE KEY-----\n",
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn credentials_show_the_certificate_and_the_key_only_to_root() {
    let group_key = b"0123456789abcdef0123456789abcdef";
    let token = "0123456789abcdef0123456789abcdef-secret";
    let api = Api::start_parts(
        AdmissionMode::SymmetricKey,
        |p| p.group_key = Some(fleetgw::identity::Secret::new(group_key.to_vec())),
        |dir, o| {
            let path = dir.join("admin.token");
            std::fs::write(&path, token).unwrap();
            o.listen = Some("127.0.0.1:0".parse().unwrap());
            o.token_file = Some(path);
        },
    )
    .await;
    provisioned_with_key(&api, "dev-1").await;
    let v = api.get("/devices/dev-1/credentials").await.json();
    assert_eq!(v["x509"]["certificateId"], "cert-1");
    assert!(v["x509"]["certificatePem"]
        .as_str()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    assert!(v.get("privateKey").is_none(), "not asked for: {v}");
    use base64::Engine as _;
    let expected = base64::engine::general_purpose::STANDARD.encode(
        fleetgw::admission::sas::derive_device_key(group_key, "dev-1"),
    );
    assert_eq!(v["symmetricKey"]["primaryKey"], expected.as_str());
    assert!(
        !v.to_string().contains("0123456789abcdef0123456789abcdef"),
        "the group key never leaves"
    );
    // Root on the socket (this test runs as root when the peer test does).
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let v = api
            .get("/devices/dev-1/credentials?includePrivateKey=true")
            .await
            .json();
        assert!(
            v["privateKey"].as_str().unwrap().contains("PRIVATE KEY"),
            "{v}"
        );
    }
    // The TCP token is never root.
    let addr = api.server.as_ref().unwrap().tcp_addr().unwrap();
    let bearer = format!("Bearer {token}");
    let r = tcp_request(
        addr,
        "GET",
        "/devices/dev-1/credentials?includePrivateKey=true",
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (StatusCode::FORBIDDEN, "Forbidden")
    );
    assert!(!String::from_utf8_lossy(&r.body).contains("PRIVATE KEY"));
    let r = api
        .get("/devices/dev-1/credentials?includePrivateKey=maybe")
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = api.get("/devices/nope/credentials").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn cli_export_writes_0600_files_and_never_overwrites() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED cli_export_writes_0600_files_and_never_overwrites: the private key is for root only");
        return;
    }
    let api = Api::start(AdmissionMode::Approve, |_, _| {}).await;
    provisioned_with_key(&api, "dev-1").await;
    let out_dir = api.dir.path().join("export");
    std::fs::create_dir(&out_dir).unwrap();
    let run = |args: Vec<String>| {
        let socket = api.socket.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_fleetgw"))
                    .args(&args)
                    .arg("--socket")
                    .arg(&socket)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let args = vec![
        "devices".into(),
        "export".into(),
        "dev-1".into(),
        "--out".into(),
        out_dir.display().to_string(),
    ];
    let out = run(args.clone()).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (name, needle) in [
        ("dev-1.crt", "BEGIN CERTIFICATE"),
        ("dev-1.key", "PRIVATE KEY"),
    ] {
        let path = out_dir.join(name);
        assert!(std::fs::read_to_string(&path).unwrap().contains(needle));
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    // Again: the files exist, exit 73, contents untouched, no temporary left behind.
    std::fs::write(out_dir.join("dev-1.key"), "mine").unwrap();
    let out = run(args).await;
    assert_eq!(
        out.status.code(),
        Some(73),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists"));
    assert_eq!(
        std::fs::read_to_string(out_dir.join("dev-1.key")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 2);
}

#[tokio::test]
async fn device_groups_save_filters_and_list_their_devices() {
    let api = Api::start(AdmissionMode::Approve, |_, _| {}).await;
    api.seed(ids(0..150), DeviceState::WaitingApproval).await;
    api.seed(ids(150..160), DeviceState::Blocked).await;
    let body = json!({"displayName": "Waiting", "filter": "status eq 'waitingApproval'"});
    let r = api
        .send("PUT", "/deviceGroups/waiting", &[], Some(&body))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
    let r = api
        .send("PUT", "/deviceGroups/waiting", &[], Some(&body))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    // A malformed filter is refused when saved.
    let bad = json!({"displayName": "x", "filter": "status eq"});
    let r = api.send("PUT", "/deviceGroups/bad", &[], Some(&bad)).await;
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (StatusCode::BAD_REQUEST, "InvalidFilter")
    );
    assert_eq!(
        api.get("/deviceGroups/bad").await.status,
        StatusCode::NOT_FOUND
    );
    // Its devices, walked page by page; an extra filter in the query is ignored.
    let mut seen = Vec::new();
    let mut link =
        Some("/deviceGroups/waiting/devices?maxpagesize=40&filter=id%20eq%20%27x%27".to_string());
    while let Some(l) = link.take() {
        let v = api.get(&l).await.json();
        seen.extend(
            v["value"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["id"].as_str().unwrap().to_string()),
        );
        link = v["nextLink"].as_str().map(str::to_string);
        if let Some(l) = &link {
            assert!(
                l.starts_with("/deviceGroups/waiting/devices?") && !l.contains("filter"),
                "{l}"
            );
        }
    }
    assert_eq!(seen, ids(0..150).collect::<Vec<_>>());
    // PATCH the filter: the group now lists the blocked ones.
    let r = api
        .send(
            "PATCH",
            "/deviceGroups/waiting",
            &[],
            Some(&json!({"filter": "status eq 'blocked'"})),
        )
        .await;
    assert_eq!(r.json()["displayName"], "Waiting");
    let v = api
        .get("/deviceGroups/waiting/devices?maxpagesize=100")
        .await
        .json();
    assert_eq!(v["value"].as_array().unwrap().len(), 10);
    assert_eq!(
        api.get("/deviceGroups").await.json()["value"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let r = api.send("DELETE", "/deviceGroups/waiting", &[], None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        api.get("/deviceGroups/waiting/devices").await.status,
        StatusCode::NOT_FOUND
    );
}

fn sas_for(group_key: &[u8], device: &str) -> fleetgw::admission::Attestation {
    use fleetgw::admission::sas;
    let key = sas::derive_device_key(group_key, device);
    let uri = sas::registration_resource_uri("0ne00ABC123", &DeviceId::parse(device).unwrap());
    fleetgw::admission::Attestation::SymmetricKey {
        sas: sas::generate_sas(
            &uri,
            &key,
            fleetgw::clock::unix_secs() + 600,
            Some(sas::REGISTRATION_KEY_NAME),
        ),
    }
}

/// Symmetric-key groups made through the API admit devices at once, stop when disabled or
/// deleted, and show their keys only to writers.
#[tokio::test]
async fn symmetric_key_groups_take_effect_without_restart() {
    use fleetgw::admission::{Admission, AdmissionOptions, Decision, EnrollmentSet};
    let set = EnrollmentSet::default();
    let config_key = b"config-group-key-0123456789abcdef".to_vec();
    let admission = Admission::new(AdmissionOptions {
        mode: AdmissionMode::SymmetricKey,
        group_key: Some(fleetgw::identity::Secret::new(config_key.clone())),
        enrollments: set.clone(),
        ..AdmissionOptions::default()
    })
    .unwrap();
    let api = Api::start_parts(
        AdmissionMode::SymmetricKey,
        |p| p.enrollments = Some(set.clone()),
        |_, _| {},
    )
    .await;
    let id = DeviceId::parse("dev-1").unwrap();
    let now = fleetgw::clock::unix_secs();
    // The config's key admits; an unknown group's key does not.
    assert_eq!(
        admission.decide(&id, &sas_for(&config_key, "dev-1"), now),
        Decision::Admit
    );
    let r = api
        .send(
            "PUT",
            "/enrollmentGroups/line-2",
            &[],
            Some(&json!({"displayName": "Line 2", "attestation": {"type": "symmetricKey"}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
    assert_eq!(
        r.json()["attestation"]["symmetricKey"]["primaryKey"],
        "[redacted]"
    );
    let keys = api.get("/enrollmentGroups/line-2/keys").await.json();
    use base64::Engine as _;
    let primary = base64::engine::general_purpose::STANDARD
        .decode(keys["primaryKey"].as_str().unwrap())
        .unwrap();
    let secondary = base64::engine::general_purpose::STANDARD
        .decode(keys["secondaryKey"].as_str().unwrap())
        .unwrap();
    assert_eq!(primary.len(), 32);
    assert_ne!(primary, secondary);
    for key in [&primary, &secondary] {
        assert_eq!(
            admission.decide(&id, &sas_for(key, "dev-1"), now),
            Decision::Admit
        );
    }
    // Disabled: refused; enabled again: admitted; deleted: refused.
    let r = api
        .send(
            "PATCH",
            "/enrollmentGroups/line-2",
            &[],
            Some(&json!({"enabled": false})),
        )
        .await;
    assert_eq!(r.json()["enabled"], false);
    assert!(matches!(
        admission.decide(&id, &sas_for(&primary, "dev-1"), now),
        Decision::Reject { .. }
    ));
    api.send(
        "PATCH",
        "/enrollmentGroups/line-2",
        &[],
        Some(&json!({"enabled": true})),
    )
    .await;
    assert_eq!(
        admission.decide(&id, &sas_for(&primary, "dev-1"), now),
        Decision::Admit
    );
    // Given keys are checked.
    let r = api
        .send(
            "PUT",
            "/enrollmentGroups/weak",
            &[],
            Some(&json!({"displayName": "w", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "c2hvcnQ="}}})),
        )
        .await;
    assert_eq!(error_code(&r), "InvalidKey");
    let r = api
        .send("DELETE", "/enrollmentGroups/line-2", &[], None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(matches!(
        admission.decide(&id, &sas_for(&primary, "dev-1"), now),
        Decision::Reject { .. }
    ));
    assert_eq!(
        admission.decide(&id, &sas_for(&config_key, "dev-1"), now),
        Decision::Admit
    );
    assert_eq!(
        api.get("/enrollmentGroups/line-2").await.status,
        StatusCode::NOT_FOUND
    );
}

/// An x509 group's CA counts only after proof of possession: a certificate the CA signed
/// with CN = the verification code. A certificate of another CA, or with another CN, fails.
#[tokio::test]
async fn x509_groups_need_proof_of_possession() {
    use fleetgw::admission::{Admission, AdmissionOptions, EnrollmentSet};
    use fleetgw::identity::{CertificateAuthority, KeyType};
    let set = EnrollmentSet::default();
    let config_ca = CertificateAuthority::generate("config CA").unwrap();
    let admission = Admission::new(AdmissionOptions {
        mode: AdmissionMode::X509,
        trusted_ca_pem: Some(config_ca.cert_pem().to_string()),
        enrollments: set.clone(),
        ..AdmissionOptions::default()
    })
    .unwrap();
    let api = Api::start_parts(
        AdmissionMode::X509,
        |p| p.enrollments = Some(set.clone()),
        |_, _| {},
    )
    .await;
    let group_ca = CertificateAuthority::generate("line 3 CA").unwrap();
    let (device_cert, _) = group_ca
        .issue_client("dev-3", KeyType::EcdsaP256, 30)
        .unwrap();
    let id = DeviceId::parse("dev-3").unwrap();
    let now = fleetgw::clock::unix_secs();
    let connects = || admission.authenticate_connect(&id, None, None, Some(&device_cert), now);
    assert!(connects().is_err());

    let r = api
        .send(
            "PUT",
            "/enrollmentGroups/line-3",
            &[],
            Some(&json!({"displayName": "Line 3", "attestation": {"type": "x509"}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(group_ca.cert_pem());
    let r = api
        .send(
            "PUT",
            "/enrollmentGroups/line-3/certificates/primary",
            &[],
            Some(&json!({"certificate": b64, "verified": true})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
    assert_eq!(
        r.json()["verified"],
        false,
        "verified only by proof of possession"
    );
    assert_eq!(
        r.json()["info"]["sha1Thumbprint"].as_str().unwrap().len(),
        40
    );
    assert!(connects().is_err(), "an unverified CA admits nobody");
    // A leaf certificate is not a CA.
    let r = api
        .send(
            "PUT",
            "/enrollmentGroups/line-3/certificates/secondary",
            &[],
            Some(&json!({"certificate": device_cert})),
        )
        .await;
    assert_eq!(error_code(&r), "InvalidCertificate");

    let code = api
        .send(
            "POST",
            "/enrollmentGroups/line-3/certificates/primary/generateVerificationCode",
            &[],
            None,
        )
        .await
        .json()["verificationCode"]
        .as_str()
        .unwrap()
        .to_string();
    let verify = |cert: String| {
        let body = json!({"certificate": cert});
        let api = &api;
        async move {
            api.send(
                "POST",
                "/enrollmentGroups/line-3/certificates/primary/verify",
                &[],
                Some(&body),
            )
            .await
        }
    };
    let other_ca = CertificateAuthority::generate("impostor").unwrap();
    let (forged, _) = other_ca.issue_client(&code, KeyType::EcdsaP256, 1).unwrap();
    assert_eq!(error_code(&verify(forged).await), "VerificationFailed");
    let (wrong_cn, _) = group_ca
        .issue_client("not-the-code", KeyType::EcdsaP256, 1)
        .unwrap();
    assert_eq!(error_code(&verify(wrong_cn).await), "VerificationFailed");
    assert!(connects().is_err());
    let (proof, _) = group_ca.issue_client(&code, KeyType::EcdsaP256, 1).unwrap();
    let r = verify(proof).await;
    assert_eq!(r.json()["verified"], true, "{:?}", r.json());
    connects().expect("the verified group CA admits its devices");
    let r = api
        .get("/enrollmentGroups/line-3/certificates/primary")
        .await;
    assert_eq!(r.json()["verified"], true);
    assert!(r.json().get("verificationCode").is_none());
    // Removing the certificate withdraws it.
    api.send(
        "DELETE",
        "/enrollmentGroups/line-3/certificates/primary",
        &[],
        None,
    )
    .await;
    assert!(connects().is_err());
    // An x509 group has no keys.
    assert_eq!(
        api.get("/enrollmentGroups/line-3/keys").await.status,
        StatusCode::CONFLICT
    );
}

/// `fleetgw enrollment` against the API: create, keys, list, disable, delete.
#[tokio::test]
async fn cli_enrollment_verbs() {
    let api = Api::start(AdmissionMode::SymmetricKey, |_, _| {}).await;
    let run = |args: &[&str]| {
        let socket = api.socket.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_fleetgw"))
                    .args(&args)
                    .arg("--socket")
                    .arg(&socket)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let out = run(&["enrollment", "create", "line-1", "--name", "Line 1"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Line 1"));
    let out = run(&["enrollment", "keys", "line-1"]).await;
    let keys: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(keys["primaryKey"].as_str().unwrap().len() >= 40);
    let out = run(&["enrollment", "list"]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("line-1") && !table.contains(keys["primaryKey"].as_str().unwrap()),
        "{table}"
    );
    let out = run(&["enrollment", "disable", "line-1", "--json"]).await;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["enabled"], false);
    let out = run(&["enrollment", "create", "bad", "--type", "tpm"]).await;
    assert_eq!(out.status.code(), Some(70));
    assert!(String::from_utf8_lossy(&out.stderr).contains("symmetricKey"));
    let out = run(&["enrollment", "delete", "line-1"]).await;
    assert_eq!(out.status.code(), Some(0));
    let out = run(&["enrollment", "show", "line-1"]).await;
    assert_eq!(out.status.code(), Some(70));
}

/// `/openapi.json` describes the running server: every documented path and method is routed
/// (no framework 404/405), documented schemas exist, and the routes we serve are documented.
#[tokio::test]
async fn openapi_document_matches_the_running_server() {
    let api = Api::start(AdmissionMode::Approve, |_, _| {}).await;
    let doc = api.get("/openapi.json").await.json();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().unwrap();
    let mut operations = 0;
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            operations += 1;
            let concrete = path
                .replace("{entry}", "primary")
                .replace("{id}", "no-such-thing");
            let body = ["put", "patch", "post"]
                .contains(&method.as_str())
                .then(|| json!({}));
            let r = api
                .send(&method.to_uppercase(), &concrete, &[], body.as_ref())
                .await;
            assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            if r.status == StatusCode::NOT_FOUND {
                let m = r.json()["error"]["message"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                assert!(
                    !m.starts_with("no such resource"),
                    "{method} {path} is not routed: {m}"
                );
            }
            // Every documented status is a number and every referenced schema exists.
            for (status, resp) in op["responses"].as_object().unwrap() {
                status.parse::<u16>().unwrap();
                if let Some(r) = resp["content"]["application/json"]["schema"]["$ref"].as_str() {
                    let name = r.trim_start_matches("#/components/schemas/");
                    assert!(
                        doc["components"]["schemas"][name].is_object(),
                        "{method} {path}: {r}"
                    );
                }
            }
        }
    }
    assert!(operations >= 30, "{operations} operations");
    for (method, path) in [
        ("get", "/devices"),
        ("patch", "/devices/{id}"),
        ("post", "/devices/{id}/reprovision"),
        ("get", "/operations/{id}"),
        ("get", "/devices/{id}/credentials"),
        ("post", "/enrollmentGroups/{id}/certificates/{entry}/verify"),
        ("get", "/deviceGroups/{id}/devices"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
    ] {
        assert!(
            paths[path][method].is_object(),
            "{method} {path} undocumented"
        );
    }
    let view = &doc["components"]["schemas"]["DeviceView"]["properties"];
    for field in [
        "id",
        "displayName",
        "status",
        "etag",
        "connection",
        "lastError",
    ] {
        assert!(view[field].is_object(), "DeviceView.{field}");
    }
}

/// Root only: a local user who may not even use the API opens 100 idle connections; they
/// cannot take the slots the operator needs (at most 8 per user are kept).
#[tokio::test]
async fn one_user_cannot_exhaust_the_socket() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED one_user_cannot_exhaust_the_socket: needs root to run a child under another uid");
        return;
    }
    let api = Api::start(AdmissionMode::Approve, |_, _| {}).await;
    for p in [api.dir.path(), &api.dir.path().join("run")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&api.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let script = "import socket,sys,time\nconns=[]\nfor i in range(100):\n    s=socket.socket(socket.AF_UNIX)\n    s.connect(sys.argv[1])\n    conns.append(s)\nprint('ready',flush=True)\ntime.sleep(60)\n";
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&api.socket)
        .uid(65_533)
        .gid(65_533)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let stdout = child.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line
    });
    let line = tokio::time::timeout(std::time::Duration::from_secs(20), ready)
        .await
        .expect("the flood connects")
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let answered =
        tokio::time::timeout(std::time::Duration::from_secs(3), api.get("/status")).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let r = answered.expect("the operator is answered while another user holds 100 connections");
    assert_eq!(r.status, StatusCode::OK);
}
