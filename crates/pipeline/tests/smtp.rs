//! The SMTP handler against a real SMTP server: Python's aiosmtpd, delivering into a
//! Maildir. Needs `python3 -m pip install aiosmtpd`; fails (never skips) without it.

mod common;

use common::*;
use drover_core::Status;
use drover_testkit::free_port;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn aiosmtpd(maildir: &std::path::Path, tls: &[&std::path::Path]) -> (Server, u16) {
    let port = free_port();
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")]);
    if let [cert, key] = tls {
        cmd.arg("--tlscert").arg(cert).arg("--tlskey").arg(key);
    }
    let child = cmd
        .args(["-c", "aiosmtpd.handlers.Mailbox"])
        .arg(maildir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 must be installed to run the SMTP test");
    let mut server = Server(child);
    let up = wait_for(Duration::from_secs(15), || {
        if let Ok(Some(status)) = server.0.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            let _ = server.0.stderr.take().map(|mut e| e.read_to_string(&mut err));
            panic!("aiosmtpd exited ({status}): {err}\ninstall it with: python3 -m pip install aiosmtpd");
        }
        std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
    })
    .await;
    assert!(up.is_some(), "aiosmtpd did not listen on {port} within 15 s");
    (server, port)
}

fn mails(maildir: &std::path::Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(maildir.join("new")) else { return Vec::new() };
    rd.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok()).collect()
}

#[tokio::test]
async fn alert_email_reaches_a_real_smtp_server_with_the_templated_subject() {
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("Maildir");
    let (_server, port) = aiosmtpd(&maildir, &[]).await;
    let cfg = config(&format!(
        "[handlers.mail]\ntype = \"smtp\"\naddress = \"127.0.0.1:{port}\"\ntls = \"none\"\n\
         from = \"drover <drover@example.org>\"\nto = [\"ops@example.org\", \"oncall@example.org\"]\n\
         subject_template = \"[{{{{ .check.status_name }}}}] {{{{ .entity.name }}}}/{{{{ .check.name }}}} ({{{{ .entity.labels.env | default \\\"none\\\" }}}})\"\n\
         body_template = \"{{{{ .check.output }}}}\\noccurrences: {{{{ .check.occurrences }}}}\"\n\
         filters = [\"is_incident\"]\n"
    ));
    let ctx = FakeContext::new();
    let p = start(&ctx, cfg);
    p.submit(ctx.record("web1", "disk", Status::Ok, &["mail"]));
    p.submit(ctx.record("web1", "disk", Status::Critical, &["mail"]));

    let mail = wait_for(Duration::from_secs(20), || mails(&maildir).into_iter().next())
        .await
        .unwrap_or_else(|| panic!("no mail delivered; stats {:?}, dead {:?}", p.stats(), p.dead_letters()));
    assert!(mail.contains("Subject: [CRITICAL] web1/disk (none)"), "{mail}");
    assert!(mail.contains("To: ops@example.org, oncall@example.org"), "{mail}");
    assert!(mail.contains("disk is CRITICAL"), "{mail}");
    assert!(mail.contains("occurrences: 1"), "{mail}");
    // The OK event before it was filtered (not an incident): exactly one mail.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mails(&maildir).len(), 1);
    assert_eq!(p.stats().handlers["mail"].delivered, 1);
}

#[tokio::test]
async fn starttls_mail_is_delivered_to_a_relay_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("Maildir");
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert.cert.pem()).unwrap();
    std::fs::write(&key_file, cert.signing_key.serialize_pem()).unwrap();
    let (_server, port) = aiosmtpd(&maildir, &[&cert_file, &key_file]).await;

    let handler = |name: &str, ca: Option<&std::path::Path>| {
        let ca = ca.map(|p| format!("ca_file = \"{}\"\n", p.display())).unwrap_or_default();
        format!(
            "[handlers.{name}]\ntype = \"smtp\"\naddress = \"127.0.0.1:{port}\"\ntls = \"starttls\"\n{ca}\
             from = \"drover@example.org\"\nto = [\"ops@example.org\"]\nmax_attempts = 1\n\
             subject_template = \"via {name}\"\n"
        )
    };
    let cfg = config(&(handler("trusted", Some(&cert_file)) + &handler("untrusted", None)));
    let ctx = FakeContext::new();
    let p = start(&ctx, cfg);
    p.submit(ctx.record("web1", "disk", Status::Critical, &["trusted", "untrusted"]));

    let mail = wait_for(Duration::from_secs(20), || mails(&maildir).into_iter().next())
        .await
        .unwrap_or_else(|| panic!("no mail over STARTTLS; dead letters {:?}", p.dead_letters()));
    assert!(mail.contains("Subject: via trusted"), "{mail}");
    // Without the CA the certificate is refused and nothing goes out in clear text.
    let dead = wait_for(Duration::from_secs(20), || p.dead_letters().into_iter().next()).await.expect("dead letter");
    assert_eq!(dead.handler, "untrusted");
    assert_eq!(mails(&maildir).len(), 1);
}
