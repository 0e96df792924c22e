//! The agent link and the API over TLS, with a self-signed certificate made by openssl.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// A self-signed certificate for 127.0.0.1 / localhost: (cert.pem, key.pem).
fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let st = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        // CA:FALSE: rustls refuses a CA certificate used as the server's own (webpki CaUsedAsEndEntity).
        .args(["-subj", "/CN=drover-test", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is installed by scripts/test.sh");
    assert!(st.status.success(), "openssl: {}", String::from_utf8_lossy(&st.stderr));
    (cert, key)
}

#[test]
fn agents_and_ctl_talk_to_a_tls_server_only_when_they_trust_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let conf = dir.path().join("conf.d");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("c.toml"),
        "[checks.secure]\ncommand = \"echo over tls\"\nsubscriptions = [\"s\"]\ninterval_secs = 1\n",
    )
    .unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _server = Proc::spawn(
        &[
            "server",
            "--config-dir",
            conf.to_str().unwrap(),
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "--listen",
            &listen,
            "--admin-token",
            ADMIN,
            "--agent-token",
            AGENT,
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        dir.path().join("server.log"),
    );
    let ctl = |args: &[&str], ca: bool| {
        let mut c = Command::new(drover_bin());
        c.args(["ctl", "--server", &format!("https://{listen}"), "--token", ADMIN]);
        if ca {
            c.args(["--ca-file", cert.to_str().unwrap()]);
        }
        c.args(args).output().unwrap()
    };
    wait_for(T, "TLS server answering", || {
        ctl(&["entities", "list", "--format", "json"], true).status.success().then_some(())
    });

    let wss = format!("wss://{listen}");
    let _trusted = Proc::spawn(
        &[
            "agent",
            "--server",
            &wss,
            "--name",
            "trusted",
            "--subscriptions",
            "s",
            "--token",
            AGENT,
            "--api-listen",
            "",
            "--ca-file",
            cert.to_str().unwrap(),
        ],
        dir.path().join("trusted.log"),
    );
    let _untrusted = Proc::spawn(
        &[
            "agent",
            "--server",
            &wss,
            "--name",
            "untrusted",
            "--subscriptions",
            "s",
            "--token",
            AGENT,
            "--api-listen",
            "",
        ],
        dir.path().join("untrusted.log"),
    );
    let ev = wait_for(T, "result over wss", || {
        let out = ctl(&["events", "get", "trusted", "secure", "--format", "json"], true);
        out.status.success().then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap())
    });
    assert_eq!(ev["output"].as_str().unwrap().trim(), "over tls");

    let out = ctl(&["entities", "list", "--format", "json"], true);
    let ents: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = ents.as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"trusted"));
    assert!(!names.contains(&"untrusted"), "an agent that does not trust the certificate never connects: {names:?}");

    let out = ctl(&["entities", "list"], false);
    assert!(!out.status.success(), "ctl without the CA refuses the self-signed server");
    // Plain HTTP to the TLS port gets nothing usable.
    assert!(ureq::get(&format!("http://{listen}/health")).call().is_err());
}
