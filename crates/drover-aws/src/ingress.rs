//! An ingress at AWS: a Network Load Balancer with one TCP listener forwarding to a target
//! group that the group's Auto Scaling group feeds. Its health check and deregistration delay
//! come from the service's settings; the leave path deregisters a target and waits out the
//! delay before the instance stops.

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_elasticloadbalancingv2::types as elbt;

use crate::names::Owner;
use crate::{api, AwsError, Clients};

/// The target group's health check, derived from the ingress component's check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// An HTTP check on this path, else a TCP check.
    pub http_path: Option<String>,
    /// Seconds between checks (NLB allows 5 to 300).
    pub interval_s: u32,
    /// Checks in a row to turn healthy / unhealthy (NLB allows 2 to 10).
    pub healthy: u32,
    pub unhealthy: u32,
}

impl HealthCheck {
    /// The same check within the ranges an NLB target group accepts.
    pub fn clamped(&self) -> HealthCheck {
        HealthCheck {
            http_path: self.http_path.clone(),
            interval_s: self.interval_s.clamp(5, 300),
            healthy: self.healthy.clamp(2, 10),
            unhealthy: self.unhealthy.clamp(2, 10),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressSpec {
    pub owner: Owner,
    /// The port the load balancer listens on (the port of the ingress's `listen`).
    pub listen_port: u16,
    /// The component port traffic goes to on each instance.
    pub target_port: u16,
    pub subnets: Vec<String>,
    pub health: Option<HealthCheck>,
    /// How long a deregistered target keeps its connections (the rollout's drain timeout).
    pub deregistration_delay_s: u64,
}

/// A made load balancer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nlb {
    pub load_balancer_arn: String,
    pub target_group_arn: String,
    pub dns_name: String,
}

fn elb_tags(owner: &Owner) -> Vec<elbt::Tag> {
    owner
        .tags()
        .into_iter()
        .map(|(k, v)| elbt::Tag::builder().key(k).value(v).build())
        .collect()
}

fn not_found<E: ProvideErrorMetadata>(e: &E) -> bool {
    e.code().is_some_and(|c| c.contains("NotFound"))
}

/// The owner an ELB resource's tags name.
async fn owner_of(c: &Clients, arn: &str) -> Result<Option<Owner>, AwsError> {
    let t = c
        .elb
        .describe_tags()
        .resource_arns(arn)
        .send()
        .await
        .map_err(api("DescribeTags"))?;
    Ok(t.tag_descriptions().first().and_then(|d| {
        Owner::from_tags(d.tags().iter().filter_map(|t| Some((t.key()?, t.value()?))))
    }))
}

async fn find_target_group(c: &Clients, name: &str) -> Result<Option<String>, AwsError> {
    match c.elb.describe_target_groups().names(name).send().await {
        Ok(o) => Ok(o
            .target_groups()
            .first()
            .and_then(|t| t.target_group_arn().map(str::to_string))),
        Err(e) if not_found(&e) => Ok(None),
        Err(e) => Err(api("DescribeTargetGroups")(e)),
    }
}

async fn find_load_balancer(c: &Clients, name: &str) -> Result<Option<(String, String)>, AwsError> {
    match c.elb.describe_load_balancers().names(name).send().await {
        Ok(o) => Ok(o.load_balancers().first().and_then(|l| {
            Some((
                l.load_balancer_arn()?.to_string(),
                l.dns_name().unwrap_or_default().to_string(),
            ))
        })),
        Err(e) if not_found(&e) => Ok(None),
        Err(e) => Err(api("DescribeLoadBalancers")(e)),
    }
}

/// Make sure the load balancer, its target group (health check and deregistration delay as
/// `spec` says) and its listener exist. Refuses to adopt same-named resources that are not
/// drover's for this group.
pub async fn ensure(c: &Clients, spec: &IngressSpec) -> Result<Nlb, AwsError> {
    let name = spec.owner.elb_name();
    let health = spec.health.as_ref().map(HealthCheck::clamped);
    let (hc_proto, hc_path) = match health.as_ref().and_then(|h| h.http_path.clone()) {
        Some(p) => (elbt::ProtocolEnum::Http, Some(p)),
        None => (elbt::ProtocolEnum::Tcp, None),
    };
    let tg = match find_target_group(c, &name).await? {
        Some(arn) => {
            if owner_of(c, &arn).await?.as_ref() != Some(&spec.owner) {
                return Err(AwsError::Refused(format!(
                    "a target group named {name} exists but is not drover's for {}",
                    spec.owner.group()
                )));
            }
            let mut m = c
                .elb
                .modify_target_group()
                .target_group_arn(&arn)
                .health_check_protocol(hc_proto.clone())
                .set_health_check_path(hc_path.clone());
            if let Some(h) = &health {
                m = m
                    .health_check_interval_seconds(h.interval_s as i32)
                    .healthy_threshold_count(h.healthy as i32)
                    .unhealthy_threshold_count(h.unhealthy as i32);
            }
            m.send().await.map_err(api("ModifyTargetGroup"))?;
            arn
        }
        None => {
            let subnet = spec
                .subnets
                .first()
                .ok_or_else(|| AwsError::Missing("an ingress needs at least one subnet".into()))?;
            let vpc = c
                .ec2
                .describe_subnets()
                .subnet_ids(subnet)
                .send()
                .await
                .map_err(api("DescribeSubnets"))?
                .subnets()
                .first()
                .and_then(|s| s.vpc_id().map(str::to_string))
                .ok_or_else(|| AwsError::Missing(format!("subnet {subnet} has no VPC")))?;
            let mut b = c
                .elb
                .create_target_group()
                .name(&name)
                .protocol(elbt::ProtocolEnum::Tcp)
                .port(i32::from(spec.target_port))
                .vpc_id(vpc)
                .target_type(elbt::TargetTypeEnum::Instance)
                .health_check_enabled(true)
                .health_check_protocol(hc_proto)
                .health_check_port("traffic-port")
                .set_health_check_path(hc_path)
                .set_tags(Some(elb_tags(&spec.owner)));
            if let Some(h) = &health {
                b = b
                    .health_check_interval_seconds(h.interval_s as i32)
                    .healthy_threshold_count(h.healthy as i32)
                    .unhealthy_threshold_count(h.unhealthy as i32);
            }
            let out = b.send().await.map_err(api("CreateTargetGroup"))?;
            out.target_groups()
                .first()
                .and_then(|t| t.target_group_arn().map(str::to_string))
                .ok_or_else(|| AwsError::Missing("CreateTargetGroup returned no ARN".into()))?
        }
    };
    c.elb
        .modify_target_group_attributes()
        .target_group_arn(&tg)
        .attributes(
            elbt::TargetGroupAttribute::builder()
                .key("deregistration_delay.timeout_seconds")
                .value(spec.deregistration_delay_s.min(3600).to_string())
                .build(),
        )
        .send()
        .await
        .map_err(api("ModifyTargetGroupAttributes"))?;

    let (lb, dns) = match find_load_balancer(c, &name).await? {
        Some((arn, dns)) => {
            if owner_of(c, &arn).await?.as_ref() != Some(&spec.owner) {
                return Err(AwsError::Refused(format!(
                    "a load balancer named {name} exists but is not drover's for {}",
                    spec.owner.group()
                )));
            }
            (arn, dns)
        }
        None => {
            let out = c
                .elb
                .create_load_balancer()
                .name(&name)
                .r#type(elbt::LoadBalancerTypeEnum::Network)
                .scheme(elbt::LoadBalancerSchemeEnum::InternetFacing)
                .set_subnets(Some(spec.subnets.clone()))
                .set_tags(Some(elb_tags(&spec.owner)))
                .send()
                .await
                .map_err(api("CreateLoadBalancer"))?;
            let l = out
                .load_balancers()
                .first()
                .ok_or_else(|| AwsError::Missing("CreateLoadBalancer returned nothing".into()))?;
            (
                l.load_balancer_arn().unwrap_or_default().to_string(),
                l.dns_name().unwrap_or_default().to_string(),
            )
        }
    };
    let listeners = c
        .elb
        .describe_listeners()
        .load_balancer_arn(&lb)
        .send()
        .await
        .map_err(api("DescribeListeners"))?;
    let has = listeners
        .listeners()
        .iter()
        .any(|l| l.port() == Some(i32::from(spec.listen_port)));
    if !has {
        c.elb
            .create_listener()
            .load_balancer_arn(&lb)
            .protocol(elbt::ProtocolEnum::Tcp)
            .port(i32::from(spec.listen_port))
            .default_actions(
                elbt::Action::builder()
                    .r#type(elbt::ActionTypeEnum::Forward)
                    .target_group_arn(&tg)
                    .build(),
            )
            .send()
            .await
            .map_err(api("CreateListener"))?;
    }
    Ok(Nlb {
        load_balancer_arn: lb,
        target_group_arn: tg,
        dns_name: dns,
    })
}

/// Take an instance out of the target group: no new connection reaches it; existing ones
/// have the deregistration delay to finish.
pub async fn deregister(c: &Clients, target_group: &str, instance: &str) -> Result<(), AwsError> {
    c.elb
        .deregister_targets()
        .target_group_arn(target_group)
        .targets(elbt::TargetDescription::builder().id(instance).build())
        .send()
        .await
        .map_err(api("DeregisterTargets"))?;
    Ok(())
}

/// The target's state in the target group (`draining`, `healthy`, `unused`, ...), `None` when
/// the group does not list it.
pub async fn target_state(
    c: &Clients,
    target_group: &str,
    instance: &str,
) -> Result<Option<String>, AwsError> {
    let out = c
        .elb
        .describe_target_health()
        .target_group_arn(target_group)
        .send()
        .await
        .map_err(api("DescribeTargetHealth"))?;
    Ok(out
        .target_health_descriptions()
        .iter()
        .find(|d| d.target().and_then(|t| t.id()) == Some(instance))
        .and_then(|d| d.target_health()?.state().map(|s| s.as_str().to_string())))
}

/// Delete the group's load balancer (its listeners go with it) and target group, if they are
/// drover's for `owner`. Returns what it deleted.
pub async fn destroy(c: &Clients, owner: &Owner) -> Result<Vec<String>, AwsError> {
    let name = owner.elb_name();
    let mut done = Vec::new();
    if let Some((arn, _)) = find_load_balancer(c, &name).await? {
        if owner_of(c, &arn).await?.as_ref() == Some(owner) {
            c.elb
                .delete_load_balancer()
                .load_balancer_arn(&arn)
                .send()
                .await
                .map_err(api("DeleteLoadBalancer"))?;
            done.push(format!("load balancer {name}"));
        }
    }
    if let Some(arn) = find_target_group(c, &name).await? {
        if owner_of(c, &arn).await?.as_ref() == Some(owner) {
            c.elb
                .delete_target_group()
                .target_group_arn(&arn)
                .send()
                .await
                .map_err(api("DeleteTargetGroup"))?;
            done.push(format!("target group {name}"));
        }
    }
    Ok(done)
}
