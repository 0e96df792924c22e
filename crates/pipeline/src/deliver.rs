//! One delivery attempt of one event to one handler, per handler type; and mutators.

use crate::config::{CompiledHandler, Mutator};
use crate::template::{Escape, Template};
use crate::{KEEPALIVE, metrics_out, process};
use drover_core::pipeline::{HandlerType, SmtpTls};
use drover_core::{Entity, Event, MetricPoint};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use serde_json::Value;
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// What a handler works on. Shared by every handler the event goes to.
#[derive(Debug, Clone)]
pub struct Job {
    pub event: Arc<Event>,
    pub entity: Option<Arc<Entity>>,
    pub view: Arc<Value>,
}

static DEFAULT_SUBJECT: LazyLock<Template> = LazyLock::new(|| {
    Template::parse("{{ .check.status_name }} {{ .entity.name }}/{{ .check.name }}").expect("valid template")
});
static DEFAULT_BODY: LazyLock<Template> = LazyLock::new(|| {
    Template::parse(
        "{{ .check.output }}\n\nEntity:      {{ .entity.name }}\nCheck:       {{ .check.name }}\n\
         Status:      {{ .check.status_name }} ({{ .check.action }})\nOccurrences: {{ .check.occurrences }}\n",
    )
    .expect("valid template")
});

/// A handler with its long-lived clients.
pub struct Runtime {
    pub compiled: Arc<CompiledHandler>,
    http: Option<ureq::Agent>,
    smtp: Option<AsyncSmtpTransport<Tokio1Executor>>,
}

impl Runtime {
    pub fn new(compiled: Arc<CompiledHandler>) -> Result<Runtime, String> {
        let timeout = Duration::from_secs(compiled.spec.timeout_secs);
        let http = matches!(compiled.spec.kind, HandlerType::Http | HandlerType::Influxdb).then(|| {
            ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(true).build().into()
        });
        let smtp = match &compiled.smtp {
            Some(s) => Some(smtp_transport(s, timeout)?),
            None => None,
        };
        Ok(Runtime { compiled, http, smtp })
    }

    pub fn name(&self) -> &str {
        &self.compiled.spec.name
    }

    /// One attempt: mutate, then send. Err carries a one-line reason.
    pub async fn deliver(&self, job: &Job) -> Result<(), String> {
        let spec = &self.compiled.spec;
        let timeout = Duration::from_secs(spec.timeout_secs);
        let send = async {
            match spec.kind {
                HandlerType::Pipe => {
                    let payload = self.payload(job).await?;
                    process::run(spec.command.as_deref().unwrap_or_default(), &payload, timeout).await.map(|_| ())
                }
                HandlerType::Tcp => {
                    let payload = self.payload(job).await?;
                    tcp_send(spec.address.as_deref().unwrap_or_default(), &payload).await
                }
                HandlerType::Udp => {
                    let payload = self.payload(job).await?;
                    udp_send(spec.address.as_deref().unwrap_or_default(), &payload).await
                }
                HandlerType::Http => {
                    let body = match &self.compiled.body {
                        Some(t) => t.render(&job.view, Escape::Json).into_bytes(),
                        None => self.payload(job).await?,
                    };
                    self.post(spec.url.as_deref().unwrap_or_default(), body, "application/json").await
                }
                HandlerType::Smtp => self.mail(job).await,
                HandlerType::Graphite => {
                    let lines = metrics_out::graphite_lines(
                        spec.prefix.as_deref(),
                        &job.event.entity,
                        &job.event.check,
                        metric_points(job),
                    );
                    if lines.is_empty() {
                        return Ok(());
                    }
                    tcp_send(spec.address.as_deref().unwrap_or_default(), lines.as_bytes()).await
                }
                HandlerType::Influxdb => {
                    let lines = metrics_out::influx_lines(&job.event.entity, &job.event.check, metric_points(job));
                    if lines.is_empty() {
                        return Ok(());
                    }
                    self.post(spec.url.as_deref().unwrap_or_default(), lines.into_bytes(), "text/plain; charset=utf-8")
                        .await
                }
                // Sets are expanded before anything is queued.
                HandlerType::Set => Ok(()),
            }
        };
        // The mutator has its own timeout inside; this bounds the whole attempt, and
        // dropping a pipe run kills its process group.
        let budget = timeout + self.mutator_timeout();
        match tokio::time::timeout(budget, send).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {} s", budget.as_secs())),
        }
    }

    fn mutator_timeout(&self) -> Duration {
        match &self.compiled.mutator {
            Mutator::Command { timeout_secs, .. } => Duration::from_secs(*timeout_secs),
            _ => Duration::ZERO,
        }
    }

    /// The handler payload: the event view as JSON, the check output, or a mutator
    /// command's stdout.
    pub async fn payload(&self, job: &Job) -> Result<Vec<u8>, String> {
        mutate(&self.compiled.mutator, job).await
    }

    async fn post(&self, url: &str, body: Vec<u8>, default_content_type: &str) -> Result<(), String> {
        let agent = self.http.clone().ok_or("no HTTP client")?;
        let url = url.to_string();
        let headers = self.compiled.spec.headers.clone();
        let content_type = default_content_type.to_string();
        // ureq is blocking; concurrency is already bounded by the handler's semaphore.
        tokio::task::spawn_blocking(move || {
            let mut req = agent.post(&url);
            if !headers.keys().any(|k| k.eq_ignore_ascii_case("content-type")) {
                req = req.header("Content-Type", &content_type);
            }
            for (k, v) in &headers {
                req = req.header(k, v);
            }
            match req.send(&body[..]) {
                Ok(_) => Ok(()),
                Err(ureq::Error::StatusCode(code)) => Err(format!("POST {url}: HTTP {code}")),
                Err(e) => Err(format!("POST {url}: {e}")),
            }
        })
        .await
        .map_err(|e| format!("HTTP task failed: {e}"))?
    }

    async fn mail(&self, job: &Job) -> Result<(), String> {
        let (Some(transport), Some(s)) = (&self.smtp, &self.compiled.smtp) else { return Err("no SMTP client".into()) };
        let subject = self.compiled.subject.as_ref().unwrap_or(&DEFAULT_SUBJECT).render(&job.view, Escape::None);
        let body = match (&self.compiled.body, &self.compiled.spec.mutator) {
            (Some(t), _) => t.render(&job.view, Escape::None),
            (None, Some(_)) => String::from_utf8_lossy(&self.payload(job).await?).into_owned(),
            (None, None) => DEFAULT_BODY.render(&job.view, Escape::None),
        };
        let mut builder = lettre::Message::builder()
            .from(s.from.clone())
            // Subjects come from check output; a newline there must not end the header.
            .subject(subject.replace(['\r', '\n'], " "))
            .header(lettre::message::header::ContentType::TEXT_PLAIN);
        for to in &s.to {
            builder = builder.to(to.clone());
        }
        let message = builder.body(body).map_err(|e| format!("building mail: {e}"))?;
        transport.send(message).await.map(|_| ()).map_err(|e| format!("smtp {}:{}: {e}", s.host, s.port))
    }
}

fn smtp_transport(
    s: &crate::config::SmtpSettings,
    timeout: Duration,
) -> Result<AsyncSmtpTransport<Tokio1Executor>, String> {
    use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
    let tls = |wrap: fn(TlsParameters) -> Tls| -> Result<Tls, String> {
        let mut params = TlsParameters::builder(s.host.clone());
        if let Some(pem) = &s.ca_pem {
            params = params.add_root_certificate(Certificate::from_pem(pem).map_err(|e| format!("ca_file: {e}"))?);
        }
        Ok(wrap(params.build_rustls().map_err(|e| format!("smtp {}: {e}", s.host))?))
    };
    let tls = match s.tls {
        SmtpTls::None => Tls::None,
        // Required, not opportunistic: a stripped STARTTLS must not send credentials in clear.
        SmtpTls::Starttls => tls(Tls::Required)?,
        SmtpTls::Tls => tls(Tls::Wrapper)?,
    };
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(s.host.as_str())
        .port(s.port)
        .tls(tls)
        .timeout(Some(timeout));
    if let Some((u, p)) = &s.credentials {
        builder = builder.credentials(lettre::transport::smtp::authentication::Credentials::new(u.clone(), p.clone()));
    }
    Ok(builder.build())
}

/// Points a metrics handler sends: the check's, or for keepalives the agent's system
/// metrics kept on the entity.
fn metric_points(job: &Job) -> &[MetricPoint] {
    if job.event.metrics.is_empty()
        && job.event.check == KEEPALIVE
        && let Some(e) = &job.entity
    {
        return &e.metrics;
    }
    &job.event.metrics
}

pub async fn mutate(mutator: &Mutator, job: &Job) -> Result<Vec<u8>, String> {
    match mutator {
        Mutator::Json => serde_json::to_vec(&*job.view).map_err(|e| e.to_string()),
        Mutator::OnlyCheckOutput => Ok(job.event.output.clone().into_bytes()),
        Mutator::Command { name, command, timeout_secs } => {
            let input = serde_json::to_vec(&*job.view).map_err(|e| e.to_string())?;
            process::run(command, &input, Duration::from_secs(*timeout_secs))
                .await
                .map(|f| f.stdout)
                .map_err(|e| format!("mutator {name}: {e}"))
        }
    }
}

async fn tcp_send(address: &str, payload: &[u8]) -> Result<(), String> {
    let mut s = tokio::net::TcpStream::connect(address).await.map_err(|e| format!("connect {address}: {e}"))?;
    s.write_all(payload).await.map_err(|e| format!("write {address}: {e}"))?;
    s.shutdown().await.map_err(|e| format!("close {address}: {e}"))
}

async fn udp_send(address: &str, payload: &[u8]) -> Result<(), String> {
    let target = tokio::net::lookup_host(address)
        .await
        .map_err(|e| format!("resolve {address}: {e}"))?
        .next()
        .ok_or_else(|| format!("resolve {address}: no address"))?;
    let bind = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let sock = tokio::net::UdpSocket::bind(bind).await.map_err(|e| format!("udp bind: {e}"))?;
    let n = sock.send_to(payload, target).await.map_err(|e| format!("send {address}: {e}"))?;
    if n < payload.len() {
        return Err(format!("send {address}: datagram truncated ({n} of {} bytes)", payload.len()));
    }
    Ok(())
}
