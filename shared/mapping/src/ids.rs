//! Identifiers, parsed once at the edge so the rest of the crate never sees a malformed GUID.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A Dataverse GUID. Stored as 128 bits; always displayed lowercase and hyphenated, which is
/// the form Dataverse returns and the form oppsync writes to Marketo (`externalOpportunityId`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Guid(u128);

/// Why a string is not a GUID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not a GUID (expected 8-4-4-4-12 hexadecimal digits, like 00000000-0000-0000-0000-000000000000)")]
pub struct GuidError {
    /// The offending text, shortened so a 10 KB value does not end up in a log line.
    pub value: String,
}

impl Guid {
    /// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, any case, optionally in braces.
    pub fn parse(text: &str) -> Result<Self, GuidError> {
        let err = || GuidError {
            value: text.chars().take(60).collect(),
        };
        let inner = text
            .strip_prefix('{')
            .and_then(|t| t.strip_suffix('}'))
            .unwrap_or(text)
            .as_bytes();
        if inner.len() != 36 {
            return Err(err());
        }
        let mut value: u128 = 0;
        for (i, &b) in inner.iter().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                if b != b'-' {
                    return Err(err());
                }
                continue;
            }
            let digit = match b {
                b'0'..=b'9' => b - b'0',
                b'a'..=b'f' => b - b'a' + 10,
                b'A'..=b'F' => b - b'A' + 10,
                _ => return Err(err()),
            };
            value = (value << 4) | u128::from(digit);
        }
        Ok(Guid(value))
    }

    /// Builds a GUID from its 128-bit value (test data generators use this).
    pub const fn from_u128(value: u128) -> Self {
        Guid(value)
    }

    /// The 128-bit value.
    pub const fn as_u128(self) -> u128 {
        self.0
    }

    fn write_hyphenated(self, out: &mut [u8; 36]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut pos = 0;
        for nibble in 0..32 {
            if matches!(pos, 8 | 13 | 18 | 23) {
                out[pos] = b'-';
                pos += 1;
            }
            let shift = 124 - nibble * 4;
            out[pos] = HEX[((self.0 >> shift) & 0xf) as usize];
            pos += 1;
        }
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 36];
        self.write_hyphenated(&mut buf);
        // Only ASCII hex digits and hyphens were written.
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Guid {
    type Err = GuidError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Guid::parse(s)
    }
}

impl Serialize for Guid {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Straight from a stack buffer: plans serialize thousands of GUIDs a second for hashing.
        let mut buf = [0u8; 36];
        self.write_hyphenated(&mut buf);
        serializer.serialize_str(std::str::from_utf8(&buf).map_err(serde::ser::Error::custom)?)
    }
}

impl<'de> Deserialize<'de> for Guid {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(deserializer)?;
        Guid::parse(&text).map_err(serde::de::Error::custom)
    }
}

macro_rules! entity_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Guid);

        impl $name {
            /// Parses the id from its GUID text.
            pub fn parse(text: &str) -> Result<Self, GuidError> {
                Guid::parse(text).map($name)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.0)
            }
        }
    };
}

entity_id!(
    /// `opportunity.opportunityid`; also the Marketo `externalOpportunityId`.
    OpportunityId
);
entity_id!(
    /// `account.accountid`; also the Marketo `externalCompanyId`.
    AccountId
);
entity_id!(
    /// `contact.contactid`; a contact becomes a Marketo lead.
    ContactId
);
entity_id!(
    /// `systemuser.systemuserid`; an opportunity's owner, and the Marketo sales person's
    /// `externalSalesPersonId` (stable when the user's email changes).
    UserId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_any_case_and_braces_and_displays_lowercase() {
        let upper = Guid::parse("{6F3B2C1A-0E4D-4B7A-9C1D-00AA11BB22CC}").unwrap();
        let lower = Guid::parse("6f3b2c1a-0e4d-4b7a-9c1d-00aa11bb22cc").unwrap();
        assert_eq!(upper, lower);
        assert_eq!(upper.to_string(), "6f3b2c1a-0e4d-4b7a-9c1d-00aa11bb22cc");
    }

    #[test]
    fn rejects_malformed_guids() {
        for bad in [
            "",
            "6f3b2c1a0e4d4b7a9c1d00aa11bb22cc",
            "6f3b2c1a-0e4d-4b7a-9c1d-00aa11bb22c",
            "6f3b2c1a-0e4d-4b7a-9c1d-00aa11bb22cg",
            "6f3b2c1a_0e4d-4b7a-9c1d-00aa11bb22cc",
            "' or 1 eq 1 or '00000000-0000-0000",
            "{6f3b2c1a-0e4d-4b7a-9c1d-00aa11bb22cc",
        ] {
            let err = Guid::parse(bad).unwrap_err();
            assert!(err.to_string().contains("is not a GUID"), "{bad}: {err}");
        }
    }

    #[test]
    fn long_bad_values_are_shortened_in_the_error() {
        let err = Guid::parse(&"x".repeat(10_000)).unwrap_err();
        assert!(err.value.len() <= 60);
    }

    #[test]
    fn round_trips_through_display_and_serde() {
        let id = ContactId(Guid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef));
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"01234567-89ab-cdef-0123-456789abcdef\"");
        assert_eq!(serde_json::from_str::<ContactId>(&json).unwrap(), id);
        assert_eq!(format!("{id:?}"), "ContactId(01234567-89ab-cdef-0123-456789abcdef)");
    }
}
