//! The MQTT topic scheme.
//!
//! | direction | topic |
//! |---|---|
//! | device → gateway | `outpost/v1/{site}/{device}/punch` |
//! | gateway → device | `outpost/v1/{site}/{device}/ack` |
//!
//! `{site}` and `{device}` are identifiers ([`crate::Id`]) that are also valid topic
//! segments: no `/`, `+`, `#`, no control characters, 1 to 64 bytes. The gateway subscribes
//! to `outpost/v1/{site}/+/punch`.

use core::fmt::{self, Write};

use crate::id::{Id, IdError};

/// The fixed prefix of every Outpost topic.
pub const PREFIX: &str = "outpost/v1/";

/// Why a topic string is not an Outpost topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicError {
    /// It does not start with `outpost/v1/` or has the wrong number of segments.
    NotOutpost,
    /// The last segment is neither `punch` nor `ack`.
    UnknownLeaf,
    /// The site segment is not a valid topic-safe identifier.
    Site(IdError),
    /// The device segment is not a valid topic-safe identifier.
    Device(IdError),
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicError::NotOutpost => {
                f.write_str("topic is not outpost/v1/{site}/{device}/{punch|ack}")
            }
            TopicError::UnknownLeaf => f.write_str("topic must end in /punch or /ack"),
            TopicError::Site(e) => write!(f, "site segment {e}"),
            TopicError::Device(e) => write!(f, "device segment {e}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for TopicError {}

/// Which way a topic carries messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    /// Punches from a device.
    Punch,
    /// Acks to a device.
    Ack,
}

/// A parsed Outpost topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topic {
    /// The site segment.
    pub site: Id,
    /// The device segment.
    pub device: Id,
    /// `punch` or `ack`.
    pub kind: TopicKind,
}

impl Topic {
    /// Parses `outpost/v1/{site}/{device}/{punch|ack}`. Wildcards and empty or invalid
    /// segments are errors.
    pub fn parse(topic: &str) -> Result<Topic, TopicError> {
        let rest = topic.strip_prefix(PREFIX).ok_or(TopicError::NotOutpost)?;
        let mut parts = rest.split('/');
        let (Some(site), Some(device), Some(leaf), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TopicError::NotOutpost);
        };
        let kind = match leaf {
            "punch" => TopicKind::Punch,
            "ack" => TopicKind::Ack,
            _ => return Err(TopicError::UnknownLeaf),
        };
        Ok(Topic {
            site: Id::new_topic_safe(site).map_err(TopicError::Site)?,
            device: Id::new_topic_safe(device).map_err(TopicError::Device)?,
            kind,
        })
    }

    /// Writes the topic string into `out` (any `fmt::Write`, such as a `heapless::String`).
    pub fn write_to<W: Write>(&self, out: &mut W) -> fmt::Result {
        let leaf = match self.kind {
            TopicKind::Punch => "punch",
            TopicKind::Ack => "ack",
        };
        write!(out, "{PREFIX}{}/{}/{leaf}", self.site, self.device)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_to(f)
    }
}

/// The topic a device publishes punches on. Fails if either id is not topic-safe.
#[cfg(feature = "alloc")]
pub fn punch_topic(site: &str, device: &str) -> Result<alloc::string::String, TopicError> {
    build(site, device, TopicKind::Punch)
}

/// The topic the gateway publishes a device's acks on. Fails if either id is not topic-safe.
#[cfg(feature = "alloc")]
pub fn ack_topic(site: &str, device: &str) -> Result<alloc::string::String, TopicError> {
    build(site, device, TopicKind::Ack)
}

/// The subscription filter for every device's punches at `site`.
#[cfg(feature = "alloc")]
pub fn punch_filter(site: &str) -> Result<alloc::string::String, TopicError> {
    Id::new_topic_safe(site).map_err(TopicError::Site)?;
    Ok(alloc::format!("{PREFIX}{site}/+/punch"))
}

#[cfg(feature = "alloc")]
fn build(site: &str, device: &str, kind: TopicKind) -> Result<alloc::string::String, TopicError> {
    let t = Topic {
        site: Id::new_topic_safe(site).map_err(TopicError::Site)?,
        device: Id::new_topic_safe(device).map_err(TopicError::Device)?,
        kind,
    };
    Ok(alloc::format!("{t}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_build() {
        let t = Topic::parse("outpost/v1/HC001/door-1/punch").unwrap();
        assert_eq!(t.site.as_str(), "HC001");
        assert_eq!(t.device.as_str(), "door-1");
        assert_eq!(t.kind, TopicKind::Punch);
        assert_eq!(
            punch_topic("HC001", "door-1").unwrap(),
            "outpost/v1/HC001/door-1/punch"
        );
        assert_eq!(
            ack_topic("HC001", "zk:123").unwrap(),
            "outpost/v1/HC001/zk:123/ack"
        );
        assert_eq!(punch_filter("HC001").unwrap(), "outpost/v1/HC001/+/punch");
    }

    #[test]
    fn rejects_bad_topics() {
        assert_eq!(
            Topic::parse("outpost/v1/HC001/+/punch"),
            Err(TopicError::Device(IdError::TopicChar))
        );
        assert_eq!(Topic::parse("outpost/v1/#"), Err(TopicError::NotOutpost));
        assert_eq!(
            Topic::parse("outpost/v1/HC001//punch"),
            Err(TopicError::Device(IdError::Empty))
        );
        assert_eq!(
            Topic::parse("outpost/v1/HC001/d/x/punch"),
            Err(TopicError::NotOutpost)
        );
        assert_eq!(
            Topic::parse("outpost/v1/HC001/d/status"),
            Err(TopicError::UnknownLeaf)
        );
        assert_eq!(
            Topic::parse("other/v1/HC001/d/punch"),
            Err(TopicError::NotOutpost)
        );
        assert!(punch_topic("HC#1", "d").is_err());
    }
}
