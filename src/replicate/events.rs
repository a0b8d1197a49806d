//! Event-driven replication: a source's notifications (`POST /api/replication/NAME/events`: CNCF distribution's
//! notification envelope, or Harbor's webhook) turned into the copies and deletes they call for, within seconds
//! and without a walk. The scheduled walk stays the safety net: an event lost (a full queue the sender gave up
//! on, a shutdown with events queued, a copy that failed) is copied by the next walk.
//!
//! ```text
//! POST ─> parse ─> filter (the policy's repositories and tags) ─> bounded queue (coalescing) ─> worker ─> Run::copy
//!                                                                                                   └─> delete
//! ```
//! The handler only validates and queues, so it answers at once: distribution's notification sink blocks its
//! queue on a slow endpoint. One worker per policy applies the events in the order they came (so per repository
//! too), one at a time.
//!
//! Architecture invariant: an event copies what a walk would: one copy path. A push goes through the same `Run`
//! a walk builds (`super::engine`): the same filters, namespace rewrite, platform selection, override rule and
//! failure records; with `latest` the repository is listed and its selected tags copied, as the walk does for
//! one repository.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::{copy, Cursor, Progress, RepoFilter, Run};
use crate::config::FileReplication;
use crate::meta::Meta;
use crate::oci::{Reference, RepoName};
use crate::secret::Secret;

/// Events queued per policy at most: a sender that finds the queue full is answered 503 and retries later (or
/// gives up, and the next walk copies what it announced).
pub const QUEUE_CAPACITY: usize = 1024;

/// Looks at the source for a pushed tag before copying it (50 ms doubling: about 6 s in all).
const SOURCE_WAITS: u32 = 7;

/// What an event asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Copy the tag (the source has a new or moved tag).
    Push,
    /// Delete the tag or manifest at the destination.
    Delete,
}

/// One thing to do: an action on a source repository's tag or digest.
#[derive(Debug, Clone)]
struct Event {
    action: Action,
    /// The source's name (the destination's is the policy's rewrite of it).
    repo: RepoName,
    reference: Reference,
}

impl Event {
    /// Whether `other` is about the same repository and reference: the later of the two replaces the earlier
    /// in the queue, since only the last state of a reference matters.
    fn same_target(&self, other: &Event) -> bool {
        self.repo == other.repo && self.reference == other.reference
    }
}

/// Why a notification was refused.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("the body is not a notification: {0}")]
    Malformed(String),
    #[error("the body is neither a distribution notification envelope ({{\"events\": [...]}}) nor a Harbor webhook ({{\"type\": ..., \"event_data\": ...}})")]
    Unknown,
    #[error("the policy's event queue is full ({0} events): retry later")]
    Full(usize),
}

/// What one notification came to: events queued, and events with nothing to do here (blob pushes, pulls,
/// manifests pushed by digest alone, repositories or tags the policy does not copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Received {
    pub accepted: u64,
    pub ignored: u64,
}

/// A policy's event counters since the server started, shown with its status.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EventCounts {
    /// Events in the notifications received (acted on or not).
    pub received: u64,
    pub accepted: u64,
    pub ignored: u64,
    /// Events refused because the queue was full (the sender was asked to retry).
    pub refused: u64,
    /// Waiting for the worker now.
    pub queued: u64,
    /// Tags copied, found up to date, and failed (recorded as the job's failures, which the next walk retries).
    pub copied: u64,
    pub skipped: u64,
    pub failed: u64,
    /// Deletes done at the destination (or found done already), and deletes that failed (logged; a walk does not
    /// delete, so nothing retries them).
    pub deleted: u64,
    pub delete_failed: u64,
}

/// One policy's events: who may send them, the queue, and the walk's machinery that applies them.
pub struct EventQueue {
    /// The bearer token a sender may present instead of an admin's credentials.
    secret: Option<Secret>,
    /// What a walk of the policy copies with: clients, filters, rewrite, copier, failure records.
    run: Arc<Run>,
    /// The policy's repository filter (a walk applies it to the catalog; here to each event).
    repos: RepoFilter,
    /// Events not yet applied, oldest first; at most `QUEUE_CAPACITY`, at most one per (repository, reference).
    queue: Mutex<VecDeque<Event>>,
    /// Told when an event is queued (a permit is kept if the worker is busy, so none is missed).
    wake: tokio::sync::Notify,
    received: AtomicU64,
    accepted: AtomicU64,
    ignored: AtomicU64,
    refused: AtomicU64,
    deleted: AtomicU64,
    delete_failed: AtomicU64,
}

impl EventQueue {
    /// The queue of policy `file`, whose copies stop when `cancel` is cancelled (shutdown). Fails as the policy
    /// would fail to run (an invalid filter or rewrite).
    pub fn new(file: &FileReplication, local_url: &str, meta: Arc<dyn Meta>, cancel: CancellationToken) -> Result<Arc<EventQueue>, String> {
        let policy = file.policy(local_url).map_err(|e| e.to_string())?;
        let (run, repos) = super::engine(policy, meta, Arc::new(Progress::default()), cancel, Cursor::default(), 0, None)
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(EventQueue {
            secret: file.events_secret.clone(),
            run,
            repos,
            queue: Mutex::new(VecDeque::new()),
            wake: tokio::sync::Notify::new(),
            received: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            ignored: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            deleted: AtomicU64::new(0),
            delete_failed: AtomicU64::new(0),
        }))
    }

    /// Whether an `Authorization` header value carries the policy's secret as a bearer token; `None` when the
    /// policy has no secret. Compared in constant time (as SHA-256 digests, so the length is not told either).
    pub fn secret_matches(&self, authorization: Option<&str>) -> Option<bool> {
        use sha2::Digest;
        use subtle::ConstantTimeEq;
        let secret = self.secret.as_ref()?;
        let given = authorization
            .and_then(|h| h.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token.trim());
        let (a, b) = (sha2::Sha256::digest(given.as_bytes()), sha2::Sha256::digest(secret.as_bytes()));
        Some(bool::from(a.as_slice().ct_eq(b.as_slice())) && !given.is_empty())
    }

    /// Takes a notification: the events the policy acts on are queued (all or none: when they do not fit, the
    /// sender retries the whole notification), the others counted as ignored.
    pub fn receive(&self, body: &[u8]) -> Result<Received, EventError> {
        let candidates = parse(body)?;
        let total = candidates.len() as u64;
        let events: Vec<Event> = candidates.into_iter().flatten().filter(|e| self.wanted(e)).collect();
        self.received.fetch_add(total, Ordering::Relaxed);
        let accepted = events.len() as u64;
        {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            let new = events.iter().filter(|e| !q.iter().any(|x| x.same_target(e))).count();
            if q.len() + new > QUEUE_CAPACITY {
                self.refused.fetch_add(total, Ordering::Relaxed);
                return Err(EventError::Full(q.len()));
            }
            for e in events {
                // The later event replaces the earlier and takes its place at the back, so that the order of
                // the last events of every reference is kept.
                if let Some(i) = q.iter().position(|x| x.same_target(&e)) {
                    q.remove(i);
                }
                q.push_back(e);
            }
        }
        self.accepted.fetch_add(accepted, Ordering::Relaxed);
        self.ignored.fetch_add(total - accepted, Ordering::Relaxed);
        if accepted > 0 {
            self.wake.notify_one();
        }
        Ok(Received { accepted, ignored: total - accepted })
    }

    /// Whether the policy copies what `e` is about: its repository filter, and its tag filter for a tag.
    fn wanted(&self, e: &Event) -> bool {
        if !self.repos.matches(e.repo.as_str()) {
            return false;
        }
        match &e.reference {
            Reference::Tag(t) => !self.run.tags.select_page(vec![t.to_string()]).is_empty(),
            Reference::Digest(_) => e.action == Action::Delete,
        }
    }

    /// The counters, for the job's status.
    pub fn counts(&self) -> EventCounts {
        let p = &self.run.progress;
        EventCounts {
            received: self.received.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            ignored: self.ignored.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            queued: self.queue.lock().unwrap_or_else(|p| p.into_inner()).len() as u64,
            copied: p.copied.load(Ordering::Relaxed),
            skipped: p.skipped.load(Ordering::Relaxed),
            failed: p.failed.load(Ordering::Relaxed),
            deleted: self.deleted.load(Ordering::Relaxed),
            delete_failed: self.delete_failed.load(Ordering::Relaxed),
        }
    }

    /// The worker: applies queued events one at a time, in order, until `stop` is cancelled. Events still queued
    /// then are dropped: the scheduled walk copies what they announced.
    pub async fn work(self: Arc<Self>, stop: CancellationToken) {
        while !stop.is_cancelled() {
            let next = self.queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
            match next {
                Some(event) => {
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => {}
                        () = self.apply(event) => {}
                    }
                }
                None => {
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => {}
                        () = self.wake.notified() => {}
                    }
                }
            }
        }
    }

    async fn apply(&self, e: Event) {
        let run = &*self.run;
        if e.action == Action::Push {
            self.await_source(&e.repo, &e.reference).await;
        }
        match (e.action, &e.reference) {
            (Action::Push, _) if run.tags.latest().is_some() => super::copy_repository(run, &e.repo).await,
            (Action::Push, reference) => {
                let tag = reference.to_string();
                if run.copy(&e.repo, &tag, true).await {
                    // A failure a walk recorded for this tag is copied now.
                    if let Err(err) = run.meta.clear_failure(&run.policy.job, e.repo.as_str(), &tag).await {
                        tracing::error!(error = %err, "clearing a replication failure failed");
                    }
                }
            }
            (Action::Delete, reference) => self.delete(&e.repo, reference).await,
        }
    }

    /// Waits (a few seconds at most) until the source serves `repo:reference`: distribution notifies a manifest
    /// push before it links the tag, so a copy started at once can find no such tag. Any other answer ends the
    /// wait, and the copy then meets (and records) what it has to.
    async fn await_source(&self, repo: &RepoName, reference: &Reference) {
        let src = &self.run.copier.src;
        let reference = reference.to_string();
        let mut pause = std::time::Duration::from_millis(50);
        for _ in 0..SOURCE_WAITS {
            match src.manifest_digest(repo, &reference).await {
                Ok(None) => tokio::time::sleep(pause).await,
                Ok(Some(_)) | Err(_) => return,
            }
            pause *= 2;
        }
    }

    /// Deletes `reference` from the destination's repository for `repo` (the policy's rewrite of it).
    async fn delete(&self, repo: &RepoName, reference: &Reference) {
        let run = &*self.run;
        let job = &run.policy.job;
        let (src, dst) = (&run.copier.src, &run.copier.dst);
        let dst_name = run.rewrite.apply(repo.as_str());
        let reference_text = reference.to_string();
        let result = match dst_name.parse::<RepoName>() {
            Ok(dst_repo) => copy::retry([src, dst], || dst.delete_manifest(&dst_repo, &reference_text)).await.map_err(|e| e.to_string()),
            Err(e) => Err(format!("rewritten name {dst_name:?} is invalid: {e}")),
        };
        match result {
            Ok(found) => {
                tracing::info!(job = %job, repo = %dst_name, %reference, found, "replicated a delete");
                self.deleted.fetch_add(1, Ordering::Relaxed);
            }
            Err(reason) => {
                tracing::warn!(job = %job, repo = %dst_name, %reference, %reason, "replicating a delete failed");
                self.delete_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The events of a notification body, `None` for each one there is nothing to do for (whatever the policy).
fn parse(body: &[u8]) -> Result<Vec<Option<Event>>, EventError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| EventError::Malformed(e.to_string()))?;
    if value.get("events").is_some() {
        let envelope: Envelope = serde_json::from_value(value).map_err(|e| EventError::Malformed(e.to_string()))?;
        return Ok(envelope.events.into_iter().map(DistributionEvent::event).collect());
    }
    if value.get("event_data").is_some() {
        let hook: Webhook = serde_json::from_value(value).map_err(|e| EventError::Malformed(e.to_string()))?;
        return Ok(hook.events());
    }
    Err(EventError::Unknown)
}

/// distribution's notification envelope (`application/vnd.docker.distribution.events.v1+json`): only the fields
/// read here; `id`, `timestamp`, `request`, `actor` and `source` are ignored.
#[derive(Deserialize)]
struct Envelope {
    events: Vec<DistributionEvent>,
}

#[derive(Deserialize)]
struct DistributionEvent {
    /// `push`, `pull`, `delete` or `mount`.
    #[serde(default)]
    action: String,
    #[serde(default)]
    target: Target,
}

#[derive(Deserialize, Default)]
struct Target {
    #[serde(default)]
    repository: String,
    #[serde(default)]
    digest: String,
    /// Set for a manifest pushed by tag, and for a tag deleted.
    #[serde(default)]
    tag: String,
}

impl DistributionEvent {
    /// A manifest pushed by tag is copied; a delete (a tag, or a manifest by digest) is deleted. Blob pushes
    /// carry no tag, and neither does a manifest pushed by digest alone (an index's children, a referrer): a walk
    /// copies tags, and copies those with the tag that refers to them. distribution's blob deletes look like
    /// manifest deletes; at the destination they find no manifest, which is a delete done.
    fn event(self) -> Option<Event> {
        let t = self.target;
        let action = match self.action.as_str() {
            "push" if !t.tag.is_empty() => Action::Push,
            "delete" => Action::Delete,
            _ => return None,
        };
        let reference = if t.tag.is_empty() { t.digest.parse().ok().map(Reference::Digest)? } else { Reference::Tag(t.tag.parse().ok()?) };
        Some(Event { action, repo: t.repository.parse().ok()?, reference })
    }
}

/// Harbor's webhook payload (`PUSH_ARTIFACT`, `DELETE_ARTIFACT`; other types are ignored).
#[derive(Deserialize)]
struct Webhook {
    #[serde(rename = "type", default)]
    kind: String,
    event_data: WebhookData,
}

#[derive(Deserialize)]
struct WebhookData {
    #[serde(default)]
    resources: Vec<Resource>,
    #[serde(default)]
    repository: WebhookRepository,
}

#[derive(Deserialize)]
struct Resource {
    #[serde(default)]
    digest: String,
    #[serde(default)]
    tag: String,
}

#[derive(Deserialize, Default)]
struct WebhookRepository {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    /// `project/repository`: the name in the registry.
    #[serde(default)]
    repo_full_name: String,
}

impl Webhook {
    /// One event per resource: a pushed tag is copied; a deleted artifact is deleted by digest (Harbor deletes an
    /// artifact with all its tags), or by tag when no digest is given.
    fn events(self) -> Vec<Option<Event>> {
        let r = &self.event_data.repository;
        let full = if r.repo_full_name.is_empty() { format!("{}/{}", r.namespace, r.name) } else { r.repo_full_name.clone() };
        let repo: Option<RepoName> = full.parse().ok();
        let action = match self.kind.as_str() {
            "PUSH_ARTIFACT" => Some(Action::Push),
            "DELETE_ARTIFACT" => Some(Action::Delete),
            _ => None,
        };
        let event = |res: &Resource| -> Option<Event> {
            let action = action?;
            let tag = || res.tag.parse().ok().map(Reference::Tag);
            let reference = match action {
                Action::Push => tag()?,
                Action::Delete => res.digest.parse().ok().map(Reference::Digest).or_else(tag)?,
            };
            Some(Event { action, repo: repo.clone()?, reference })
        };
        self.event_data.resources.iter().map(event).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn summary(events: Vec<Option<Event>>) -> Vec<Option<(Action, String, String)>> {
        events.into_iter().map(|e| e.map(|e| (e.action, e.repo.to_string(), e.reference.to_string()))).collect()
    }

    #[test]
    fn distribution_envelopes_yield_tag_pushes_and_deletes_only() {
        let body = format!(
            r#"{{"events":[
            {{"id":"1","timestamp":"2026-01-01T00:00:00Z","action":"push","target":{{"mediaType":"application/octet-stream","digest":"{D}","size":3,"repository":"team/app","url":"http://x"}},"request":{{}},"actor":{{}},"source":{{}}}},
            {{"action":"push","target":{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{D}","repository":"team/app","tag":"v1"}}}},
            {{"action":"push","target":{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{D}","repository":"team/app"}}}},
            {{"action":"pull","target":{{"digest":"{D}","repository":"team/app","tag":"v1"}}}},
            {{"action":"delete","target":{{"digest":"{D}","repository":"team/app"}}}},
            {{"action":"delete","target":{{"repository":"team/app","tag":"old"}}}},
            {{"action":"push","target":{{"repository":"Not A Name","tag":"v1"}}}}
            ]}}"#
        );
        let s = summary(parse(body.as_bytes()).unwrap());
        let some = |a, r: &str| Some((a, "team/app".to_string(), r.to_string()));
        assert_eq!(s, vec![None, some(Action::Push, "v1"), None, None, some(Action::Delete, D), some(Action::Delete, "old"), None]);
    }

    #[test]
    fn harbor_webhooks_yield_pushed_tags_and_deleted_digests() {
        let push = r#"{"type":"PUSH_ARTIFACT","occur_at":1,"operator":"admin","event_data":{"resources":[{"digest":"sha256:x","tag":"v2","resource_url":"h/p/app:v2"}],"repository":{"name":"app","namespace":"p","repo_full_name":"p/app","repo_type":"private"}}}"#;
        assert_eq!(summary(parse(push.as_bytes()).unwrap()), vec![Some((Action::Push, "p/app".into(), "v2".into()))]);
        let delete = format!(r#"{{"type":"DELETE_ARTIFACT","event_data":{{"resources":[{{"digest":"{D}","tag":"v2"}}],"repository":{{"name":"app","namespace":"p"}}}}}}"#);
        assert_eq!(summary(parse(delete.as_bytes()).unwrap()), vec![Some((Action::Delete, "p/app".into(), D.into()))]);
        let scan = r#"{"type":"SCANNING_COMPLETED","event_data":{"resources":[{"tag":"v2"}],"repository":{"repo_full_name":"p/app"}}}"#;
        assert_eq!(summary(parse(scan.as_bytes()).unwrap()), vec![None]);
    }

    fn envelope(events: &[(&str, &str)]) -> String {
        let events: Vec<serde_json::Value> = events
            .iter()
            .map(|(action, tag)| serde_json::json!({"action": action, "target": {"repository": "team/app", "tag": tag}}))
            .collect();
        serde_json::json!({ "events": events }).to_string()
    }

    async fn queue(dir: &tempfile::TempDir) -> Arc<EventQueue> {
        let meta = crate::meta::open(&format!("sqlite://{}?mode=rwc", dir.path().join("meta.db").display())).await.unwrap();
        let file = FileReplication {
            name: "p".into(),
            from: "http://127.0.0.1:9".into(),
            to: "local".into(),
            include: vec!["team/**".into()],
            exclude_tags: vec!["tmp-*".into()],
            ..Default::default()
        };
        EventQueue::new(&file, "http://127.0.0.1:9", meta, CancellationToken::new()).unwrap()
    }

    fn queued(q: &EventQueue) -> Vec<(Action, String)> {
        q.queue.lock().unwrap().iter().map(|e| (e.action, e.reference.to_string())).collect()
    }

    #[tokio::test]
    async fn the_later_event_for_a_tag_replaces_the_queued_one_at_the_back() {
        let dir = tempfile::tempdir().unwrap();
        let q = queue(&dir).await;
        let r = q.receive(envelope(&[("push", "a"), ("push", "b"), ("push", "tmp-1"), ("delete", "a"), ("pull", "b")]).as_bytes()).unwrap();
        assert_eq!(r, Received { accepted: 3, ignored: 2 }, "tmp-* is excluded, pulls are nothing to do");
        assert_eq!(queued(&q), [(Action::Push, "b".to_string()), (Action::Delete, "a".to_string())]);
        q.receive(envelope(&[("push", "a")]).as_bytes()).unwrap();
        assert_eq!(queued(&q), [(Action::Push, "b".to_string()), (Action::Push, "a".to_string())]);
    }

    #[tokio::test]
    async fn a_full_queue_takes_nothing_of_a_notification_but_coalesces() {
        let dir = tempfile::tempdir().unwrap();
        let q = queue(&dir).await;
        let tags: Vec<String> = (0..QUEUE_CAPACITY).map(|i| format!("t{i}")).collect();
        let pushes: Vec<(&str, &str)> = tags.iter().map(|t| ("push", t.as_str())).collect();
        q.receive(envelope(&pushes).as_bytes()).unwrap();
        // One new tag with one already queued: refused whole, the queue unchanged.
        let over = envelope(&[("push", "t0"), ("push", "new")]);
        assert!(matches!(q.receive(over.as_bytes()), Err(EventError::Full(n)) if n == QUEUE_CAPACITY));
        assert_eq!(q.queue.lock().unwrap().len(), QUEUE_CAPACITY);
        // A tag already queued still fits: it replaces its predecessor.
        assert_eq!(q.receive(envelope(&[("delete", "t0")]).as_bytes()).unwrap(), Received { accepted: 1, ignored: 0 });
        assert_eq!(queued(&q).last(), Some(&(Action::Delete, "t0".to_string())));
        let c = q.counts();
        assert_eq!((c.received, c.accepted, c.refused, c.queued), (QUEUE_CAPACITY as u64 + 3, QUEUE_CAPACITY as u64 + 1, 2, QUEUE_CAPACITY as u64));
    }

    #[test]
    fn other_bodies_are_refused() {
        assert!(matches!(parse(b"{not json"), Err(EventError::Malformed(_))));
        assert!(matches!(parse(br#"{"events": 3}"#), Err(EventError::Malformed(_))));
        assert!(matches!(parse(br#"{"hello": "world"}"#), Err(EventError::Unknown)));
    }
}
