//! What drover names and tags at AWS, and how it recognises its own resources.

/// Tag keys on everything drover creates (instances get them from their group).
pub const TAG_FLEET: &str = "drover:fleet";
pub const TAG_SERVICE: &str = "drover:service";
pub const TAG_REGION: &str = "drover:region";
/// On everything drover creates: `drover`.
pub const TAG_MANAGED: &str = "drover:managed-by";
/// On instances: the plan generation of the launch template version they booted from.
pub const TAG_GENERATION: &str = "drover:generation";

/// Who owns a resource: one group of one fleet (the drover region, not the AWS region: two
/// drover regions may share an AWS region).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    pub fleet: String,
    pub service: String,
    pub region: String,
}

impl Owner {
    /// The group id, `service/region`.
    pub fn group(&self) -> String {
        format!("{}/{}", self.service, self.region)
    }

    /// Name of the launch template and of the Auto Scaling group (up to 255 characters).
    pub fn asg_name(&self) -> String {
        format!("drover-{}-{}-{}", self.fleet, self.service, self.region)
    }

    /// Name of the load balancer and of its target group: at most 32 letters, digits and
    /// hyphens, unique per fleet, service and region (a hash of the three).
    pub fn elb_name(&self) -> String {
        let short: String = self
            .service
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(20)
            .collect();
        let short = short.trim_end_matches('-');
        format!("d-{short}-{:08x}", fnv1a(&self.asg_name()))
    }

    /// The tags drover puts on everything it creates for this group.
    pub fn tags(&self) -> Vec<(&'static str, String)> {
        vec![
            (TAG_FLEET, self.fleet.clone()),
            (TAG_SERVICE, self.service.clone()),
            (TAG_REGION, self.region.clone()),
            (TAG_MANAGED, "drover".to_string()),
        ]
    }

    /// The owner a set of tags names, if they are drover's.
    pub fn from_tags<'a>(tags: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<Owner> {
        let (mut fleet, mut service, mut region) = (None, None, None);
        for (k, v) in tags {
            match k {
                TAG_FLEET => fleet = Some(v.to_string()),
                TAG_SERVICE => service = Some(v.to_string()),
                TAG_REGION => region = Some(v.to_string()),
                _ => {}
            }
        }
        Some(Owner {
            fleet: fleet?,
            service: service?,
            region: region?,
        })
    }
}

/// 32-bit FNV-1a: a short stable hash for names.
fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_aws_limits_and_tags_round_trip() {
        let o = Owner {
            fleet: "shop".into(),
            service: "a_very_long_service_name_indeed".into(),
            region: "us-east-1".into(),
        };
        let n = o.elb_name();
        assert!(n.len() <= 32, "{n}");
        assert!(
            n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "{n}"
        );
        assert!(!n.ends_with('-'));
        let other = Owner {
            region: "us-east-2".into(),
            ..o.clone()
        };
        assert_ne!(
            n,
            other.elb_name(),
            "regions must not share a load balancer name"
        );
        let tags = o.tags();
        let back = Owner::from_tags(tags.iter().map(|(k, v)| (*k, v.as_str())));
        assert_eq!(back, Some(o));
        assert_eq!(Owner::from_tags([("Name", "x")]), None);
    }
}
