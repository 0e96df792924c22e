//! The REST API and the agent WebSocket, on one listening port.
//!
//! Every `/api/v1` route needs `Authorization: Bearer <admin token>`, except the agent
//! WebSocket, which takes the agent token (or the admin token). Bodies are parsed by
//! hand rather than with axum's `Json` extractor so a bad body gets a 400 that names
//! the field, as config errors do. A write is answered only once it is durable.

use crate::auth::{Role, Tokens};
use crate::scheduler::Scheduler;
use crate::sessions::{self, Sessions};
use crate::state::State;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Request, State as AxState, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use drover_core::Status;
use drover_core::event::CheckResult;
use drover_core::resource::{CheckSpec, Entity, EntityClass, FieldError, Silence};
use drover_core::time::{now_ms, now_secs};
use serde::de::DeserializeOwned;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Clone)]
pub struct Api {
    pub state: Arc<State>,
    pub sessions: Arc<Sessions>,
    pub scheduler: Arc<Scheduler>,
    pub tokens: Tokens,
}

/// A 4xx/5xx with a JSON body `{"error": ..., "field": ...}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), field: None }
    }
    fn not_found(what: &str, name: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("{what} `{name}` not found"))
    }
    fn field(e: FieldError) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!("field `{}`: {}", e.field, e.message),
            field: Some(e.field),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(f) = self.field {
            body["field"] = json!(f);
        }
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Parses a JSON body; errors name the field serde complained about.
fn parse_body<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    if body.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "request body is empty; expected JSON"));
    }
    serde_json::from_slice(body).map_err(|e| {
        let msg = e.to_string();
        let field = msg.split('`').nth(1).filter(|_| msg.contains("field")).map(str::to_string);
        ApiError { status: StatusCode::BAD_REQUEST, message: format!("invalid JSON body: {msg}"), field }
    })
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

async fn require_admin(
    AxState(api): AxState<Api>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    match bearer(req.headers()).and_then(|t| api.tokens.role(t)) {
        Some(Role::Admin) => next.run(req).await,
        Some(Role::Agent) => {
            api.state.metrics.auth_failures.inc();
            tracing::warn!(%peer, path = %req.uri().path(), "agent token used on the admin API; refused");
            ApiError::new(StatusCode::FORBIDDEN, "the agent token cannot use the admin API").into_response()
        }
        None => {
            api.state.metrics.auth_failures.inc();
            tracing::warn!(%peer, path = %req.uri().path(), "missing or wrong token; refused");
            ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong bearer token (see DATA_DIR/admin.token)")
                .into_response()
        }
    }
}

/// Counts 4xx answers for /metrics.
async fn count_rejections(AxState(api): AxState<Api>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    if resp.status().is_client_error() {
        api.state.metrics.api_requests_rejected.inc();
    }
    resp
}

pub fn router(api: Api) -> Router {
    let admin = Router::new()
        .route("/entities", get(list_entities).post(create_entity))
        .route("/entities/{name}", get(get_entity).put(put_entity).delete(delete_entity))
        .route("/checks", get(list_checks).post(create_check))
        .route("/checks/{name}", get(get_check).put(put_check).delete(delete_check))
        .route("/checks/{name}/execute", post(execute_check))
        .route("/events", get(list_events).post(post_result))
        .route("/events/{entity}", get(list_entity_events))
        .route("/events/{entity}/{check}", get(get_event).delete(delete_event))
        .route("/events/{entity}/{check}/resolve", post(resolve_event))
        .route("/silences", get(list_silences).post(create_silence))
        .route("/silences/{name}", get(get_silence).delete(delete_silence))
        .route("/deadletters", get(list_dead_letters))
        .route("/deadletters/{id}", axum::routing::delete(delete_dead_letter))
        .route("/deadletters/{id}/retry", post(retry_dead_letter))
        .route("/pipeline", get(pipeline_stats))
        .route("/databases", get(list_databases))
        .route("/databases/{name}", get(get_database))
        .route("/databases/{name}/switchover", post(switchover_database))
        .layer(middleware::from_fn_with_state(api.clone(), require_admin));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/v1/agent/ws", get(agent_ws))
        .route("/api/v1/watch", get(watch_ws))
        .nest("/api/v1", admin)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(middleware::from_fn_with_state(api.clone(), count_rejections))
        .with_state(api)
}

async fn health(AxState(api): AxState<Api>) -> Response {
    match api.state.store.revision().await {
        Ok(rev) => Json(json!({
            "status": "ok",
            "agents_connected": api.sessions.connected(),
            "store_revision": rev,
        }))
        .into_response(),
        Err(e) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "store unavailable", "error": e.to_string() })))
                .into_response()
        }
    }
}

async fn metrics(AxState(api): AxState<Api>) -> Response {
    let mut body = api.state.metrics.render();
    // prometheus-client ends with `# EOF`; the appended families must come before it.
    if let Some(stripped) = body.strip_suffix("# EOF\n") {
        body = stripped.to_string();
    }
    if let Some(p) = api.state.pipeline.get() {
        body.push_str(&crate::handling::render_stats(&p.stats()));
    }
    // Metric points from check output and keepalives, labelled by entity and check.
    body.push_str(&drover_pipeline::prometheus_text(&api.state.events(None)));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

// ---- pipeline -----------------------------------------------------------------

fn pipeline(api: &Api) -> ApiResult<&drover_pipeline::Pipeline> {
    api.state.pipeline.get().ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "event pipeline not running"))
}

async fn list_dead_letters(AxState(api): AxState<Api>) -> ApiResult<Json<Vec<drover_pipeline::DeadLetter>>> {
    Ok(Json(pipeline(&api)?.dead_letters()))
}

async fn retry_dead_letter(
    AxState(api): AxState<Api>,
    Path(id): Path<u64>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    if pipeline(&api)?.retry_dead_letter(id) {
        Ok((StatusCode::ACCEPTED, Json(json!({ "retrying": id }))))
    } else {
        Err(ApiError::not_found("dead letter", &id.to_string()))
    }
}

async fn delete_dead_letter(AxState(api): AxState<Api>, Path(id): Path<u64>) -> ApiResult<StatusCode> {
    if pipeline(&api)?.drop_dead_letter(id) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("dead letter", &id.to_string()))
    }
}

async fn pipeline_stats(AxState(api): AxState<Api>) -> ApiResult<Json<drover_pipeline::PipelineStats>> {
    Ok(Json(pipeline(&api)?.stats()))
}

type Upgrade = Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>;

/// Checks the token (agent or admin) before the upgrade itself, so a wrong token is a
/// 401 whatever else is wrong with the request, then sizes the socket's buffers —
/// tungstenite's default 128 KiB read and write buffers cost over a gigabyte at 10,000
/// agents, and frames here are small (a larger one simply grows the buffer) — and
/// hands the socket to `serve`.
fn authorized_upgrade<F, Fut>(
    api: &Api,
    peer: SocketAddr,
    headers: &HeaderMap,
    ws: Upgrade,
    who: &str,
    serve: F,
) -> Response
where
    F: FnOnce(axum::extract::ws::WebSocket) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    if bearer(headers).and_then(|t| api.tokens.role(t)).is_none() {
        api.state.metrics.auth_failures.inc();
        tracing::warn!(%peer, "{who} with a missing or wrong token; refused");
        return ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong token").into_response();
    }
    match ws {
        Ok(ws) => ws
            .max_message_size(sessions::MAX_FRAME_BYTES)
            .max_frame_size(sessions::MAX_FRAME_BYTES)
            .read_buffer_size(4 * 1024)
            .write_buffer_size(0)
            .on_upgrade(serve),
        Err(rejection) => rejection.into_response(),
    }
}

async fn agent_ws(
    AxState(api): AxState<Api>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: Upgrade,
) -> Response {
    let (state, sessions) = (api.state.clone(), api.sessions.clone());
    authorized_upgrade(&api, peer, &headers, ws, "agent connection", move |socket| {
        sessions::serve(socket, state, sessions, peer.to_string())
    })
}

/// Data planes (proxies, name servers) use the agent token or the admin token.
async fn watch_ws(
    AxState(api): AxState<Api>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: Upgrade,
) -> Response {
    let state = api.state.clone();
    authorized_upgrade(&api, peer, &headers, ws, "watch", move |socket| {
        crate::watch::serve(socket, state, peer.to_string())
    })
}

// ---- entities -----------------------------------------------------------------

/// Every database cluster's leader, last decision and observations.
async fn list_databases(AxState(api): AxState<Api>) -> Json<serde_json::Value> {
    Json(json!(api.state.databases.views().into_values().collect::<Vec<_>>()))
}

async fn get_database(AxState(api): AxState<Api>, Path(name): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    api.state.databases.views().remove(&name).map(Json).ok_or_else(|| ApiError::not_found("database", &name))
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SwitchoverBody {
    #[serde(default)]
    to: Option<String>,
}

/// Moves the primary (to `to`, or the best replica) once the target has caught up;
/// answers when it is done or refused.
async fn switchover_database(
    AxState(api): AxState<Api>,
    Path(name): Path<String>,
    body: Option<Json<SwitchoverBody>>,
) -> ApiResult<Json<serde_json::Value>> {
    if !api.state.databases.views().contains_key(&name) {
        return Err(ApiError::not_found("database", &name));
    }
    let to = body.and_then(|Json(b)| b.to);
    let (reply, rx) = tokio::sync::oneshot::channel();
    api.state
        .databases
        .request_switchover(&name, crate::databases::SwitchoverRequest { to, reply })
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, e))?;
    match tokio::time::timeout(std::time::Duration::from_secs(180), rx).await {
        Ok(Ok(Ok(msg))) => Ok(Json(json!({ "result": msg }))),
        Ok(Ok(Err(msg))) => Err(ApiError::new(StatusCode::CONFLICT, msg)),
        _ => Err(ApiError::new(StatusCode::GATEWAY_TIMEOUT, "the switchover did not finish in 180 s")),
    }
}

async fn list_entities(AxState(api): AxState<Api>) -> Json<Vec<Entity>> {
    Json(api.state.entities())
}

async fn get_entity(AxState(api): AxState<Api>, Path(name): Path<String>) -> ApiResult<Json<Entity>> {
    api.state.entity(&name).map(Json).ok_or_else(|| ApiError::not_found("entity", &name))
}

fn prepare_entity(mut e: Entity, existing: Option<Entity>) -> ApiResult<Entity> {
    e.validate().map_err(ApiError::field)?;
    match existing {
        // The server owns liveness fields of agent entities.
        Some(old) if old.class == EntityClass::Agent => {
            e.class = EntityClass::Agent;
            e.connected = old.connected;
            e.last_seen_ms = old.last_seen_ms;
            e.metrics = old.metrics;
        }
        // Entities made through the API have no agent behind them.
        _ => e.class = EntityClass::Proxy,
    }
    Ok(e)
}

async fn create_entity(AxState(api): AxState<Api>, body: Bytes) -> ApiResult<(StatusCode, Json<Entity>)> {
    let e: Entity = parse_body(&body)?;
    if api.state.entity(&e.name).is_some() {
        return Err(ApiError::new(StatusCode::CONFLICT, format!("entity `{}` exists; PUT to replace it", e.name)));
    }
    let e = prepare_entity(e, None)?;
    let seq = api.state.put_entity(e.clone());
    api.state.wait_durable(seq).await;
    Ok((StatusCode::CREATED, Json(e)))
}

async fn put_entity(AxState(api): AxState<Api>, Path(name): Path<String>, body: Bytes) -> ApiResult<Json<Entity>> {
    let mut e: Entity = parse_body(&body)?;
    name_matches(&mut e.name, &name)?;
    let e = prepare_entity(e, api.state.entity(&name))?;
    let seq = api.state.put_entity(e.clone());
    api.state.wait_durable(seq).await;
    Ok(Json(e))
}

async fn delete_entity(AxState(api): AxState<Api>, Path(name): Path<String>) -> ApiResult<StatusCode> {
    if api.state.entity(&name).is_none() {
        return Err(ApiError::not_found("entity", &name));
    }
    if let Some(seq) = api.state.delete_entity(&name) {
        api.state.wait_durable(seq).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

fn name_matches(body_name: &mut String, path_name: &str) -> ApiResult<()> {
    if body_name.is_empty() {
        *body_name = path_name.to_string();
    }
    if body_name != path_name {
        return Err(ApiError::field(FieldError::new(
            "name",
            format!("`{body_name}` does not match the URL's `{path_name}`"),
        )));
    }
    Ok(())
}

// ---- checks -------------------------------------------------------------------

async fn list_checks(AxState(api): AxState<Api>) -> Json<Vec<CheckSpec>> {
    Json(api.state.checks())
}

async fn get_check(AxState(api): AxState<Api>, Path(name): Path<String>) -> ApiResult<Json<CheckSpec>> {
    api.state.check(&name).map(Json).ok_or_else(|| ApiError::not_found("check", &name))
}

async fn create_check(AxState(api): AxState<Api>, body: Bytes) -> ApiResult<(StatusCode, Json<CheckSpec>)> {
    let c: CheckSpec = parse_body(&body)?;
    c.validate().map_err(ApiError::field)?;
    if api.state.check(&c.name).is_some() {
        return Err(ApiError::new(StatusCode::CONFLICT, format!("check `{}` exists; PUT to replace it", c.name)));
    }
    let seq = api.state.put_check(c.clone());
    api.state.wait_durable(seq).await;
    Ok((StatusCode::CREATED, Json(c)))
}

async fn put_check(AxState(api): AxState<Api>, Path(name): Path<String>, body: Bytes) -> ApiResult<Json<CheckSpec>> {
    let mut c: CheckSpec = parse_body(&body)?;
    name_matches(&mut c.name, &name)?;
    c.validate().map_err(ApiError::field)?;
    let seq = api.state.put_check(c.clone());
    api.state.wait_durable(seq).await;
    Ok(Json(c))
}

async fn delete_check(AxState(api): AxState<Api>, Path(name): Path<String>) -> ApiResult<StatusCode> {
    let seq = api.state.delete_check(&name).ok_or_else(|| ApiError::not_found("check", &name))?;
    api.state.wait_durable(seq).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ExecuteBody {
    #[serde(default)]
    subscriptions: Vec<String>,
}

async fn execute_check(
    AxState(api): AxState<Api>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let mut check = api.state.check(&name).ok_or_else(|| ApiError::not_found("check", &name))?;
    let req: ExecuteBody = if body.is_empty() { ExecuteBody::default() } else { parse_body(&body)? };
    if !req.subscriptions.is_empty() {
        check.subscriptions = req.subscriptions;
    }
    let mut rr = now_ms() as usize;
    let issued = api.scheduler.publish(&check, &mut rr, false);
    Ok((StatusCode::ACCEPTED, Json(json!({ "issued": issued }))))
}

// ---- events -------------------------------------------------------------------

async fn list_events(AxState(api): AxState<Api>) -> Json<Vec<drover_core::Event>> {
    Json(api.state.events(None))
}

async fn list_entity_events(AxState(api): AxState<Api>, Path(entity): Path<String>) -> Json<Vec<drover_core::Event>> {
    Json(api.state.events(Some(&entity)))
}

async fn get_event(
    AxState(api): AxState<Api>,
    Path((entity, check)): Path<(String, String)>,
) -> ApiResult<Json<drover_core::Event>> {
    api.state.event(&entity, &check).map(Json).ok_or_else(|| ApiError::not_found("event", &format!("{entity}/{check}")))
}

async fn delete_event(
    AxState(api): AxState<Api>,
    Path((entity, check)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let seq = api
        .state
        .delete_event(&entity, &check)
        .ok_or_else(|| ApiError::not_found("event", &format!("{entity}/{check}")))?;
    api.state.wait_durable(seq).await;
    Ok(StatusCode::NO_CONTENT)
}

async fn resolve_event(
    AxState(api): AxState<Api>,
    Path((entity, check)): Path<(String, String)>,
) -> ApiResult<Json<drover_core::Event>> {
    if api.state.event(&entity, &check).is_none() {
        return Err(ApiError::not_found("event", &format!("{entity}/{check}")));
    }
    let now = now_ms();
    let r = CheckResult::made_by_drover(&entity, &check, Status::Ok, "Resolved manually through the API".into(), now);
    let seq = api.state.ingest(None, r).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    api.state.wait_durable(seq).await;
    api.state.event(&entity, &check).map(Json).ok_or_else(|| ApiError::not_found("event", &format!("{entity}/{check}")))
}

/// A result from outside the agents (a script with the admin token); `entity` required.
async fn post_result(AxState(api): AxState<Api>, body: Bytes) -> ApiResult<(StatusCode, Json<drover_core::Event>)> {
    let r: CheckResult = parse_body(&body)?;
    if r.entity.is_empty() {
        return Err(ApiError::field(FieldError::new("entity", "required for results posted to the API")));
    }
    let (entity, check) = (r.entity.clone(), r.check.clone());
    let seq = api.state.ingest(None, r).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    api.state.wait_durable(seq).await;
    let ev =
        api.state.event(&entity, &check).ok_or_else(|| ApiError::not_found("event", &format!("{entity}/{check}")))?;
    Ok((StatusCode::ACCEPTED, Json(ev)))
}

// ---- silences -----------------------------------------------------------------

async fn list_silences(AxState(api): AxState<Api>) -> Json<Vec<Silence>> {
    Json(api.state.silences())
}

async fn get_silence(AxState(api): AxState<Api>, Path(name): Path<String>) -> ApiResult<Json<Silence>> {
    api.state.silence(&name).map(Json).ok_or_else(|| ApiError::not_found("silence", &name))
}

async fn create_silence(AxState(api): AxState<Api>, body: Bytes) -> ApiResult<(StatusCode, Json<Silence>)> {
    let mut s: Silence = parse_body(&body)?;
    if s.name.is_empty() {
        s.name = s.default_name();
    }
    if s.begin_unix_secs == 0 {
        s.begin_unix_secs = now_secs();
    }
    s.validate().map_err(ApiError::field)?;
    let seq = api.state.put_silence(s.clone());
    api.state.wait_durable(seq).await;
    Ok((StatusCode::CREATED, Json(s)))
}

async fn delete_silence(AxState(api): AxState<Api>, Path(name): Path<String>) -> ApiResult<StatusCode> {
    let seq = api.state.delete_silence(&name).ok_or_else(|| ApiError::not_found("silence", &name))?;
    api.state.wait_durable(seq).await;
    Ok(StatusCode::NO_CONTENT)
}
