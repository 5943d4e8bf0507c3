//! Fixed-capacity identifiers (device, subject, site, gateway ids).
//!
//! An [`Id`] holds up to [`MAX_ID_LEN`] bytes inline, so punches can be built, stored and
//! encoded without a heap. On the wire it is a CBOR text string.

use core::fmt;

/// The longest identifier in bytes (UTF-8), for every kind of id.
pub const MAX_ID_LEN: usize = 64;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdError {
    /// The string is empty.
    Empty,
    /// The string is longer than [`MAX_ID_LEN`] bytes.
    TooLong,
    /// The string contains a control character (including NUL, tab and newline).
    ControlChar,
    /// The string contains `/`, `+` or `#`, which cannot appear in an MQTT topic segment.
    TopicChar,
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdError::Empty => "must not be empty",
            IdError::TooLong => "must be at most 64 bytes",
            IdError::ControlChar => "must not contain control characters",
            IdError::TopicChar => "must not contain '/', '+' or '#'",
        })
    }
}

#[cfg(feature = "std")]
impl std::error::Error for IdError {}

/// A validated identifier of 1 to 64 bytes with no control characters, stored inline.
#[derive(Clone, Copy)]
pub struct Id {
    len: u8,
    buf: [u8; MAX_ID_LEN],
}

impl Id {
    /// Checks `s` and copies it into an `Id`.
    pub fn new(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(IdError::TooLong);
        }
        if s.chars().any(char::is_control) {
            return Err(IdError::ControlChar);
        }
        let mut buf = [0u8; MAX_ID_LEN];
        buf[..s.len()].copy_from_slice(s.as_bytes());
        Ok(Id {
            len: s.len() as u8,
            buf,
        })
    }

    /// Like [`Id::new`], and also refuses `/`, `+` and `#` so the id can be a topic segment.
    pub fn new_topic_safe(s: &str) -> Result<Self, IdError> {
        let id = Id::new(s)?;
        id.check_topic_safe()?;
        Ok(id)
    }

    /// Fails if the id cannot be used as an MQTT topic segment.
    pub fn check_topic_safe(&self) -> Result<(), IdError> {
        if self.as_str().contains(['/', '+', '#']) {
            Err(IdError::TopicChar)
        } else {
            Ok(())
        }
    }

    /// The identifier as a string slice.
    pub fn as_str(&self) -> &str {
        // Only constructed from a `&str` in `new`, so the bytes are valid UTF-8; fall back
        // to "" rather than panic if that invariant were ever broken.
        core::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or("")
    }
}

impl PartialEq for Id {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}
impl Eq for Id {}

impl PartialOrd for Id {
    fn partial_cmp(&self, other: &Self) -> Option<core::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Id {
    fn cmp(&self, other: &Self) -> core::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl core::hash::Hash for Id {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl core::str::FromStr for Id {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Id::new(s)
    }
}

impl<C> minicbor::Encode<C> for Id {
    fn encode<W: minicbor::encode::Write>(
        &self,
        e: &mut minicbor::Encoder<W>,
        _ctx: &mut C,
    ) -> Result<(), minicbor::encode::Error<W::Error>> {
        e.str(self.as_str())?;
        Ok(())
    }
}

impl<'b, C> minicbor::Decode<'b, C> for Id {
    fn decode(
        d: &mut minicbor::Decoder<'b>,
        _ctx: &mut C,
    ) -> Result<Self, minicbor::decode::Error> {
        let s = d.str()?;
        Id::new(s).map_err(|e| match e {
            IdError::Empty => minicbor::decode::Error::message("identifier is empty"),
            IdError::TooLong => minicbor::decode::Error::message("identifier longer than 64 bytes"),
            IdError::ControlChar => {
                minicbor::decode::Error::message("identifier contains a control character")
            }
            IdError::TopicChar => minicbor::decode::Error::message("identifier contains / + or #"),
        })
    }
}

#[cfg(feature = "std")]
impl serde::Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        assert_eq!(Id::new(""), Err(IdError::Empty));
        assert!(Id::new(&"x".repeat(64)).is_ok());
        assert_eq!(Id::new(&"x".repeat(65)), Err(IdError::TooLong));
        assert_eq!(Id::new("a\tb"), Err(IdError::ControlChar));
        assert_eq!(Id::new_topic_safe("a/b"), Err(IdError::TopicChar));
        assert_eq!(Id::new_topic_safe("a+"), Err(IdError::TopicChar));
        assert_eq!(
            Id::new("Zoë-Ø").map(|i| i.to_string()),
            Ok("Zoë-Ø".to_string())
        );
    }
}
