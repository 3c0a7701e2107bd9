//! The `Workflows` service (docs/workflows.md): what the broker tracks of consultations
//! (`concordat dsar status`), statements (`concordat comms status`) and incidents
//! (`concordat incident involve`), and the search of an agency's own transfers that prepares a
//! consultation (`concordat dsar find`); with the timer loop that fires deadlines and reminders.
//!
//! Who sees what: an agency the consultations and statements it is a party to (requester,
//! proposer, or asked), an auditor all of them. `FindTransfers` searches only the caller's own
//! transfers. Searches read the audit log from its start, one at a time across the broker, off
//! the async workers and within [`SCAN_TIME`].

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use concordat_proto::{
    audit,
    ids::{AgencyId, OrgId},
    pb::{self, audit_entry::Event},
    workflow::{DsarOpen, WorkflowId},
};
use tokio::sync::{Semaphore, watch};
use tonic::{Request, Response, Status};

use crate::{
    identity::{Call, Caller, call},
    live::{Current, Rules},
    refusal::{Failure, Internal, Reason, Refusal},
    refusal_log::{RefusalLog, RefusedCall},
    store::{Applied, Involve, Op, Storage, Store},
    workflow,
};

/// The most transfers one `FindTransfers` answer lists.
pub const MAX_FOUND: usize = 1000;
/// The most records one list answer carries.
pub const MAX_LISTED: usize = 1000;
/// How long one search of the log may run.
pub const SCAN_TIME: Duration = Duration::from_secs(20);
/// How many entries a search reads at a time.
const SCAN_CHUNK: usize = 4096;

/// One search of the log at a time: each reads it from the start.
static SCANS: Semaphore = Semaphore::const_new(1);

/// What a search found.
struct Found {
    transfers: Vec<pb::TransferSummary>,
    truncated: bool,
    log_size: u64,
}

/// The refusal of a search that cannot run now: another is running, or it ran out of time.
fn busy(what: &str) -> Refusal {
    Refusal::new(
        Reason::StorageUnavailable,
        format!(
            "{what}: the broker searches its audit log for one request at a time, for at most \
             {} s; try again in a moment",
            SCAN_TIME.as_secs()
        ),
    )
}

/// The accepted transfers `keep` selects, oldest first, at most `limit`; `truncated` when more
/// matched or the search ran out of time. With `stop_when_full` the search ends as soon as it
/// has `limit` of them (without knowing whether there are more). Refused (busy) when another
/// search holds the slot for longer than [`SCAN_TIME`].
async fn scan_transfers(
    store: &Store,
    limit: usize,
    stop_when_full: bool,
    keep: impl Fn(&pb::TransferSummary) -> bool + Send + 'static,
) -> Result<Result<Found, Refusal>, Internal> {
    let _one = match tokio::time::timeout(SCAN_TIME, SCANS.acquire()).await {
        Ok(permit) => permit.map_err(|e| Internal::new("searching the log", e))?,
        Err(_) => return Ok(Err(busy("another search of the log is still running"))),
    };
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        let storage = store.storage();
        let size = storage.log_size()?;
        let started = Instant::now();
        let mut found = Found {
            transfers: Vec::new(),
            truncated: false,
            log_size: size,
        };
        let mut index = 0u64;
        while index < size {
            if started.elapsed() > SCAN_TIME {
                found.truncated = true;
                break;
            }
            let entries = storage.log_entries(index, SCAN_CHUNK)?;
            if entries.is_empty() {
                break;
            }
            for bytes in entries {
                let at = index;
                index += 1;
                let Ok(entry) = audit::decode(&bytes) else {
                    continue;
                };
                let Some(summary) = summary(at, &entry) else {
                    continue;
                };
                if keep(&summary) {
                    if found.transfers.len() >= limit {
                        found.truncated = true;
                        return Ok(found);
                    }
                    found.transfers.push(summary);
                    if stop_when_full && found.transfers.len() >= limit {
                        return Ok(found);
                    }
                }
            }
        }
        Ok(found)
    })
    .await
    .map_err(|e| Internal::new("searching the log", e))?
    .map(Ok)
}

/// An accepted transfer's entry as a search lists it.
fn summary(index: u64, entry: &pb::AuditEntry) -> Option<pb::TransferSummary> {
    let Some(Event::TransferAccepted(a)) = &entry.event else {
        return None;
    };
    let e = a.envelope.as_ref()?;
    Some(pb::TransferSummary {
        transfer_id: a.transfer_id.clone(),
        message_id: e.message_id.clone(),
        sender: e.sender.clone(),
        recipients: e.recipients.clone(),
        kind: e.kind,
        organisations: std::iter::once(&e.organisation)
            .filter(|o| !o.is_empty())
            .chain(&e.organisations)
            .cloned()
            .collect(),
        incident_ref: e.incident_ref.clone(),
        accepted_at: entry.time,
        log_index: index,
    })
}

/// Whether `t` went between `a` and `b`, either way.
fn between(t: &pb::TransferSummary, a: &str, b: &str) -> bool {
    (t.sender == a && t.recipients.iter().any(|r| r == b))
        || (t.sender == b && t.recipients.iter().any(|r| r == a))
}

/// The checks of a consultation's opening that read the log: every transfer it concerns went
/// between the requester and a consulted agency, and the organisation it names (if any) was
/// identified to each consulted agency by one of them, so that the consultation discloses
/// nothing new.
pub async fn check_dsar_open(
    store: &Store,
    requester: &AgencyId,
    parties: &[AgencyId],
    open: &DsarOpen,
) -> Result<Result<(), Refusal>, Internal> {
    if open.concerns.is_empty() {
        return Ok(match &open.organisation {
            Some(org) => Err(Refusal::new(
                Reason::WorkflowConflict,
                format!(
                    "a consultation may name organisation {org} only together with the \
                     transfers (`concerns`) that already identified it to each consulted agency"
                ),
            )),
            None => Ok(()),
        });
    }
    let wanted: BTreeSet<String> = open.concerns.iter().map(ToString::to_string).collect();
    let ids = wanted.clone();
    let found = match scan_transfers(store, wanted.len(), true, move |t| {
        ids.contains(&t.transfer_id)
    })
    .await?
    {
        Ok(found) => found,
        Err(refusal) => return Ok(Err(refusal)),
    };
    let by_id: HashMap<&str, &pb::TransferSummary> = found
        .transfers
        .iter()
        .map(|t| (t.transfer_id.as_str(), t))
        .collect();
    let names: Vec<&str> = parties.iter().map(AgencyId::as_str).collect();
    for id in &wanted {
        let related = by_id
            .get(id.as_str())
            .is_some_and(|t| names.iter().any(|p| between(t, requester.as_str(), p)));
        if !related {
            if found.truncated {
                return Ok(Err(busy(
                    "the transfers this consultation concerns were not all found in time",
                )));
            }
            return Ok(Err(Refusal::new(
                Reason::WorkflowConflict,
                format!(
                    "transfer {id} is not one between {requester} and {}: a consultation \
                     concerns only information shared between its parties (`concordat dsar \
                     find` lists them)",
                    names.join(", ")
                ),
            )));
        }
    }
    if let Some(org) = &open.organisation {
        for p in &names {
            let identified = found.transfers.iter().any(|t| {
                between(t, requester.as_str(), p)
                    && t.organisations.iter().any(|o| o == org.as_str())
            });
            if !identified {
                return Ok(Err(Refusal::new(
                    Reason::WorkflowConflict,
                    format!(
                        "none of the transfers this consultation concerns identified \
                         organisation {org} between {requester} and {p}: naming it would \
                         disclose it; leave it out, or list the transfers that did"
                    ),
                )));
            }
        }
    }
    Ok(Ok(()))
}

/// The `Workflows` service.
pub struct WorkflowsService {
    store: Store,
    rules: Arc<Current<Rules>>,
    refusals: Arc<RefusalLog>,
}

impl WorkflowsService {
    /// The service over `store`, deciding by `rules`, logging its refusals to `refusals`.
    pub fn new(store: Store, rules: Arc<Current<Rules>>, refusals: Arc<RefusalLog>) -> Self {
        WorkflowsService {
            store,
            rules,
            refusals,
        }
    }

    async fn refuse(&self, call: &Call, refusal: Refusal) -> Status {
        self.refusals.refuse(RefusedCall::of(call), refusal).await
    }

    /// Records of `prefix` that `view` shows to the caller (`None`: not to it).
    async fn list<T: Send + 'static>(
        &self,
        prefix: &'static str,
        view: impl Fn(&[u8]) -> Result<Option<T>, Internal> + Send + 'static,
    ) -> Result<Vec<T>, Internal> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || visible_records(store.storage(), prefix, view))
            .await
            .map_err(|e| Internal::new("listing workflows", e))?
    }
}

/// The records of `prefix` that `view` shows (`None`: not to this caller), in key order, at
/// most [`MAX_LISTED`]. The limit counts only the records shown, so that the records of other
/// agencies cannot crowd out the caller's own; a record that does not decode is left out and
/// logged, so that it cannot break every list either.
pub(crate) fn visible_records<T>(
    storage: &dyn Storage,
    prefix: &str,
    view: impl Fn(&[u8]) -> Result<Option<T>, Internal>,
) -> Result<Vec<T>, Internal> {
    let keep = |bytes: &[u8]| match view(bytes) {
        Ok(shown) => shown.is_some(),
        Err(e) => {
            tracing::error!(error = %e, prefix, "left out a workflow record that does not decode");
            false
        }
    };
    Ok(storage
        .workflow_records(prefix, MAX_LISTED, &keep)?
        .iter()
        .filter_map(|bytes| view(bytes).ok().flatten())
        .collect())
}

/// A workflow id from a request, or why it is malformed.
fn parse_id(what: &str, text: &str) -> Result<WorkflowId, Refusal> {
    text.parse()
        .map_err(|p| Refusal::new(Reason::Malformed, format!("{what} {text:?} {p}")))
}

/// Whether `caller` sees a record whose parties are `is_party`.
fn sees(caller: &Caller, is_party: impl Fn(&str) -> bool) -> bool {
    match caller {
        Caller::Auditor(_) => true,
        Caller::Agency(a) => is_party(a.as_str()),
    }
}

fn status_of(e: Failure) -> Status {
    e.into()
}

#[tonic::async_trait]
impl pb::workflows_server::Workflows for WorkflowsService {
    async fn consultations(
        &self,
        request: Request<pb::ConsultationsRequest>,
    ) -> Result<Response<pb::ConsultationsResponse>, Status> {
        let call = call(&request)?;
        let req = request.into_inner();
        let now = crate::clock::now();
        let caller = call.caller.clone();
        let consultations = if req.consultation_id.is_empty() {
            let all = req.all;
            self.list("dsar/", move |b| {
                Ok(Some(workflow::consultation_view(b, now)?).filter(|c| {
                    sees(&caller, |a| workflow::consultation_party(c, a))
                        && (all || c.state != "closed")
                }))
            })
            .await
            .map_err(|e| status_of(e.into()))?
        } else {
            let id = match parse_id("consultation", &req.consultation_id) {
                Ok(id) => id,
                Err(r) => return Err(self.refuse(&call, r).await),
            };
            let stored = self
                .store
                .storage()
                .workflow_record(&workflow::dsar_key(&id))
                .map_err(|e| status_of(e.into()))?;
            let view = stored
                .map(|b| workflow::consultation_view(&b, now))
                .transpose()
                .map_err(|e| status_of(e.into()))?
                .filter(|c| sees(&caller, |a| workflow::consultation_party(c, a)));
            match view {
                Some(c) => vec![c],
                None => {
                    let r = Refusal::new(
                        Reason::WorkflowUnknown,
                        format!("there is no consultation {id} that you are a party to"),
                    );
                    return Err(self.refuse(&call, r).await);
                }
            }
        };
        tracing::debug!(caller = %call.caller.id(), count = consultations.len(), "consultations");
        Ok(Response::new(pb::ConsultationsResponse { consultations }))
    }

    async fn statements(
        &self,
        request: Request<pb::StatementsRequest>,
    ) -> Result<Response<pb::StatementsResponse>, Status> {
        let call = call(&request)?;
        let req = request.into_inner();
        let now = crate::clock::now();
        let caller = call.caller.clone();
        let statements = if req.statement_id.is_empty() {
            self.list("comms/", move |b| {
                Ok(Some(workflow::statement_view(b, now)?)
                    .filter(|s| sees(&caller, |a| workflow::statement_party(s, a))))
            })
            .await
            .map_err(|e| status_of(e.into()))?
        } else {
            let id = match parse_id("statement", &req.statement_id) {
                Ok(id) => id,
                Err(r) => return Err(self.refuse(&call, r).await),
            };
            let stored = self
                .store
                .storage()
                .workflow_record(&workflow::comms_key(&id))
                .map_err(|e| status_of(e.into()))?;
            let view = stored
                .map(|b| workflow::statement_view(&b, now))
                .transpose()
                .map_err(|e| status_of(e.into()))?
                .filter(|s| sees(&caller, |a| workflow::statement_party(s, a)));
            match view {
                Some(s) => vec![s],
                None => {
                    let r = Refusal::new(
                        Reason::WorkflowUnknown,
                        format!("there is no statement {id} that you are a party to"),
                    );
                    return Err(self.refuse(&call, r).await);
                }
            }
        };
        tracing::debug!(caller = %call.caller.id(), count = statements.len(), "statements");
        Ok(Response::new(pb::StatementsResponse { statements }))
    }

    async fn find_transfers(
        &self,
        request: Request<pb::FindTransfersRequest>,
    ) -> Result<Response<pb::FindTransfersResponse>, Status> {
        let call = call(&request)?;
        let me = match call.caller.agency() {
            Ok(a) => a.clone(),
            Err(r) => return Err(self.refuse(&call, r).await),
        };
        let req = request.into_inner();
        let checked = (|| {
            let with: AgencyId = req.with.parse().map_err(|e| {
                Refusal::new(Reason::Malformed, format!("with {:?}: {e}", req.with))
            })?;
            let organisation = if req.organisation.is_empty() {
                None
            } else {
                Some(req.organisation.parse::<OrgId>().map_err(|e| {
                    Refusal::new(
                        Reason::Malformed,
                        format!("organisation {:?}: {e}", req.organisation),
                    )
                })?)
            };
            let incident = if req.incident_ref.is_empty() {
                None
            } else {
                Some(
                    WorkflowId::qualify(&me, &req.incident_ref)
                        .map_err(|p| {
                            Refusal::new(
                                Reason::Malformed,
                                format!("incident_ref {:?} {p}", req.incident_ref),
                            )
                        })?
                        .to_string(),
                )
            };
            if organisation.is_none() && incident.is_none() {
                return Err(Refusal::new(
                    Reason::Malformed,
                    "give an organisation or an incident reference to search for",
                ));
            }
            Ok((with, organisation, incident))
        })();
        let (with, organisation, incident) = match checked {
            Ok(c) => c,
            Err(r) => return Err(self.refuse(&call, r).await),
        };
        let since = req.since.map(|t| t.seconds);
        let (a, b) = (me.to_string(), with.to_string());
        let org = organisation.map(|o| o.to_string());
        let found = scan_transfers(&self.store, MAX_FOUND, false, move |t| {
            between(t, &a, &b)
                && since.is_none_or(|s| t.accepted_at.as_ref().is_some_and(|x| x.seconds >= s))
                && org
                    .as_ref()
                    .is_none_or(|o| t.organisations.iter().any(|x| x == o))
                && incident.as_ref().is_none_or(|i| {
                    // Entries written before references were federation-unique hold the
                    // sender's own reference without its prefix.
                    t.incident_ref == *i || format!("{}:{}", t.sender, t.incident_ref) == *i
                })
        })
        .await
        .map_err(|e| status_of(e.into()))?;
        let found = match found {
            Ok(found) => found,
            Err(refusal) => return Err(self.refuse(&call, refusal).await),
        };
        tracing::info!(agency = %me, with = %with, found = found.transfers.len(), truncated = found.truncated, "transfers found");
        Ok(Response::new(pb::FindTransfersResponse {
            transfers: found.transfers,
            truncated: found.truncated,
            log_size: found.log_size,
        }))
    }

    async fn involve(
        &self,
        request: Request<pb::InvolveRequest>,
    ) -> Result<Response<pb::InvolveResponse>, Status> {
        let call = call(&request)?;
        let me = match call.caller.agency() {
            Ok(a) => a.clone(),
            Err(r) => return Err(self.refuse(&call, r).await),
        };
        let req = request.into_inner();
        let incident = match WorkflowId::qualify(&me, &req.incident_ref) {
            Ok(id) => id,
            Err(p) => {
                let r = Refusal::new(
                    Reason::Malformed,
                    format!("incident_ref {:?} {p}", req.incident_ref),
                );
                return Err(self.refuse(&call, r).await);
            }
        };
        let now = crate::clock::now();
        let rules = self.rules.load();
        if !rules.policy.agencies.contains(&incident.owner) {
            let r = Refusal::new(
                Reason::Malformed,
                format!(
                    "incident_ref {incident} names {}, which is no agency of this federation",
                    incident.owner
                ),
            );
            return Err(self.refuse(&call, r).await);
        }
        let partners: BTreeSet<AgencyId> = {
            let today = now.date();
            rules
                .policy
                .agreements
                .iter()
                .filter(|a| a.in_force(today) && a.parties.contains(&me))
                .flat_map(|a| a.parties.iter().cloned())
                .filter(|a| *a != me)
                .collect()
        };
        let applied = self
            .store
            .commit(Op::Involve(Box::new(Involve {
                agency: me.clone(),
                incident,
                partners,
                at: now,
            })))
            .await
            .map_err(status_of)?;
        let Applied::Involved(entry) = applied else {
            return Err(status_of(
                Internal::new("declaring an involvement", format!("{applied:?}")).into(),
            ));
        };
        tracing::info!(agency = %me, incident = %entry.incident_ref, notified = ?entry.notified, duplicate = entry.duplicate, "involvement declared");
        Ok(Response::new(pb::InvolveResponse {
            incident_ref: entry.incident_ref,
            notified: entry.notified,
            duplicate: entry.duplicate,
        }))
    }
}

/// Fires the workflow timers as they fall due, until `stop` turns true. After a restart the
/// timers that fell due while the broker was down fire at once.
pub async fn run_timers(store: Store, mut stop: watch::Receiver<bool>) {
    const IDLE: Duration = Duration::from_secs(1);
    loop {
        if *stop.borrow() {
            return;
        }
        let now = crate::clock::now();
        let next = match store.storage().next_timer() {
            Ok(next) => next,
            Err(e) => {
                tracing::warn!(error = %e, "reading the workflow timers");
                None
            }
        };
        let wait = match next {
            Some(at) if at <= now => match store.commit(Op::FireTimers { now }).await {
                Ok(Applied::Fired { timers, notices }) => {
                    if timers > 0 {
                        tracing::info!(timers, notices, "workflow timers fired");
                        continue;
                    }
                    IDLE
                }
                Ok(other) => {
                    tracing::error!(outcome = ?other, "firing workflow timers");
                    IDLE
                }
                Err(e) => {
                    tracing::warn!(error = ?e, "firing workflow timers; trying again");
                    IDLE
                }
            },
            Some(at) => Duration::try_from(at - now).unwrap_or(IDLE).min(IDLE),
            None => IDLE,
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::timestamp;

    fn t(sender: &str, to: &[&str]) -> pb::TransferSummary {
        pb::TransferSummary {
            sender: sender.into(),
            recipients: to.iter().map(|s| (*s).into()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn between_reads_both_directions_only() {
        assert!(between(&t("nca", &["ico"]), "nca", "ico"));
        assert!(between(&t("ico", &["nca", "ncsc"]), "nca", "ico"));
        assert!(!between(&t("ncsc", &["ico"]), "nca", "ico"));
        assert!(!between(&t("nca", &["ncsc"]), "nca", "ico"));
    }

    #[test]
    fn a_summary_lists_every_organisation_once_declared() {
        let entry = pb::AuditEntry {
            time: Some(timestamp(time::OffsetDateTime::UNIX_EPOCH)),
            event: Some(Event::TransferAccepted(pb::TransferAccepted {
                transfer_id: "t".into(),
                envelope: Some(pb::EnvelopeFacts {
                    sender: "ico".into(),
                    organisation: "acme-ltd".into(),
                    organisations: vec!["globex-plc".into()],
                    ..Default::default()
                }),
                ..Default::default()
            })),
        };
        let s = summary(7, &entry).unwrap();
        assert_eq!(s.organisations, ["acme-ltd", "globex-plc"]);
        assert_eq!(s.log_index, 7);
        let other = pb::AuditEntry {
            event: Some(Event::Delivered(pb::Delivered::default())),
            ..Default::default()
        };
        assert!(summary(0, &other).is_none());
    }
}
