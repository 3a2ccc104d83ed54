//! The server's side of the fleet's world ([`drover_control::world`], which holds the rules):
//! the API's look-up of a service.

pub use drover_control::world::*;

/// The service `service` of the fleet (checked to run in `region` when given), or why not:
/// nothing applied (409), no such service or region (404, naming the ones there are).
pub fn service_in(
    st: &World,
    service: &str,
    region: Option<&str>,
) -> Result<drover_model::fleet::Service, crate::ServerError> {
    use crate::ServerError;
    let fleet = st.fleet().ok_or(ServerError::NothingApplied { to: None })?;
    let svc = fleet
        .services
        .get(service)
        .ok_or_else(|| crate::apply::no_service(service, fleet))?;
    if let Some(r) = region {
        if !svc.regions.iter().any(|x| x == r) {
            return Err(ServerError::NoRegion {
                service: service.to_string(),
                region: r.to_string(),
                known: svc.regions.clone(),
            });
        }
    }
    Ok(svc.clone())
}
