//! drover on AWS, through the official SDK: each group is a launch template plus an EC2 Auto
//! Scaling group, each ingress a Network Load Balancer with a TCP target group attached to the
//! group; and the instance's side (identity and boot document from IMDSv2, leaving through
//! the Auto Scaling API). Behind the `aws` cargo feature of the crates that use it.

pub mod group;
pub mod ingress;
pub mod instance;
pub mod names;

use aws_config::BehaviorVersion;

pub use group::{AsgInstance, AsgView, GroupResources, LaunchSpec};
pub use ingress::{HealthCheck, IngressSpec, Nlb};
pub use names::Owner;

#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    /// An AWS API call failed; the text is the SDK's full error context.
    #[error("AWS {op}: {msg}")]
    Api { op: &'static str, msg: String },
    #[error("{0}")]
    Missing(String),
    #[error("instance metadata (IMDSv2): {0}")]
    Imds(String),
    #[error("{0}")]
    Boot(#[from] drover_model::boot::BootError),
    #[error("{0}")]
    Refused(String),
}

/// Turns an SDK error into [`AwsError::Api`] with everything the SDK knows about it.
pub(crate) fn api<E: std::error::Error>(op: &'static str) -> impl FnOnce(E) -> AwsError {
    move |e| AwsError::Api {
        op,
        msg: aws_sdk_ec2::error::DisplayErrorContext(e).to_string(),
    }
}

/// The three clients drover needs in one AWS region.
#[derive(Clone, Debug)]
pub struct Clients {
    pub region: String,
    pub ec2: aws_sdk_ec2::Client,
    pub asg: aws_sdk_autoscaling::Client,
    pub elb: aws_sdk_elasticloadbalancingv2::Client,
}

impl Clients {
    /// Clients for `region` with the standard credential chain (environment, profile, SSO,
    /// instance role, ...), and every API at `endpoint` when given (a moto server in tests).
    pub async fn connect(region: &str, endpoint: Option<&str>) -> Clients {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_string()));
        if let Some(e) = endpoint {
            loader = loader.endpoint_url(e);
        }
        let conf = loader.load().await;
        Clients {
            region: region.to_string(),
            ec2: aws_sdk_ec2::Client::new(&conf),
            asg: aws_sdk_autoscaling::Client::new(&conf),
            elb: aws_sdk_elasticloadbalancingv2::Client::new(&conf),
        }
    }
}

/// The SDK crates, for callers that need their types (tests set up VPCs and foreign resources).
pub use aws_sdk_autoscaling as sdk_autoscaling;
pub use aws_sdk_ec2 as sdk_ec2;
pub use aws_sdk_elasticloadbalancingv2 as sdk_elbv2;
