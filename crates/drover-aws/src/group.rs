//! A group at AWS: a launch template (one version per plan generation, whose user-data is the
//! boot document) and an Auto Scaling group that launches from it.

use std::collections::HashMap;
use std::net::IpAddr;

use aws_sdk_autoscaling::types as asgt;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types as ec2t;
use base64::Engine as _;

use crate::names::Owner;
use crate::{api, AwsError, Clients};

/// What a launch template version holds: one plan generation of one group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchSpec {
    pub owner: Owner,
    pub generation: u64,
    pub ami: String,
    pub instance_type: String,
    pub security_groups: Vec<String>,
    pub instance_profile: Option<String>,
    /// The boot document (`drover_model::boot::BootDoc::encode`), as plain text.
    pub user_data: String,
}

/// The version description that marks which generation a version boots.
pub fn version_description(generation: u64) -> String {
    format!("drover generation {generation}")
}

/// The group's launch template and the version of `spec.generation` (made the default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupResources {
    pub launch_template_id: String,
    pub version: i64,
}

fn ec2_tags(owner: &Owner, kind: ec2t::ResourceType) -> ec2t::TagSpecification {
    let mut b = ec2t::TagSpecification::builder().resource_type(kind);
    for (k, v) in owner.tags() {
        b = b.tags(ec2t::Tag::builder().key(k).value(v).build());
    }
    b.build()
}

fn template_data(spec: &LaunchSpec) -> ec2t::RequestLaunchTemplateData {
    let mut d = ec2t::RequestLaunchTemplateData::builder()
        .image_id(&spec.ami)
        .instance_type(ec2t::InstanceType::from(spec.instance_type.as_str()))
        .user_data(base64::engine::general_purpose::STANDARD.encode(&spec.user_data))
        .set_security_group_ids(Some(spec.security_groups.clone()))
        // IMDSv2 only: the agent reads its identity and boot document with a session token.
        .metadata_options(
            ec2t::LaunchTemplateInstanceMetadataOptionsRequest::builder()
                .http_tokens(ec2t::LaunchTemplateHttpTokensState::Required)
                .http_endpoint(ec2t::LaunchTemplateInstanceMetadataEndpointState::Enabled)
                .http_put_response_hop_limit(1)
                .build(),
        )
        .tag_specifications(
            ec2t::LaunchTemplateTagSpecificationRequest::builder()
                .resource_type(ec2t::ResourceType::Instance)
                .set_tags(Some(
                    spec.owner
                        .tags()
                        .into_iter()
                        .chain([(crate::names::TAG_GENERATION, spec.generation.to_string())])
                        .map(|(k, v)| ec2t::Tag::builder().key(k).value(v).build())
                        .collect(),
                ))
                .build(),
        );
    if let Some(p) = &spec.instance_profile {
        d = d.iam_instance_profile(
            ec2t::LaunchTemplateIamInstanceProfileSpecificationRequest::builder()
                .name(p)
                .build(),
        );
    }
    d.build()
}

/// Make sure the group's launch template exists and has a version for `spec.generation`,
/// and that this version is the template's default. Idempotent: a version already made for
/// the generation (e.g. before a server restart) is reused.
pub async fn ensure_launch_template(
    c: &Clients,
    spec: &LaunchSpec,
) -> Result<GroupResources, AwsError> {
    let name = spec.owner.asg_name();
    let desc = version_description(spec.generation);
    let found = c
        .ec2
        .describe_launch_templates()
        .launch_template_names(&name)
        .send()
        .await;
    let existing = match found {
        Ok(out) => out
            .launch_templates()
            .first()
            .and_then(|t| t.launch_template_id().map(str::to_string)),
        Err(e) if e.code().is_some_and(|c| c.contains("NotFound")) => None,
        Err(e) => return Err(api("DescribeLaunchTemplates")(e)),
    };
    let Some(id) = existing else {
        let out = c
            .ec2
            .create_launch_template()
            .launch_template_name(&name)
            .version_description(&desc)
            .launch_template_data(template_data(spec))
            .tag_specifications(ec2_tags(&spec.owner, ec2t::ResourceType::LaunchTemplate))
            .send()
            .await
            .map_err(api("CreateLaunchTemplate"))?;
        let t = out
            .launch_template()
            .ok_or_else(|| AwsError::Missing("CreateLaunchTemplate returned no template".into()))?;
        return Ok(GroupResources {
            launch_template_id: t.launch_template_id().unwrap_or_default().to_string(),
            version: t.latest_version_number().unwrap_or(1),
        });
    };
    // The template is drover's only if it carries this group's tags.
    let tags = c
        .ec2
        .describe_tags()
        .filters(
            ec2t::Filter::builder()
                .name("resource-id")
                .values(&id)
                .build(),
        )
        .send()
        .await
        .map_err(api("DescribeTags"))?;
    let owner = Owner::from_tags(
        tags.tags()
            .iter()
            .filter_map(|t| Some((t.key()?, t.value()?))),
    );
    if owner.as_ref() != Some(&spec.owner) {
        return Err(AwsError::Refused(format!(
            "a launch template named {name} exists but is not drover's for {} (its tags say {owner:?}); rename or delete it",
            spec.owner.group()
        )));
    }
    let versions = c
        .ec2
        .describe_launch_template_versions()
        .launch_template_id(&id)
        .send()
        .await
        .map_err(api("DescribeLaunchTemplateVersions"))?;
    let version = match versions
        .launch_template_versions()
        .iter()
        .find(|v| v.version_description() == Some(desc.as_str()))
        .and_then(|v| v.version_number())
    {
        Some(v) => v,
        None => c
            .ec2
            .create_launch_template_version()
            .launch_template_id(&id)
            .version_description(&desc)
            .launch_template_data(template_data(spec))
            .send()
            .await
            .map_err(api("CreateLaunchTemplateVersion"))?
            .launch_template_version()
            .and_then(|v| v.version_number())
            .ok_or_else(|| {
                AwsError::Missing("CreateLaunchTemplateVersion returned no version".into())
            })?,
    };
    c.ec2
        .modify_launch_template()
        .launch_template_id(&id)
        .default_version(version.to_string())
        .send()
        .await
        .map_err(api("ModifyLaunchTemplate"))?;
    Ok(GroupResources {
        launch_template_id: id,
        version,
    })
}

/// Make sure the Auto Scaling group exists, launches `res`'s version, may grow to `max`, feeds
/// `target_groups` and has its add-one scaling policy ([`add_one`]). A new group starts at
/// desired capacity 0: the controller raises it one launch at a time. An existing group keeps
/// its desired capacity.
pub async fn ensure_asg(
    c: &Clients,
    owner: &Owner,
    res: &GroupResources,
    subnets: &[String],
    max: u32,
    target_groups: &[String],
) -> Result<(), AwsError> {
    let name = owner.asg_name();
    let lt = asgt::LaunchTemplateSpecification::builder()
        .launch_template_id(&res.launch_template_id)
        .version(res.version.to_string())
        .build();
    let found = describe(c, Some(&name)).await?;
    match found.into_iter().next() {
        None => {
            let mut b = c
                .asg
                .create_auto_scaling_group()
                .auto_scaling_group_name(&name)
                .launch_template(lt)
                .min_size(0)
                .max_size(max as i32)
                .desired_capacity(0)
                .vpc_zone_identifier(subnets.join(","))
                .set_target_group_arns(Some(target_groups.to_vec()));
            for (k, v) in owner.tags() {
                b = b.tags(
                    asgt::Tag::builder()
                        .key(k)
                        .value(v)
                        .resource_id(&name)
                        .resource_type("auto-scaling-group")
                        .propagate_at_launch(true)
                        .build(),
                );
            }
            b.send().await.map_err(api("CreateAutoScalingGroup"))?;
        }
        Some(view) => {
            if view.owner != *owner {
                return Err(AwsError::Refused(format!(
                    "an Auto Scaling group named {name} exists but is not drover's for {}",
                    owner.group()
                )));
            }
            c.asg
                .update_auto_scaling_group()
                .auto_scaling_group_name(&name)
                .launch_template(lt)
                .max_size(max as i32)
                .send()
                .await
                .map_err(api("UpdateAutoScalingGroup"))?;
            let missing: Vec<String> = target_groups
                .iter()
                .filter(|t| !view.target_groups.contains(t))
                .cloned()
                .collect();
            if !missing.is_empty() {
                c.asg
                    .attach_load_balancer_target_groups()
                    .auto_scaling_group_name(&name)
                    .set_target_group_arns(Some(missing))
                    .send()
                    .await
                    .map_err(api("AttachLoadBalancerTargetGroups"))?;
            }
        }
    }
    // Launches raise the capacity through it (see `add_one`).
    ensure_add_one_policy(c, &name).await
}

/// One instance of an Auto Scaling group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AsgInstance {
    pub id: String,
    /// `Pending`, `InService`, `Terminating`, ...
    pub lifecycle: String,
    /// The launch template version it was launched from.
    pub version: Option<String>,
}

impl AsgInstance {
    /// On its way out (or gone): not an instance to count or claim.
    pub fn leaving(&self) -> bool {
        self.lifecycle.starts_with("Terminat")
            || self.lifecycle.starts_with("Detach")
            || self.lifecycle.starts_with("Standby")
            || self.lifecycle.starts_with("Warmed")
    }
}

/// What drover reads of an Auto Scaling group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AsgView {
    pub name: String,
    pub owner: Owner,
    pub desired: u32,
    pub max: u32,
    pub instances: Vec<AsgInstance>,
    pub target_groups: Vec<String>,
}

fn view(g: &asgt::AutoScalingGroup) -> Option<AsgView> {
    let owner = Owner::from_tags(g.tags().iter().filter_map(|t| Some((t.key()?, t.value()?))))?;
    Some(AsgView {
        name: g.auto_scaling_group_name()?.to_string(),
        owner,
        desired: g.desired_capacity().unwrap_or(0).max(0) as u32,
        max: g.max_size().unwrap_or(0).max(0) as u32,
        instances: g
            .instances()
            .iter()
            .filter_map(|i| {
                Some(AsgInstance {
                    id: i.instance_id()?.to_string(),
                    lifecycle: i
                        .lifecycle_state()
                        .map(|s| s.as_str().to_string())
                        .unwrap_or_default(),
                    version: i
                        .launch_template()
                        .and_then(|t| t.version())
                        .map(str::to_string),
                })
            })
            .collect(),
        target_groups: g.target_group_arns().to_vec(),
    })
}

/// drover's Auto Scaling groups (those whose tags name an owner), all of them or one by
/// name. Groups without drover's tags are not returned.
pub async fn describe(c: &Clients, name: Option<&str>) -> Result<Vec<AsgView>, AwsError> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut req = c
            .asg
            .describe_auto_scaling_groups()
            .set_next_token(token.clone());
        if let Some(n) = name {
            req = req.auto_scaling_group_names(n);
        }
        let page = req.send().await.map_err(api("DescribeAutoScalingGroups"))?;
        out.extend(page.auto_scaling_groups().iter().filter_map(view));
        token = page.next_token().map(str::to_string);
        if token.is_none() {
            return Ok(out);
        }
    }
}

/// The groups of one fleet's region.
pub async fn describe_fleet(
    c: &Clients,
    fleet: &str,
    region: &str,
) -> Result<Vec<AsgView>, AwsError> {
    let mut all = describe(c, None).await?;
    all.retain(|g| g.owner.fleet == fleet && g.owner.region == region);
    Ok(all)
}

/// The group's simple scaling policy that adds one instance (see [`add_one`]).
pub fn add_one_policy(asg: &str) -> String {
    format!("{asg}-add-one")
}

/// Make sure the group has its simple scaling policy that adds one instance (`PutScalingPolicy`
/// creates or updates it). Nothing executes it but drover's launches: no alarm is attached.
pub async fn ensure_add_one_policy(c: &Clients, asg: &str) -> Result<(), AwsError> {
    c.asg
        .put_scaling_policy()
        .auto_scaling_group_name(asg)
        .policy_name(add_one_policy(asg))
        .policy_type("SimpleScaling")
        .adjustment_type("ChangeInCapacity")
        .scaling_adjustment(1)
        .cooldown(0)
        .send()
        .await
        .map_err(api("PutScalingPolicy"))?;
    Ok(())
}

/// Raise the group's desired capacity by one, relative to its value at AWS when the call is
/// handled (`ExecutePolicy` of the group's add-one policy, cooldown ignored). Unlike
/// `SetDesiredCapacity` with a count read before, it cannot undo a decrement made in between
/// (an instance leaving with `ShouldDecrementDesiredCapacity`), which would start an instance
/// nobody launched. AWS keeps the result within the group's maximum.
pub async fn add_one(c: &Clients, asg: &str) -> Result<(), AwsError> {
    c.asg
        .execute_policy()
        .auto_scaling_group_name(asg)
        .policy_name(add_one_policy(asg))
        .honor_cooldown(false)
        .send()
        .await
        .map_err(api("ExecutePolicy"))?;
    Ok(())
}

/// Terminate one instance through its Auto Scaling group, lowering the desired capacity with
/// it or letting the group launch a replacement.
pub async fn terminate(c: &Clients, instance: &str, decrement: bool) -> Result<(), AwsError> {
    c.asg
        .terminate_instance_in_auto_scaling_group()
        .instance_id(instance)
        .should_decrement_desired_capacity(decrement)
        .send()
        .await
        .map_err(api("TerminateInstanceInAutoScalingGroup"))?;
    Ok(())
}

/// What an instance's own record says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceFacts {
    /// Its private address (what its agent binds and reports).
    pub addr: Option<IpAddr>,
    /// The owner its tags name, if drover's.
    pub owner: Option<Owner>,
    /// The plan generation it booted (its `drover:generation` tag).
    pub generation: Option<u64>,
}

/// Private address, owner and generation (from the instance's own tags) of each instance.
pub async fn instances(
    c: &Clients,
    ids: &[String],
) -> Result<HashMap<String, InstanceFacts>, AwsError> {
    let mut out = HashMap::new();
    if ids.is_empty() {
        return Ok(out);
    }
    let r = c
        .ec2
        .describe_instances()
        .set_instance_ids(Some(ids.to_vec()))
        .send()
        .await
        .map_err(api("DescribeInstances"))?;
    for res in r.reservations() {
        for i in res.instances() {
            let Some(id) = i.instance_id() else { continue };
            let tags = || i.tags().iter().filter_map(|t| Some((t.key()?, t.value()?)));
            out.insert(
                id.to_string(),
                InstanceFacts {
                    addr: i.private_ip_address().and_then(|a| a.parse().ok()),
                    owner: Owner::from_tags(tags()),
                    generation: tags()
                        .find(|(k, _)| *k == crate::names::TAG_GENERATION)
                        .and_then(|(_, v)| v.parse().ok()),
                },
            );
        }
    }
    Ok(out)
}

/// Delete the group's Auto Scaling group with its instances (force), if it is drover's for
/// `owner`. Returns what it deleted.
pub async fn delete_asg(c: &Clients, owner: &Owner) -> Result<Option<String>, AwsError> {
    let name = owner.asg_name();
    let Some(v) = describe(c, Some(&name)).await?.into_iter().next() else {
        return Ok(None);
    };
    if v.owner != *owner {
        return Ok(None);
    }
    c.asg
        .delete_auto_scaling_group()
        .auto_scaling_group_name(&name)
        .force_delete(true)
        .send()
        .await
        .map_err(api("DeleteAutoScalingGroup"))?;
    Ok(Some(format!(
        "Auto Scaling group {name} ({} instance(s))",
        v.instances.len()
    )))
}

/// Delete the group's launch template, if it is drover's for `owner`.
pub async fn delete_template(c: &Clients, owner: &Owner) -> Result<Option<String>, AwsError> {
    let name = owner.asg_name();
    let found = c
        .ec2
        .describe_launch_templates()
        .filters(
            ec2t::Filter::builder()
                .name(format!("tag:{}", crate::names::TAG_FLEET))
                .values(&owner.fleet)
                .build(),
        )
        .send()
        .await
        .map_err(api("DescribeLaunchTemplates"))?;
    for t in found.launch_templates() {
        let tags = Owner::from_tags(t.tags().iter().filter_map(|t| Some((t.key()?, t.value()?))));
        if t.launch_template_name() == Some(name.as_str()) && tags.as_ref() == Some(owner) {
            if let Some(id) = t.launch_template_id() {
                c.ec2
                    .delete_launch_template()
                    .launch_template_id(id)
                    .send()
                    .await
                    .map_err(api("DeleteLaunchTemplate"))?;
                return Ok(Some(format!("launch template {name} ({id})")));
            }
        }
    }
    Ok(None)
}

/// Remove everything drover made for a group, in an order AWS accepts: the Auto Scaling
/// group (its instances go with it and its target group is detached), the load balancer
/// (its listeners go with it), the target group, the launch template. Only resources whose
/// tags name `owner` are touched. Returns what it deleted.
pub async fn destroy(c: &Clients, owner: &Owner) -> Result<Vec<String>, AwsError> {
    let mut done: Vec<String> = delete_asg(c, owner).await?.into_iter().collect();
    done.extend(crate::ingress::destroy(c, owner).await?);
    done.extend(delete_template(c, owner).await?);
    Ok(done)
}
