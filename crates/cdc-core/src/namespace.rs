//! Namespaces (database and collection) and the operation types of change events.

use std::{convert::Infallible, fmt, str::FromStr, sync::Arc};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A database or collection name. Cloning one copies no bytes: the events of a stream
/// share the names of their namespace (decoding a stream's events allocates none per
/// event). Reads as a `str` (`name.len()`, `&*name`, `name == "orders"`).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(Arc<str>);

impl Name {
    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether both share one allocation (for tests of the decoder's sharing).
    #[cfg(test)]
    pub(crate) fn shares(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::ops::Deref for Name {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Self(Arc::from(s))
    }
}

impl From<&String> for Name {
    fn from(s: &String) -> Self {
        Self(Arc::from(s.as_str()))
    }
}

impl From<String> for Name {
    fn from(s: String) -> Self {
        Self(Arc::from(s))
    }
}

impl From<Arc<str>> for Name {
    fn from(s: Arc<str>) -> Self {
        Self(s)
    }
}

impl From<Name> for String {
    fn from(name: Name) -> Self {
        name.0.as_ref().to_owned()
    }
}

impl From<Name> for bson::Bson {
    fn from(name: Name) -> Self {
        Self::String(name.into())
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<Name> for str {
    fn eq(&self, other: &Name) -> bool {
        *self == *other.0
    }
}

impl PartialEq<Name> for &str {
    fn eq(&self, other: &Name) -> bool {
        **self == *other.0
    }
}

impl PartialEq<Name> for String {
    fn eq(&self, other: &Name) -> bool {
        **self == *other.0
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::from)
    }
}

/// A database, or a collection within one, as change events name them in `ns` and `to`.
///
/// Database-level events (`dropDatabase`) carry no collection.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Namespace {
    /// The database name.
    pub db: Name,
    /// The collection name; `None` for a database-level namespace.
    #[serde(rename = "coll", default, skip_serializing_if = "Option::is_none")]
    pub coll: Option<Name>,
}

impl Namespace {
    /// The namespace of one collection.
    pub fn collection(db: impl Into<Name>, coll: impl Into<Name>) -> Self {
        Self {
            db: db.into(),
            coll: Some(coll.into()),
        }
    }

    /// The namespace of a whole database.
    pub fn database(db: impl Into<Name>) -> Self {
        Self {
            db: db.into(),
            coll: None,
        }
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.coll {
            Some(coll) => write!(f, "{}.{}", self.db, coll),
            None => f.write_str(&self.db),
        }
    }
}

/// The kind of change an event describes (`operationType`).
///
/// Types that newer servers add, and that this version does not name, arrive as
/// [`OperationType::Other`] with the server's string, so nothing is dropped.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OperationType {
    /// A document was inserted.
    Insert,
    /// A document was updated in place.
    Update,
    /// A document was replaced whole.
    Replace,
    /// A document was deleted.
    Delete,
    /// A collection was dropped.
    Drop,
    /// A collection was renamed.
    Rename,
    /// A database was dropped.
    DropDatabase,
    /// The stream can no longer continue (its collection or database went away); the cursor
    /// is closed after this event. Resume with `startAfter` its token.
    Invalidate,
    /// A collection or view was created (expanded events).
    Create,
    /// Indexes were created (expanded events).
    CreateIndexes,
    /// Indexes were dropped (expanded events).
    DropIndexes,
    /// Collection options changed (expanded events).
    Modify,
    /// Not a change: a document as a snapshot read it, before the stream takes over (its
    /// full document and key are set).
    Snapshot,
    /// Any other type, as the server spelled it.
    Other(String),
}

impl OperationType {
    /// The server's spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Insert => "insert",
            Self::Update => "update",
            Self::Replace => "replace",
            Self::Delete => "delete",
            Self::Drop => "drop",
            Self::Rename => "rename",
            Self::DropDatabase => "dropDatabase",
            Self::Invalidate => "invalidate",
            Self::Create => "create",
            Self::CreateIndexes => "createIndexes",
            Self::DropIndexes => "dropIndexes",
            Self::Modify => "modify",
            Self::Snapshot => "snapshot",
            Self::Other(s) => s,
        }
    }

    /// Parses the server's spelling; unknown strings become [`OperationType::Other`].
    pub fn parse(s: &str) -> Self {
        Self::known(s.as_bytes()).unwrap_or_else(|| Self::Other(s.to_owned()))
    }

    /// The type the server's spelling names, from its bytes; `None` for one this version
    /// does not name (the decoder then checks the bytes are text before keeping them).
    pub(crate) fn known(s: &[u8]) -> Option<Self> {
        Some(match s {
            b"insert" => Self::Insert,
            b"update" => Self::Update,
            b"replace" => Self::Replace,
            b"delete" => Self::Delete,
            b"drop" => Self::Drop,
            b"rename" => Self::Rename,
            b"dropDatabase" => Self::DropDatabase,
            b"invalidate" => Self::Invalidate,
            b"create" => Self::Create,
            b"createIndexes" => Self::CreateIndexes,
            b"dropIndexes" => Self::DropIndexes,
            b"modify" => Self::Modify,
            b"snapshot" => Self::Snapshot,
            _ => return None,
        })
    }

    /// Whether this event changes a document (insert, update, replace, delete).
    pub fn is_document_change(&self) -> bool {
        matches!(
            self,
            Self::Insert | Self::Update | Self::Replace | Self::Delete
        )
    }
}

impl FromStr for OperationType {
    type Err = Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::parse(s))
    }
}

impl fmt::Display for OperationType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for OperationType {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for OperationType {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Ok(Self::parse(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_types_round_trip_their_spelling() {
        for name in [
            "insert",
            "update",
            "replace",
            "delete",
            "drop",
            "rename",
            "dropDatabase",
            "invalidate",
            "create",
            "createIndexes",
            "dropIndexes",
            "modify",
            "shardCollection",
        ] {
            let op = OperationType::parse(name);
            assert_eq!(op.as_str(), name);
            let json = serde_json::to_string(&op).unwrap();
            assert_eq!(serde_json::from_str::<OperationType>(&json).unwrap(), op);
        }
        assert_eq!(
            OperationType::parse("reshardCollection"),
            OperationType::Other("reshardCollection".into())
        );
        assert!(OperationType::Replace.is_document_change());
        assert!(!OperationType::Invalidate.is_document_change());
    }

    #[test]
    fn namespace_displays_and_serializes() {
        let ns = Namespace::collection("app", "users");
        assert_eq!(ns.to_string(), "app.users");
        assert_eq!(Namespace::database("app").to_string(), "app");
        let json = serde_json::to_string(&ns).unwrap();
        assert_eq!(json, r#"{"db":"app","coll":"users"}"#);
        let db: Namespace = serde_json::from_str(r#"{"db":"app"}"#).unwrap();
        assert_eq!(db, Namespace::database("app"));
    }
}
