//! `drover agent --aws`: the agent on an EC2 instance. Its identity (instance id, private
//! address) comes from IMDSv2, its server, group, token and plan from the boot document in
//! its user-data (or, when the plan did not fit there, from the server). After leaving on a
//! permit it terminates its own instance through its Auto Scaling group.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use drover_model::boot::BootDoc;

/// What the agent runs with, and how it leaves.
pub struct Ec2Agent {
    pub cfg: drover_agent::AgentConfig,
    pub auth: drover_agent::AgentAuth,
    pub aws_region: String,
    /// From the boot document: whether leaving lowers the group's desired capacity, when the
    /// permit does not say (a server that predates `PermitReply::decrement`).
    pub decrement_on_leave: bool,
}

/// Read metadata and the boot document; fetch the plan from the server if it is not there.
pub async fn prepare(imds_endpoint: Option<&str>, dir: PathBuf) -> anyhow::Result<Ec2Agent> {
    let id = drover_aws::instance::identify(imds_endpoint)
        .await
        .context("cannot read this instance's identity")?;
    let Some(boot) = id.boot else {
        bail!(
            "the instance's user-data is not a drover boot document ({}); launch it from a drover launch template",
            id.boot_error.unwrap_or_default()
        );
    };
    let BootDoc {
        server,
        group,
        token,
        ca_pem,
        ca_sha256,
        heartbeat_interval_ms,
        aws_region,
        decrement_on_leave,
        generation,
        plan,
    } = boot;
    let mut auth = drover_agent::AgentAuth {
        token,
        ..Default::default()
    };
    if let (Some(pem), Some(pin)) = (ca_pem, ca_sha256.as_deref()) {
        auth.pin_ca(pem.into_bytes(), pin)?;
    }
    let plan = match plan {
        Some(p) => p,
        None => {
            let (service, region) = group
                .split_once('/')
                .with_context(|| format!("group {group:?} is not service/region"))?;
            let url = format!("{server}/v1/plans/{service}/{region}/{generation}");
            let client = auth.server_client(server.starts_with("https://"))?;
            client
                .get(&url)
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .with_context(|| {
                    format!("the plan is not in the user-data and {url} did not answer")
                })?
                .json()
                .await
                .with_context(|| format!("{url} did not return a plan"))?
        }
    };
    Ok(Ec2Agent {
        cfg: drover_agent::AgentConfig {
            instance: id.instance_id,
            group,
            addr: id.addr,
            server: Some(server),
            plan,
            dir,
            drover_bin: std::env::current_exe().context("cannot find the drover binary")?,
            heartbeat_interval: Duration::from_millis(heartbeat_interval_ms.max(100)),
        },
        auth,
        aws_region,
        decrement_on_leave,
    })
}

/// After leaving on a permit: terminate this instance through its Auto Scaling group,
/// lowering its desired capacity (`decrement`) or letting the group launch a replacement. The
/// AWS endpoint is the standard one (or `AWS_ENDPOINT_URL`), the credentials the instance
/// role's.
pub async fn terminate_self(a: &Ec2Agent, decrement: bool) -> anyhow::Result<()> {
    let c = drover_aws::Clients::connect(&a.aws_region, None).await;
    drover_aws::instance::leave(&c, &a.cfg.instance, decrement)
        .await
        .with_context(|| format!("cannot terminate instance {}", a.cfg.instance))
}
