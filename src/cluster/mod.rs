//! Cluster membership: instances sharing one PostgreSQL metadata store, one object store and one cluster secret
//! are members of one cluster. Each registers itself (a random id per start, the URL the others reach it at)
//! and beats every `heartbeat`; a member whose beats stopped for `ALIVE_BEATS` heartbeats counts as gone, and its
//! row is removed by the others after `FORGET_BEATS`. A member that stops cleanly removes its row at once.
//!
//! Requests between members carry a signature made with the shared secret (`peer`): the internal endpoints
//! (`/internal/...`) answer nobody else.
//!
//! Blob flights are cluster-wide (`flights`): a lease per digest names the member that fetches from upstream;
//! the others stream from it over an internal endpoint. What comes next on this ground (issue 13): cluster-wide
//! tag revalidation, housekeeping one member at a time, and replication work spread over the members.

pub mod checks;
pub mod flights;
pub mod peer;

use std::sync::Arc;
use std::time::Duration;

use crate::meta::{Member, Meta, MetaError};
use crate::secret::Secret;
use crate::shutdown::Tasks;

/// How often a member beats by default.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// A member counts as alive while its last beat is at most this many heartbeats old: one late beat (a slow
/// query, a pause) does not drop it.
pub const ALIVE_BEATS: u32 = 3;
/// Rows of members silent for this many heartbeats are removed (each restart makes a new member).
pub const FORGET_BEATS: u32 = 60;

/// What makes an instance a member, resolved from `--cluster-secret`, `--advertise` and `[cluster]`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Shared by every member; signs member-to-member requests.
    pub secret: Secret,
    /// The base URL the other members reach this one at (`http://10.0.0.5:5000`); `None`: the address it
    /// listens on.
    pub advertise: Option<String>,
    pub heartbeat: Duration,
    /// Work the queues of distributed replication jobs named by this member's policies (`[cluster]
    /// replication_work`); `false` keeps a member to serving.
    pub replication_work: bool,
}

/// A blob download of the cluster as `/api/cluster` shows it: which member fetches it from upstream (the others
/// follow it), until when its lease runs unless renewed (Unix milliseconds).
#[derive(Debug, Clone, serde::Serialize)]
pub struct FlightView {
    pub digest: String,
    pub member: String,
    pub expires_at: i64,
}

/// This instance as a member.
pub struct Cluster {
    me: Member,
    secret: Secret,
    heartbeat: Duration,
    meta: Arc<dyn Meta>,
}

/// A member as `/api/cluster` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemberView {
    #[serde(flatten)]
    pub member: Member,
    /// Its last beat is recent enough (`ALIVE_BEATS`).
    pub alive: bool,
    /// It is the member answering.
    pub this: bool,
}

impl Cluster {
    /// Registers this instance (its first beat), reachable at `settings.advertise` or else `listening` (its own
    /// listen URL): a metadata store that refuses fails start-up.
    pub async fn join(settings: Settings, listening: &str, meta: Arc<dyn Meta>) -> Result<Arc<Cluster>, MetaError> {
        let now = crate::clock::now_ms();
        let url = settings.advertise.unwrap_or_else(|| listening.to_string());
        let me = Member { id: uuid::Uuid::new_v4().to_string(), url, started_at: now, heartbeat_at: now };
        meta.member_beat(&me, now).await?;
        tracing::info!(id = %me.id, url = %me.url, "joined the cluster");
        Ok(Arc::new(Cluster { me, secret: settings.secret, heartbeat: settings.heartbeat, meta }))
    }

    pub fn id(&self) -> &str {
        &self.me.id
    }

    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    pub fn heartbeat(&self) -> std::time::Duration {
        self.heartbeat
    }

    /// Beats every heartbeat until shutdown, forgetting members long gone; at shutdown, leaves (removes its
    /// row, so that the others stop counting on it at once rather than after `ALIVE_BEATS`).
    pub fn spawn_heartbeat(self: &Arc<Self>, tasks: &Tasks) {
        let (cluster, closing) = (Arc::clone(self), tasks.closing());
        tasks.spawn("cluster heartbeat", async move {
            let mut ticks = tokio::time::interval(cluster.heartbeat);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = closing.cancelled() => break,
                    _ = ticks.tick() => cluster.beat().await,
                }
            }
            match cluster.meta.remove_members(Some(&cluster.me.id), 0).await {
                Ok(_) => tracing::info!(id = %cluster.me.id, "left the cluster"),
                Err(e) => tracing::warn!(error = %e, "leaving the cluster failed; the others will see the heartbeat stop"),
            }
        });
    }

    async fn beat(&self) {
        let now = crate::clock::now_ms();
        if let Err(e) = self.meta.member_beat(&self.me, now).await {
            tracing::warn!(error = %e, "cluster heartbeat failed");
            return;
        }
        let forget = now - (self.heartbeat * FORGET_BEATS).as_millis() as i64;
        match self.meta.remove_members(None, forget).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "forgot cluster members gone for good"),
            Err(e) => tracing::warn!(error = %e, "forgetting gone cluster members failed"),
        }
    }

    /// Takes the cluster-wide turn `name` for work one member at a time does (eviction, the object store sweep):
    /// held, and renewed, while the value lives; `None` while another member holds it (that member is doing the
    /// work). A metadata store that fails gives no turn: the work waits for its next pass.
    pub async fn take_turn(&self, name: &str) -> Option<flights::Renewal> {
        let ttl = self.heartbeat * ALIVE_BEATS;
        match self.meta.lease(name, &self.me.id, ttl.as_millis() as i64).await {
            Ok(true) => Some(flights::Renewal::start(Arc::clone(&self.meta), name.to_string(), self.me.id.clone(), ttl)),
            Ok(false) => None,
            Err(e) => {
                tracing::warn!(error = %e, turn = name, "taking a cluster turn failed");
                None
            }
        }
    }

    /// Whether a member is downloading `digest` for the cluster now (its bytes must stay).
    pub async fn is_fetching(&self, digest: &crate::oci::Digest) -> Result<bool, MetaError> {
        let name = flights::lease_name(digest);
        Ok(self.meta.leases(&name).await?.iter().any(|l| l.name == name))
    }

    /// The blob downloads of the cluster now, by digest.
    pub async fn flights(&self) -> Result<Vec<FlightView>, MetaError> {
        let leases = self.meta.leases(flights::LEASE_PREFIX).await?;
        Ok(leases
            .into_iter()
            .map(|l| FlightView { digest: l.name[flights::LEASE_PREFIX.len()..].to_string(), member: l.holder, expires_at: l.expires_at })
            .collect())
    }

    /// Every registered member, with whether it is alive.
    pub async fn members(&self) -> Result<Vec<MemberView>, MetaError> {
        let alive_after = crate::clock::now_ms() - (self.heartbeat * ALIVE_BEATS).as_millis() as i64;
        let rows = self.meta.members().await?;
        Ok(rows
            .into_iter()
            .map(|m| MemberView { alive: m.heartbeat_at >= alive_after, this: m.id == self.me.id, member: m })
            .collect())
    }
}
