//! Leader election on the etcd store's cluster: one key (`PREFIX/leader`) held by a lease.
//!
//! A server takes the lead by creating the key (a transaction: *if* it does not exist *then*
//! put it with its lease), keeps the lease alive, and loses the lead when the lease expires
//! or is revoked (etcd deletes the key with it). Taking the lead also fences the store: every
//! later commit of this handle carries "the leader key still has this `create_revision`", so
//! once another server leads (a new key, a new `create_revision`), nothing this handle writes
//! is applied ([`StoreError::Fenced`]).
//!
//! Authority is bounded on this side too: a [`Lease`] knows until when it surely holds (the
//! time its last keep-alive was *sent* plus the TTL etcd granted), a bound that is never later
//! than etcd's own expiry, so a paused process that wakes up knows at once that it may no
//! longer act.

use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use super::{EtcdStore, Inner};
use crate::StoreError;

/// Who leads (the election key's value).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// The server's id (unique per process run).
    pub id: String,
    /// The URL it answers on (`drover server --advertise-url`).
    pub url: String,
    /// When it took the lead (ms since the epoch).
    pub since_ms: u64,
}

/// The election key as read: its value and the etcd revision that created it (one per term).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leadership {
    pub leader: LeaderInfo,
    pub create_revision: i64,
}

/// A lead held: the lease and the term's key.
pub struct Lease {
    id: i64,
    ttl: Duration,
    /// The term: the leader key's `create_revision`.
    pub create_revision: i64,
    /// Until when this side surely holds the lease (sent time of the last keep-alive + TTL).
    valid_until: Instant,
    keeper: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
}

impl Lease {
    /// Until when this server surely leads, unless it hears otherwise.
    pub fn valid_until(&self) -> Instant {
        self.valid_until
    }

    /// The lease's time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

impl Inner {
    fn leader_key(&self) -> String {
        format!("{}leader", self.keys.p)
    }
}

fn parse(kv: &etcd_client::KeyValue) -> Result<Leadership, StoreError> {
    let leader: LeaderInfo = serde_json::from_slice(kv.value())
        .map_err(|e| StoreError::Etcd(format!("the leader key holds an unreadable value: {e}")))?;
    Ok(Leadership {
        leader,
        create_revision: kv.create_revision(),
    })
}

impl EtcdStore {
    /// Run `fut` on the store's runtime, awaited from any runtime.
    async fn on_rt<T, F>(&self, fut: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        let handle = self
            .rt
            .as_ref()
            .expect("runtime lives as long as the store")
            .spawn(fut);
        handle
            .await
            .map_err(|e| StoreError::Etcd(format!("the etcd client's task failed: {e}")))?
    }

    /// Who leads now, if anyone (a linearizable read).
    pub async fn leader(&self) -> Result<Option<Leadership>, StoreError> {
        let i = self.inner.clone();
        self.on_rt(async move {
            // Sent again on transient errors: a request balanced onto a member just lost
            // fails to connect, and a follower must not forget its leader for that.
            let key = i.leader_key();
            let resp = i
                .read_req(tokio::time::Instant::now(), || {
                    let mut kv = i.kv.clone();
                    let key = key.clone();
                    async move { kv.get(key, None).await }
                })
                .await?;
            resp.kvs().first().map(parse).transpose()
        })
        .await
    }

    /// Take the lead if nobody holds it: `Ok(None)` when another server leads. On success
    /// every later commit of this store is fenced on the new term.
    pub async fn try_lead(
        &self,
        me: &LeaderInfo,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let value = serde_json::to_vec(me).map_err(|e| StoreError::Etcd(e.to_string()))?;
        let ttl_s = ttl.as_secs().max(1) as i64;
        let i = self.inner.clone();
        let sent = Instant::now();
        let got = self
            .on_rt(async move {
                let mut client = i.client.clone();
                // A grant whose answer was lost only leaves a lease that expires unused.
                let lease = i
                    .read_req(tokio::time::Instant::now(), || {
                        let mut client = i.client.clone();
                        async move { client.lease_grant(ttl_s, None).await }
                    })
                    .await?;
                let granted = Duration::from_secs(lease.ttl().max(0) as u64);
                let key = i.leader_key();
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        key.clone(),
                        value,
                        Some(PutOptions::new().with_lease(lease.id())),
                    )])
                    .or_else([TxnOp::get(key, None)]);
                let mut kv = i.kv.clone();
                let resp = match i.req(kv.txn(txn)).await {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = i.req(client.lease_revoke(lease.id())).await;
                        return Err(e);
                    }
                };
                if !resp.succeeded() {
                    let _ = i.req(client.lease_revoke(lease.id())).await;
                    return Ok(None);
                }
                let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
                Ok(Some((lease.id(), granted, rev)))
            })
            .await?;
        let Some((id, granted, create_revision)) = got else {
            return Ok(None);
        };
        self.set_write_conditions(vec![Compare::create_revision(
            self.inner.leader_key(),
            CompareOp::Equal,
            create_revision,
        )]);
        Ok(Some(Lease {
            id,
            ttl: granted,
            create_revision,
            valid_until: sent + granted,
            keeper: None,
        }))
    }

    /// Renew the lease once: `Ok(true)` while it lives (its validity moves on), `Ok(false)`
    /// when etcd says it expired or the key is no longer this term's.
    pub async fn keep_alive(&self, lease: &mut Lease) -> Result<bool, StoreError> {
        let id = lease.id;
        let keeper = lease.keeper.take();
        let i = self.inner.clone();
        let sent = Instant::now();
        let wait = (lease.ttl / 3).max(Duration::from_millis(300));
        let (alive, keeper) = self
            .on_rt(async move {
                let mut keeper = match keeper {
                    Some(k) => k,
                    None => {
                        let mut client = i.client.clone();
                        i.req(client.lease_keep_alive(id)).await?
                    }
                };
                let answer = tokio::time::timeout(wait, async {
                    keeper.0.keep_alive().await?;
                    keeper.1.message().await
                })
                .await;
                match answer {
                    Ok(Ok(Some(r))) => Ok((r.ttl(), Some(keeper))),
                    Ok(Ok(None)) => Err(StoreError::Etcd(
                        "etcd closed the lease keep-alive stream".into(),
                    )),
                    Ok(Err(e)) => Err(StoreError::Etcd(format!("lease keep-alive: {e}"))),
                    Err(_) => Err(StoreError::EtcdUnavailable {
                        endpoints: i.endpoints.clone(),
                        detail: format!(
                            "no answer to a lease keep-alive within {} ms",
                            wait.as_millis()
                        ),
                        outcome: "this server stops leading".into(),
                    }),
                }
            })
            .await?;
        lease.keeper = keeper;
        if alive <= 0 {
            return Ok(false);
        }
        // The key must still be this term's (nobody deleted it by hand).
        let mine = self
            .leader()
            .await?
            .is_some_and(|l| l.create_revision == lease.create_revision);
        if mine {
            lease.valid_until = sent + Duration::from_secs(alive as u64);
        }
        Ok(mine)
    }

    /// Give the lead up at once (the lease revoked, the key deleted with it).
    pub async fn resign(&self, lease: Lease) -> Result<(), StoreError> {
        let i = self.inner.clone();
        self.on_rt(async move {
            let mut client = i.client.clone();
            i.req(client.lease_revoke(lease.id)).await.map(|_| ())
        })
        .await
    }
}
