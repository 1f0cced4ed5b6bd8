//! The wire protocol under stress and abuse: malformed input, batches,
//! notifications, oversized lines, vanishing clients, many clients at once.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use modeld_e2e::{kind, model, names, Daemon};
use modeld_wire::Client;
use serde_json::{json, Value};

/// Sends one raw line and returns the one reply line, decoded.
fn exchange(client: &mut Client, line: &str) -> Value {
    client.send_line(line).unwrap();
    client.read_message().unwrap()
}

fn assert_alive(daemon: &Daemon, client: &mut Client) {
    let status = client
        .call_value("status", json!({}))
        .expect("same connection still usable");
    assert!(status["pid"].as_u64().is_some());
    daemon
        .call("status", json!({}))
        .expect("new connections still served");
}

#[test]
fn malformed_input_gets_errors_and_the_connection_survives() {
    let daemon = Daemon::start();
    let mut client = daemon.client();
    let cases: &[(&str, i64, &str)] = &[
        ("{not json", -32700, "parse_error"),
        ("[1,2", -32700, "parse_error"),
        ("42", -32600, "invalid_request"),
        ("\"hello\"", -32600, "invalid_request"),
        ("[]", -32600, "invalid_request"),
        (r#"{"id":1,"method":"status"}"#, -32600, "invalid_request"),
        (
            r#"{"jsonrpc":"1.0","id":1,"method":"status"}"#,
            -32600,
            "invalid_request",
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":5}"#,
            -32600,
            "invalid_request",
        ),
        (r#"{"jsonrpc":"2.0","id":1}"#, -32600, "invalid_request"),
        (
            r#"{"jsonrpc":"2.0","id":{},"method":"status"}"#,
            -32600,
            "invalid_request",
        ),
        (
            r#"{"jsonrpc":"2.0","id":1e999,"method":"status"}"#,
            -32600,
            "invalid_request",
        ),
        (
            r#"{"jsonrpc":"2.0","id":-1,"method":"status"}"#,
            -32600,
            "invalid_request",
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"status","params":7}"#,
            -32600,
            "invalid_request",
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"no.such"}"#,
            -32601,
            "method_not_found",
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"models.get","params":{"name":[]}}"#,
            -32602,
            "invalid_params",
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"models.get","params":{}}"#,
            -32602,
            "invalid_params",
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"status","params":{"x":1}}"#,
            -32602,
            "invalid_params",
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"models.register","params":["a"]}"#,
            -32602,
            "invalid_params",
        ),
    ];
    for (line, code, error_kind) in cases {
        let reply = exchange(&mut client, line);
        assert_eq!(reply["jsonrpc"], "2.0", "{line}");
        assert_eq!(reply["error"]["code"], *code, "{line}: {reply}");
        assert_eq!(
            reply["error"]["data"]["kind"], *error_kind,
            "{line}: {reply}"
        );
        assert_alive(&daemon, &mut client);
    }
}

#[test]
fn deeply_nested_input_is_refused_and_the_daemon_survives() {
    let daemon = Daemon::start();
    let mut client = daemon.client();
    for line in [
        format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
        format!("{}1{}", r#"{"a":"#.repeat(100_000), "}".repeat(100_000)),
    ] {
        let reply = exchange(&mut client, &line);
        let reply = if reply.is_array() {
            reply[0].clone()
        } else {
            reply
        };
        assert!(reply["error"]["code"].is_i64(), "{reply}");
        assert_alive(&daemon, &mut client);
    }
}

#[test]
fn binary_garbage_and_invalid_utf8_are_parse_errors() {
    let daemon = Daemon::start();
    let mut stream = UnixStream::connect(&daemon.socket).unwrap();
    stream
        .write_all(b"\x00\x01\xff\xfe garbage \x80\n")
        .unwrap();
    let mut client = daemon.client();
    // A fresh connection for the check; the garbage one must still answer too.
    assert_alive(&daemon, &mut client);
    stream
        .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":9,\"method\":\"status\"}\n")
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Requests on one connection run concurrently: replies may come in
    // either order, matched by id.
    let mut reader = std::io::BufReader::new(stream);
    let mut replies = Vec::new();
    for _ in 0..2 {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        replies.push(serde_json::from_str::<Value>(&line).unwrap());
    }
    assert!(
        replies
            .iter()
            .any(|r| r["error"]["data"]["kind"] == "parse_error"),
        "{replies:?}"
    );
    assert!(replies.iter().any(|r| r["id"] == 9), "{replies:?}");
}

#[test]
fn oversized_line_is_refused_with_the_limit() {
    let daemon = Daemon::start();
    let mut client = daemon.client();
    let huge = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"models.register","params":{{"name":"{}","repo":"a/b"}}}}"#,
        "x".repeat(2 << 20)
    );
    let reply = exchange(&mut client, &huge);
    assert_eq!(reply["error"]["data"]["kind"], "request_too_large");
    assert_eq!(reply["error"]["data"]["limit"], 1 << 20);
    assert_eq!(reply["error"]["data"]["field"], "server.max_request_bytes");
    assert_alive(&daemon, &mut client);
    assert!(names(&daemon.call("models.list", json!({})).unwrap()).is_empty());
}

/// Whatever part of a request makes its line too long, the reply names the
/// limit it broke and its value.
#[test]
fn an_oversized_generate_names_the_field_and_limit() {
    let daemon = Daemon::start();
    let mut client = daemon.client();
    for size in [(1 << 20) - 100, 1 << 20, 3 << 20] {
        let line = json!({
            "jsonrpc": "2.0", "id": 1, "method": "generate",
            "params": {"model": "m", "prompt": "p", "negative_prompt": "x".repeat(size)},
        });
        let reply = exchange(&mut client, &line.to_string());
        let data = &reply["error"]["data"];
        assert!(data["field"].is_string(), "{size}: {data}");
        assert!(data["limit"].is_u64(), "{size}: {data}");
        assert_alive(&daemon, &mut client);
    }
}

#[test]
fn batches_and_notifications_follow_the_spec() {
    let daemon = Daemon::start();
    let mut client = daemon.client();
    let reply = exchange(
        &mut client,
        r#"[{"jsonrpc":"2.0","id":1,"method":"status"},
            {"jsonrpc":"2.0","method":"models.register","params":{"name":"via-notification","repo":"a/b"}},
            {"jsonrpc":"2.0","id":"two","method":"nope"},
            17]"#
            .replace('\n', "")
            .as_str(),
    );
    let replies = reply.as_array().expect("batch reply is an array");
    assert_eq!(replies.len(), 3, "{reply}");
    assert_eq!(replies[0]["id"], 1);
    assert_eq!(replies[1]["error"]["code"], -32601);
    assert_eq!(replies[1]["id"], "two");
    assert_eq!(replies[2]["error"]["code"], -32600);
    // The notification ran, silently.
    assert_eq!(
        names(&daemon.call("models.list", json!({})).unwrap()),
        ["via-notification"]
    );
    // A batch of notifications only gets no reply at all.
    client
        .send_line(r#"[{"jsonrpc":"2.0","method":"status"}]"#)
        .unwrap();
    let next = exchange(
        &mut client,
        r#"{"jsonrpc":"2.0","id":"after","method":"status"}"#,
    );
    assert_eq!(next["id"], "after");
}

#[test]
fn vanishing_clients_harm_no_one() {
    let daemon = Daemon::start();
    for _ in 0..20 {
        // Half a request, then gone.
        let mut stream = UnixStream::connect(&daemon.socket).unwrap();
        stream
            .write_all(br#"{"jsonrpc":"2.0","id":1,"meth"#)
            .unwrap();
        drop(stream);
        // A whole request, gone before the reply.
        let mut stream = UnixStream::connect(&daemon.socket).unwrap();
        stream
            .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"vram\"}\n")
            .unwrap();
        drop(stream);
        // A subscriber that never reads and then leaves.
        let mut stream = UnixStream::connect(&daemon.socket).unwrap();
        stream
            .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"events.subscribe\"}\n")
            .unwrap();
        drop(stream);
    }
    let mut client = daemon.client();
    assert_alive(&daemon, &mut client);
    drop(client);
    // Every connection above has been cleaned up.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = daemon.call("status", json!({})).unwrap();
        if status["counts"]["connections"] == 1 && status["counts"]["subscriptions"] == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "connections leaked: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_hundred_concurrent_clients() {
    let daemon = Daemon::start();
    let socket = daemon.socket.clone();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(200));
    let clients: Vec<_> = (0..200)
        .map(|i| {
            let socket = socket.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut client = Client::connect(&socket).unwrap();
                client
                    .set_read_timeout(Some(Duration::from_secs(60)))
                    .unwrap();
                barrier.wait();
                let name = format!("m{i:03}");
                client.call_value("models.register", model(&name)).unwrap();
                let got = client
                    .call_value("models.get", json!({"name": name}))
                    .unwrap();
                assert_eq!(got["name"], name);
                client.call_value("status", json!({})).unwrap();
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client thread");
    }
    let listed = names(&daemon.call("models.list", json!({})).unwrap());
    assert_eq!(listed.len(), 200);
}

#[test]
fn pipelined_requests_on_one_connection_all_get_answers() {
    let daemon = Daemon::start();
    let mut stream = UnixStream::connect(&daemon.socket).unwrap();
    let mut batch = String::new();
    for id in 0..100 {
        batch.push_str(&format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"status\"}}\n"
        ));
    }
    stream.write_all(batch.as_bytes()).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let mut ids: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, (0..100).collect::<Vec<_>>());
}

#[test]
fn events_stream_registry_changes() {
    let daemon = Daemon::start();
    let mut subscriber = daemon.client();
    let mut events = subscriber.subscribe("events.subscribe", json!({})).unwrap();
    daemon.call("models.register", model("seen")).unwrap();
    daemon
        .call("models.remove", json!({"name": "seen"}))
        .unwrap();
    let first = events.next().unwrap().unwrap();
    assert_eq!(
        first,
        json!({"event": "model_registered", "name": "seen", "replaced": false})
    );
    let second = events.next().unwrap().unwrap();
    assert_eq!(second, json!({"event": "model_removed", "name": "seen"}));
    let id = events.id().clone();
    drop(events);
    let unsubscribed = subscriber
        .call_value("events.unsubscribe", json!([id]))
        .unwrap();
    assert_eq!(unsubscribed, true);
    let err = daemon
        .call("events.subscribe", json!({"bogus": 1}))
        .unwrap_err();
    assert_eq!(kind(&err), "invalid_params");
}

#[test]
fn batches_are_bounded_in_length_and_reply_size() {
    let daemon =
        Daemon::start_configured("[server]\nmax_batch = 4\nmax_reply_bytes = 65536\n", &[]);
    let mut client = daemon.client();
    let status = r#"{"jsonrpc":"2.0","id":1,"method":"status"}"#;
    let four = format!("[{}]", [status; 4].join(","));
    let reply = exchange(&mut client, &four);
    assert_eq!(reply.as_array().unwrap().len(), 4);
    let five = format!("[{}]", [status; 5].join(","));
    let reply = exchange(&mut client, &five);
    assert_eq!(
        reply["error"]["data"]["kind"], "request_too_large",
        "{reply}"
    );
    assert_eq!(reply["error"]["data"]["limit"], 4);
    // Half a million tiny items: one short error, not a reply per item.
    let huge = format!("[{}1]", "1,".repeat(500_000));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut client_reader(&daemon, &huge), &mut line).unwrap();
    assert!(line.len() < 1024, "{} bytes", line.len());
    assert!(line.contains("request_too_large"), "{line}");
    assert_alive(&daemon, &mut client);
}

/// Sends `line` on a fresh raw connection and returns a reader on it.
fn client_reader(daemon: &Daemon, line: &str) -> std::io::BufReader<UnixStream> {
    let mut stream = UnixStream::connect(&daemon.socket).unwrap();
    stream.write_all(line.as_bytes()).unwrap();
    stream.write_all(b"\n").unwrap();
    std::io::BufReader::new(stream)
}

#[test]
fn replies_over_the_reply_limit_are_refused() {
    let daemon =
        Daemon::start_configured("[server]\nmax_batch = 1000\nmax_reply_bytes = 65536\n", &[]);
    let mut client = daemon.client();
    let status = r#"{"jsonrpc":"2.0","id":1,"method":"status"}"#;
    let many = format!("[{}]", [status; 600].join(","));
    let reply = exchange(&mut client, &many);
    assert_eq!(
        reply["error"]["data"]["kind"], "request_too_large",
        "{reply}"
    );
    assert_eq!(reply["error"]["data"]["field"], "server.max_reply_bytes");
    assert_alive(&daemon, &mut client);
}

#[test]
fn slow_and_idle_clients_are_timed_out() {
    let daemon =
        Daemon::start_configured("[server]\nread_timeout_s = 1\nidle_timeout_s = 2\n", &[]);
    // A request that never finishes arriving.
    let mut slow = UnixStream::connect(&daemon.socket).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    slow.write_all(br#"{"jsonrpc":"2.0","#).unwrap();
    let mut reply = String::new();
    slow.read_to_string(&mut reply).unwrap();
    assert!(reply.contains("\"timeout\""), "{reply}");
    // A connection that says nothing at all.
    let mut idle = UnixStream::connect(&daemon.socket).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    idle.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(started.elapsed() >= Duration::from_secs(2));
    // A busy connection is not idle: a stream outlives the idle timeout.
    let mut client = daemon.client();
    let mut events = client.subscribe("events.subscribe", json!({})).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    daemon.call("models.register", model("late")).unwrap();
    let event = events.next().unwrap().unwrap();
    assert_eq!(event["event"], "model_registered");
}

#[test]
fn one_uid_cannot_take_every_connection() {
    let daemon = Daemon::start_configured(
        "[server]\nmax_connections = 8\nmax_connections_per_uid = 3\n",
        &[],
    );
    let held: Vec<Client> = (0..3).map(|_| admitted_client(&daemon)).collect();
    let mut refused = UnixStream::connect(&daemon.socket).unwrap();
    // A connection let in would never close: fail, rather than hang.
    refused
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut line = String::new();
    refused
        .read_to_string(&mut line)
        .expect("the fourth connection is refused and closed");
    assert!(line.contains("overloaded"), "{line}");
    assert!(line.contains("server.max_connections_per_uid"), "{line}");
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    daemon
        .call("status", json!({}))
        .expect("a slot is free again");
}

/// A connection the daemon let in, known by an answered call. The daemon
/// counts a closed connection until it reads the end of it, so the one
/// `wait_ready` used may still hold a slot: a connection made then may be
/// refused, and the slot comes free after.
fn admitted_client(daemon: &Daemon) -> Client {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut client = daemon.client();
        match client.call_value("status", json!({})) {
            Ok(_) => return client,
            Err(err) => assert!(
                std::time::Instant::now() < deadline,
                "no connection let in: {err}"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A generation request for `tokens` tokens of the endless model, as a line.
fn endless_generation(tokens: u32) -> String {
    json!({"jsonrpc": "2.0", "id": 1, "method": "generate",
           "params": {"model": "endless", "prompt": "x", "max_tokens": tokens}})
    .to_string()
}

/// Connects, asks for a generation of `tokens` tokens and never reads a
/// reply.
fn silent_client(daemon: &Daemon, tokens: u32) -> UnixStream {
    let mut silent = UnixStream::connect(&daemon.socket).unwrap();
    silent
        .write_all(format!("{}\n", endless_generation(tokens)).as_bytes())
        .unwrap();
    silent
}

/// Whether a generation is running.
fn generation_running(daemon: &Daemon) -> bool {
    let status = daemon.call("status", json!({})).unwrap();
    status["queue"]["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .any(|j| j["kind"] == "generate" && j["running"] == true)
}

/// A short generation on its own thread, with a generous limit on the wait
/// so that a stalled daemon fails the test instead of hanging it.
fn short_generation(daemon: &Daemon) -> Value {
    let mut client = Client::connect(&daemon.socket).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let params = json!({"model": "endless", "prompt": "y", "max_tokens": 5});
    let events = client
        .subscribe("generate", params)
        .expect("generate accepted")
        .collect::<Result<Vec<_>, _>>()
        .expect("the short generation finished");
    events.last().cloned().expect("a done event")
}

/// CPU time (clock ticks) of the daemon's thread named `name`.
fn thread_cpu_ticks(daemon: &Daemon, name: &str) -> Option<u64> {
    let tasks = format!("/proc/{}/task", daemon.pid());
    std::fs::read_dir(tasks).ok()?.flatten().find_map(|task| {
        let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
        if comm.trim() != name {
            return None;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
        // utime and stime are the 12th and 13th fields after the name.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    })
}

/// Waits until the daemon has filled `silent`'s socket and the model's
/// thread has stopped working on it: the bytes queued for the client and
/// the thread's CPU time both stop growing.
fn wait_until_stalled(daemon: &Daemon, silent: &UnixStream) {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut buffer = vec![0u8; 16 << 20];
    let mut last = (0, None);
    let mut same_since = std::time::Instant::now();
    loop {
        let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
        let queued = recv(silent.as_raw_fd(), &mut buffer, flags).unwrap_or(0);
        let now = (queued, thread_cpu_ticks(daemon, "model-endless"));
        if now != last {
            (last, same_since) = (now, std::time::Instant::now());
        } else if queued > 0 && same_since.elapsed() > Duration::from_millis(1500) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A client that asks for a generation and stops reading it cannot hold up
/// the queue: once it has taken nothing for `write_timeout_s` its
/// connection closes and its generation is cancelled, and the job queued
/// behind it runs.
#[test]
fn a_client_that_stops_reading_is_disconnected_and_the_queue_goes_on() {
    let daemon = Daemon::start_configured(
        "[server]\nwrite_timeout_s = 1\n[scheduler]\nmax_batch = 1\n",
        &[],
    );
    modeld_e2e::synthetic::register_endless_model(&daemon, "endless");
    let mut silent = silent_client(&daemon, 30_000);
    // The silent generation must be ahead in the queue: otherwise the short
    // one runs first, and the test then drains the silent one itself.
    while !generation_running(&daemon) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let done = short_generation(&daemon);
    assert_eq!(done["completion_tokens"], 5, "{done}");
    // The daemon closed the silent connection: what it sent, then the end.
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut sent = Vec::new();
    let closed = silent.read_to_end(&mut sent);
    let head = String::from_utf8_lossy(&sent[..sent.len().min(300)]).into_owned();
    assert!(
        closed.is_ok(),
        "the connection is still open; it got {head}"
    );
    assert!(head.contains("generate.token"), "{head}");
}

/// In a batch, a client that stops reading holds back only its own
/// sequence: another generation on the same model runs to its end while the
/// silent one is still running.
#[test]
fn a_client_that_stops_reading_holds_back_only_its_own_generation() {
    let daemon = Daemon::start_configured("[server]\nwrite_timeout_s = 3600\n", &[]);
    modeld_e2e::synthetic::register_endless_model(&daemon, "endless");
    // 4000 tokens of events are more than the buffers between the worker
    // and the socket hold, and leave the short generation KV room in the
    // batch (the model's estimate counts 4096 positions).
    let silent = silent_client(&daemon, 4000);
    wait_until_stalled(&daemon, &silent);
    let done = short_generation(&daemon);
    assert_eq!(done["completion_tokens"], 5, "{done}");
    assert!(
        generation_running(&daemon),
        "the silent generation still runs"
    );
    drop(silent);
}
