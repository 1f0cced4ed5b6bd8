//! The registry through the daemon: validation, durability across restarts
//! and `kill -9`, and concurrent writers.

use modeld_e2e::{kind, model, names, Daemon};
use serde_json::json;

#[test]
fn register_list_get_remove_round_trip() {
    let daemon = Daemon::start();
    let reply = daemon
        .call(
            "models.register",
            json!({"name": "llama", "repo": "meta-llama/Llama-3.2-1B", "revision": "v1",
                   "files": ["*.safetensors"], "cache": "custom:/data/hf", "estimated_size": 1234}),
        )
        .unwrap();
    assert_eq!(reply["replaced"], false);
    assert_eq!(reply["model"]["cache"], "custom:/data/hf");
    let got = daemon.call("models.get", json!({"name": "llama"})).unwrap();
    assert_eq!(got, reply["model"]);
    assert_eq!(got["revision"], "v1");
    assert_eq!(got["estimated_size"], 1234);

    let err = daemon.call("models.register", model("llama")).unwrap_err();
    assert_eq!(kind(&err), "already_exists");
    let mut replacement = model("llama");
    replacement["replace"] = json!(true);
    let reply = daemon.call("models.register", replacement).unwrap();
    assert_eq!(reply["replaced"], true);
    assert_eq!(reply["model"]["registered_at"], got["registered_at"]);

    daemon
        .call("models.remove", json!({"name": "llama"}))
        .unwrap();
    let err = daemon
        .call("models.get", json!({"name": "llama"}))
        .unwrap_err();
    assert_eq!(kind(&err), "not_found");
    let err = daemon
        .call("models.remove", json!({"name": "llama"}))
        .unwrap_err();
    assert_eq!(kind(&err), "not_found");
}

#[test]
fn validation_errors_name_field_and_limit() {
    let daemon = Daemon::start();
    let cases = [
        (json!({"name": "../etc", "repo": "a/b"}), "name"),
        (json!({"name": "ok", "repo": "a/b/c"}), "repo"),
        (
            json!({"name": "ok", "repo": "a/b", "revision": "../../x"}),
            "revision",
        ),
        (
            json!({"name": "ok", "repo": "a/b", "files": ["../x"]}),
            "files[0]",
        ),
        (
            json!({"name": "ok", "repo": "a/b", "local_path": "rel/path"}),
            "local_path",
        ),
        (
            json!({"name": "ok", "repo": "a/b", "cache": "elsewhere"}),
            "cache",
        ),
        (
            json!({"name": "ok", "repo": "a/b", "estimated_size": "big"}),
            "estimated_size",
        ),
        (json!({"name": "ok"}), "repo"),
        (json!({"repo": "a/b"}), "name"),
        (
            json!({"name": "ok", "repo": "a/b", "colour": "red"}),
            "colour",
        ),
        (json!({"name": "x".repeat(65), "repo": "a/b"}), "name"),
    ];
    for (params, field) in cases {
        let err = daemon.call("models.register", params.clone()).unwrap_err();
        assert_eq!(kind(&err), "invalid_params", "{params}");
        let modeld_wire::ClientError::Rpc(obj) = &err else {
            panic!("{err}")
        };
        assert_eq!(obj.code, -32602);
        let data = obj.data.as_ref().unwrap();
        assert_eq!(data["field"], field, "{params}: {err}");
    }
    let err = daemon
        .call(
            "models.register",
            json!({"name": "x".repeat(65), "repo": "a/b"}),
        )
        .unwrap_err();
    let modeld_wire::ClientError::Rpc(obj) = &err else {
        panic!()
    };
    assert_eq!(obj.data.as_ref().unwrap()["limit"], 64);
    assert!(names(&daemon.call("models.list", json!({})).unwrap()).is_empty());
}

#[test]
fn registrations_survive_graceful_restart_and_kill_9() {
    let mut daemon = Daemon::start();
    daemon.call("models.register", model("a")).unwrap();
    daemon.call("models.register", model("b")).unwrap();
    daemon.stop();
    daemon.spawn();
    assert_eq!(
        names(&daemon.call("models.list", json!({})).unwrap()),
        ["a", "b"]
    );

    daemon.call("models.remove", json!({"name": "a"})).unwrap();
    daemon.call("models.register", model("c")).unwrap();
    // Acknowledged means flushed: no graceful stop needed.
    daemon.kill9();
    daemon.spawn();
    assert_eq!(
        names(&daemon.call("models.list", json!({})).unwrap()),
        ["b", "c"]
    );
}

#[test]
fn kill_9_during_concurrent_writes_leaves_a_readable_store() {
    let mut daemon = Daemon::start();
    let socket = daemon.socket.clone();
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut acknowledged = Vec::new();
                let Ok(mut client) = modeld_wire::Client::connect(&socket) else {
                    return acknowledged;
                };
                for i in 0.. {
                    let name = format!("w{writer}-{i}");
                    match client.call_value("models.register", model(&name)) {
                        Ok(_) => acknowledged.push(name),
                        Err(_) => break,
                    }
                }
                acknowledged
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    daemon.kill9();
    let acknowledged: Vec<String> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(
        !acknowledged.is_empty(),
        "no write was acknowledged before the kill"
    );

    daemon.spawn();
    let stored = names(&daemon.call("models.list", json!({})).unwrap());
    for name in &acknowledged {
        assert!(stored.contains(name), "acknowledged {name} was lost");
    }
    // The store is still writable after the crash.
    daemon
        .call("models.register", model("after-crash"))
        .unwrap();
}

#[test]
fn local_only_model_is_accepted() {
    let daemon = Daemon::start();
    let reply = daemon
        .call(
            "models.register",
            json!({"name": "mine", "local_path": "/models/mine"}),
        )
        .unwrap();
    assert_eq!(reply["model"]["repo"], json!(null));
    assert_eq!(reply["model"]["local_path"], "/models/mine");
}

#[test]
fn registration_checks_the_target_cache_and_its_space() {
    let daemon = Daemon::start();
    let err = daemon
        .call(
            "models.register",
            json!({"name": "slow", "repo": "org/m", "cache": "secondary"}),
        )
        .unwrap_err();
    assert_eq!(kind(&err), "invalid_params");
    let modeld_wire::ClientError::Rpc(obj) = &err else {
        panic!()
    };
    assert_eq!(obj.data.as_ref().unwrap()["field"], "cache", "{err}");
    assert!(err.to_string().contains("cache.secondary"), "{err}");
    assert_eq!(
        kind(
            &daemon
                .call("models.get", json!({"name": "slow"}))
                .unwrap_err()
        ),
        "not_found"
    );

    let reply = daemon
        .call(
            "models.register",
            json!({"name": "small", "repo": "org/m", "estimated_size": 1000}),
        )
        .unwrap();
    let space = &reply["space"];
    assert_eq!(space["status"], "sufficient", "{reply}");
    assert_eq!(space["needed_bytes"], 1000);
    assert_eq!(space["path"], json!(daemon.hf_cache()));
    let available = space["available_bytes"].as_u64().unwrap();
    assert!(available > 1000);

    // Fits, but would leave less than 10% free.
    let tight = available / 100 * 95;
    let reply = daemon
        .call(
            "models.register",
            json!({"name": "tight", "repo": "org/m", "estimated_size": tight}),
        )
        .unwrap();
    assert_eq!(reply["space"]["status"], "warning", "{reply}");
    let out = daemon.ctl(&[
        "register",
        "tight2",
        "--repo",
        "org/m",
        "--size",
        &tight.to_string(),
    ]);
    assert!(out.status.success());
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(
        warning.contains("warning") && warning.contains("free"),
        "{warning}"
    );

    // Cannot fit at all: refused with the numbers, nothing registered.
    let huge = 1u64 << 49;
    let err = daemon
        .call(
            "models.register",
            json!({"name": "huge", "repo": "org/m", "estimated_size": huge}),
        )
        .unwrap_err();
    assert_eq!(kind(&err), "insufficient_space", "{err}");
    let modeld_wire::ClientError::Rpc(obj) = &err else {
        panic!()
    };
    let data = obj.data.as_ref().unwrap();
    assert_eq!(data["needed_bytes"], huge);
    assert!(data["available_bytes"].is_u64());
    assert_eq!(data["path"], json!(daemon.hf_cache()));
    assert_eq!(
        kind(
            &daemon
                .call("models.get", json!({"name": "huge"}))
                .unwrap_err()
        ),
        "not_found"
    );

    // Files already on disk need no space; a local-only model gets no check.
    let local = daemon.register_fixture("tiny-llama");
    let reply = daemon
        .call(
            "models.register",
            json!({"name": "present", "repo": "org/m", "local_path": local, "estimated_size": huge}),
        )
        .unwrap();
    assert_eq!(reply["space"]["needed_bytes"], 0, "{reply}");
    assert_eq!(reply["space"]["status"], "sufficient");
    let reply = daemon
        .call(
            "models.register",
            json!({"name": "mine", "local_path": local, "estimated_size": 1000}),
        )
        .unwrap();
    assert!(reply["space"].is_null(), "{reply}");
}
