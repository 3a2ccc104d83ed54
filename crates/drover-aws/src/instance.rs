//! The instance's side on EC2: who am I (IMDSv2: instance id, private address, user-data
//! with the boot document) and how I leave (terminating myself through my Auto Scaling group).

use std::net::IpAddr;

use drover_model::boot::BootDoc;

use crate::{AwsError, Clients};

/// What instance metadata tells an agent.
#[derive(Clone, Debug)]
pub struct Identity {
    pub instance_id: String,
    pub addr: IpAddr,
    /// `None` when the user-data holds no boot document (the agent then asks the server).
    pub boot: Option<BootDoc>,
    /// The user-data's problem when it is there but not a valid boot document.
    pub boot_error: Option<String>,
}

/// Read the instance's identity from IMDSv2 (a session token first, then each value), at
/// `endpoint` when given (else the standard endpoint, or `AWS_EC2_METADATA_SERVICE_ENDPOINT`).
pub async fn identify(endpoint: Option<&str>) -> Result<Identity, AwsError> {
    let mut b = aws_config::imds::Client::builder();
    if let Some(e) = endpoint {
        b = b
            .endpoint(e)
            .map_err(|e| AwsError::Imds(format!("bad endpoint: {e}")))?;
    }
    let imds = b.build();
    let get = |path: &'static str| {
        let imds = imds.clone();
        async move {
            imds.get(path)
                .await
                .map(String::from)
                .map_err(|e| AwsError::Imds(format!("{path}: {e}")))
        }
    };
    let instance_id = get("/latest/meta-data/instance-id").await?;
    let ip = get("/latest/meta-data/local-ipv4").await?;
    let addr = ip
        .trim()
        .parse()
        .map_err(|_| AwsError::Imds(format!("local-ipv4 {ip:?} is not an address")))?;
    let (boot, boot_error) = match get("/latest/user-data").await {
        Ok(text) => match BootDoc::decode(&text) {
            Ok(d) => (Some(d), None),
            Err(e) => (None, Some(e.to_string())),
        },
        // No user-data at all: IMDS answers 404.
        Err(e) => (None, Some(e.to_string())),
    };
    Ok(Identity {
        instance_id: instance_id.trim().to_string(),
        addr,
        boot,
        boot_error,
    })
}

/// After draining and stopping on a permit: terminate this instance through its Auto Scaling
/// group (lowering the desired capacity or not, as the boot document says).
pub async fn leave(c: &Clients, instance_id: &str, decrement: bool) -> Result<(), AwsError> {
    crate::group::terminate(c, instance_id, decrement).await
}
