//! `safemode.v1.ControlService`: apply and lift modes, list the catalogue,
//! read status.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{invalid, invalid_name, principal, status};
use crate::controller::{ApplyRequest, Controller, LiftRequest, LiftTarget};
use crate::policy::{ChannelSet, ModeName, Namespace, Reason};
use crate::wire::proto::control_service_server::ControlService;
use crate::wire::{self, proto};

/// The control service.
pub struct ControlApi {
    controller: Arc<Controller>,
    replica: String,
}

impl ControlApi {
    /// The service over `controller`, on the replica called `replica`.
    pub fn new(controller: Arc<Controller>, replica: String) -> Self {
        ControlApi {
            controller,
            replica,
        }
    }
}

fn namespace(text: &str) -> Result<Namespace, Status> {
    Namespace::parse(text).map_err(invalid_name("namespace"))
}

fn reason(text: &str) -> Result<Reason, Status> {
    Reason::parse(text).map_err(invalid_name("reason"))
}

impl ControlApi {
    /// Whether the catalogue's `mode` has a read-only rule (so an as-of time
    /// means something for it). Unknown modes are the controller's to refuse.
    fn serves_read_only(&self, mode: &ModeName) -> bool {
        self.controller
            .catalog()
            .get(mode.as_str())
            .is_none_or(|m| {
                m.rules
                    .iter()
                    .any(|r| matches!(r.effect, crate::policy::Effect::ReadOnly(_)))
            })
    }
}

#[tonic::async_trait]
impl ControlService for ControlApi {
    async fn apply_modes(
        &self,
        request: Request<proto::ApplyModesRequest>,
    ) -> Result<Response<proto::ApplyModesResponse>, Status> {
        let principal = principal(&request);
        let r = request.into_inner();
        let namespace = namespace(&r.namespace)?;
        if r.modes.is_empty() {
            return Err(invalid(
                "modes",
                "name at least one mode (`safemode mode list` shows them)",
            ));
        }
        let mut modes = Vec::with_capacity(r.modes.len());
        for name in &r.modes {
            let name = ModeName::parse(name).map_err(invalid_name("modes"))?;
            if !modes.contains(&name) {
                modes.push(name);
            }
        }
        let channels = if r.channels.is_empty() {
            ChannelSet::ALL
        } else {
            ChannelSet::parse_selector(&r.channels).map_err(invalid_name("channels"))?
        };
        let reason = reason(&r.reason)?;
        let as_of = match &r.as_of {
            None => None,
            Some(t) => {
                let t = wire::timestamp_from_wire(t).map_err(|e| invalid("as_of", e))?;
                if t > jiff::Timestamp::now() {
                    return Err(invalid(
                        "as_of",
                        "is in the future; last-known-good data is from the past",
                    ));
                }
                Some(t)
            }
        };
        if as_of.is_some() && !modes.iter().any(|m| self.serves_read_only(m)) {
            return Err(invalid(
                "as_of",
                "none of these modes serves read-only data, so an as-of time would do nothing; leave it out",
            ));
        }
        let outcome = self
            .controller
            .apply(ApplyRequest {
                namespace: namespace.clone(),
                modes,
                channels,
                as_of,
                principal,
                reason,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(proto::ApplyModesResponse {
            namespace: namespace.to_string(),
            revision: outcome.revision,
            applied: outcome
                .applied
                .iter()
                .map(|a| wire::activation_to_wire(a))
                .collect(),
            already_active: outcome
                .already_active
                .iter()
                .map(|a| wire::activation_to_wire(a))
                .collect(),
        }))
    }

    async fn lift_activations(
        &self,
        request: Request<proto::LiftActivationsRequest>,
    ) -> Result<Response<proto::LiftActivationsResponse>, Status> {
        let principal = principal(&request);
        let r = request.into_inner();
        let namespace = namespace(&r.namespace)?;
        if r.targets.is_empty() {
            return Err(invalid(
                "targets",
                "name at least one activation id or mode (`safemode status` lists them)",
            ));
        }
        let targets = r
            .targets
            .iter()
            .map(|t| LiftTarget::parse(t).map_err(invalid_name("targets")))
            .collect::<Result<Vec<_>, _>>()?;
        let reason = reason(&r.reason)?;
        let outcome = self
            .controller
            .lift(LiftRequest {
                namespace: namespace.clone(),
                targets,
                principal,
                reason,
                all: r.all,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(proto::LiftActivationsResponse {
            namespace: namespace.to_string(),
            revision: outcome.revision,
            lifted: outcome
                .lifted
                .iter()
                .map(|a| wire::activation_to_wire(a))
                .collect(),
        }))
    }

    async fn list_modes(
        &self,
        _request: Request<proto::ListModesRequest>,
    ) -> Result<Response<proto::ListModesResponse>, Status> {
        Ok(Response::new(proto::ListModesResponse {
            modes: self
                .controller
                .catalog()
                .iter()
                .map(|m| wire::mode_to_wire(m))
                .collect(),
        }))
    }

    async fn get_status(
        &self,
        request: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::GetStatusResponse>, Status> {
        let namespace = namespace(&request.get_ref().namespace)?;
        let status = self.controller.status(&namespace).await.map_err(status)?;
        Ok(Response::new(proto::GetStatusResponse {
            namespace: namespace.to_string(),
            revision: status.view.revision,
            activations: status
                .view
                .activations
                .iter()
                .map(|a| wire::activation_to_wire(a))
                .collect(),
            subscribers: status
                .subscribers
                .iter()
                .map(super::convert::subscriber_to_wire)
                .collect(),
            server_time: Some(wire::timestamp_to_wire(jiff::Timestamp::now())),
            problems: status.view.problems.clone(),
            replica: self.replica.clone(),
        }))
    }
}
