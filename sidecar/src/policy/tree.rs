//! pg_query's parse tree as a compact generic tree, sans-IO.
//!
//! The analyser walks the tree generically (every field of every node, so
//! nothing is skipped by omission). serde_json's `Value` made that cost
//! ~3 KB of heap per token (owned key strings in B-tree maps); this tree
//! keeps the field names as the `&'static str`s serde hands over, stores
//! objects as small vectors, and leaves out what carries nothing: empty
//! options, `false`, zero, empty strings and lists (every pg_query enum
//! has 0 = undefined), and source `location`s.

use std::fmt;

use serde::ser::{self, Serialize};

/// One value of the tree.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    String(String),
    Array(Vec<Value>),
    Object(Map),
}

/// An object: a struct (named by its type) or an enum variant wrapper
/// (`{"SelectStmt": {...}}`, unnamed).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Map {
    name: &'static str,
    fields: Vec<(&'static str, Value)>,
}

impl Map {
    /// The Rust type name of a struct (`RangeVar`, `FuncCall`); "" for a
    /// variant wrapper.
    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &Value)> {
        self.fields.iter().map(|(k, v)| (*k, v))
    }
}

impl Value {
    pub fn as_object(&self) -> Option<&Map> {
        match self {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Vec<Value>> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// Carries nothing the analyser could read.
    fn is_empty(&self) -> bool {
        match self {
            Value::Null | Value::Bool(false) | Value::Int(0) => true,
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            _ => false,
        }
    }
}

#[derive(Debug)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl ser::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

/// Serialize into the tree.
pub fn to_tree<T: Serialize + ?Sized>(v: &T) -> Result<Value, Error> {
    v.serialize(Serializer)
}

struct Serializer;

pub struct Seq(Vec<Value>);

pub struct Struct(Map);

pub struct Variant {
    variant: &'static str,
    inner: Vec<Value>,
    named: Map,
}

fn unsupported(what: &str) -> Error {
    Error(format!("unexpected {what} in the parse tree"))
}

impl ser::Serializer for Serializer {
    type Ok = Value;
    type Error = Error;
    type SerializeSeq = Seq;
    type SerializeTuple = Seq;
    type SerializeTupleStruct = Seq;
    type SerializeTupleVariant = Variant;
    type SerializeMap = ser::Impossible<Value, Error>;
    type SerializeStruct = Struct;
    type SerializeStructVariant = Variant;

    fn serialize_bool(self, v: bool) -> Result<Value, Error> {
        Ok(Value::Bool(v))
    }
    fn serialize_i8(self, v: i8) -> Result<Value, Error> {
        Ok(Value::Int(v.into()))
    }
    fn serialize_i16(self, v: i16) -> Result<Value, Error> {
        Ok(Value::Int(v.into()))
    }
    fn serialize_i32(self, v: i32) -> Result<Value, Error> {
        Ok(Value::Int(v.into()))
    }
    fn serialize_i64(self, v: i64) -> Result<Value, Error> {
        Ok(Value::Int(v))
    }
    fn serialize_u8(self, v: u8) -> Result<Value, Error> {
        Ok(Value::Int(v.into()))
    }
    fn serialize_u16(self, v: u16) -> Result<Value, Error> {
        Ok(Value::Int(v.into()))
    }
    fn serialize_u32(self, v: u32) -> Result<Value, Error> {
        Ok(Value::Int(v.into()))
    }
    fn serialize_u64(self, v: u64) -> Result<Value, Error> {
        Ok(Value::Int(i64::try_from(v).unwrap_or(i64::MAX)))
    }
    // Planner costs only (never in a raw parse tree): nothing to judge.
    fn serialize_f32(self, _: f32) -> Result<Value, Error> {
        Ok(Value::Null)
    }
    fn serialize_f64(self, _: f64) -> Result<Value, Error> {
        Ok(Value::Null)
    }
    fn serialize_char(self, v: char) -> Result<Value, Error> {
        Ok(Value::String(v.to_string()))
    }
    fn serialize_str(self, v: &str) -> Result<Value, Error> {
        Ok(Value::String(v.to_owned()))
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<Value, Error> {
        Err(unsupported("bytes"))
    }
    fn serialize_none(self) -> Result<Value, Error> {
        Ok(Value::Null)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Result<Value, Error> {
        v.serialize(self)
    }
    fn serialize_unit(self) -> Result<Value, Error> {
        Ok(Value::Null)
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<Value, Error> {
        Ok(Value::Null)
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<Value, Error> {
        Ok(Value::String(variant.to_owned()))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        v: &T,
    ) -> Result<Value, Error> {
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        v: &T,
    ) -> Result<Value, Error> {
        Ok(Value::Object(Map {
            name: "",
            fields: vec![(variant, v.serialize(Serializer)?)],
        }))
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Seq, Error> {
        Ok(Seq(Vec::with_capacity(len.unwrap_or(0))))
    }
    fn serialize_tuple(self, len: usize) -> Result<Seq, Error> {
        Ok(Seq(Vec::with_capacity(len)))
    }
    fn serialize_tuple_struct(self, _: &'static str, len: usize) -> Result<Seq, Error> {
        Ok(Seq(Vec::with_capacity(len)))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Variant, Error> {
        Ok(Variant {
            variant,
            inner: Vec::new(),
            named: Map::default(),
        })
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Error> {
        Err(unsupported("map"))
    }
    fn serialize_struct(self, name: &'static str, _: usize) -> Result<Struct, Error> {
        Ok(Struct(Map {
            name,
            fields: Vec::new(),
        }))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Variant, Error> {
        Ok(Variant {
            variant,
            inner: Vec::new(),
            named: Map {
                name: variant,
                fields: Vec::new(),
            },
        })
    }
}

impl ser::SerializeSeq for Seq {
    type Ok = Value;
    type Error = Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Error> {
        self.0.push(v.serialize(Serializer)?);
        Ok(())
    }
    fn end(self) -> Result<Value, Error> {
        Ok(Value::Array(self.0))
    }
}

impl ser::SerializeTuple for Seq {
    type Ok = Value;
    type Error = Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Error> {
        ser::SerializeSeq::serialize_element(self, v)
    }
    fn end(self) -> Result<Value, Error> {
        ser::SerializeSeq::end(self)
    }
}

impl ser::SerializeTupleStruct for Seq {
    type Ok = Value;
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Error> {
        ser::SerializeSeq::serialize_element(self, v)
    }
    fn end(self) -> Result<Value, Error> {
        ser::SerializeSeq::end(self)
    }
}

impl ser::SerializeStruct for Struct {
    type Ok = Value;
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        v: &T,
    ) -> Result<(), Error> {
        // Where a node sits in the text: never part of a judgement.
        if key == "location" {
            return Ok(());
        }
        let v = v.serialize(Serializer)?;
        if !v.is_empty() {
            self.0.fields.push((key, v));
        }
        Ok(())
    }
    fn end(mut self) -> Result<Value, Error> {
        self.0.fields.shrink_to_fit();
        Ok(Value::Object(self.0))
    }
}

impl ser::SerializeTupleVariant for Variant {
    type Ok = Value;
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Error> {
        self.inner.push(v.serialize(Serializer)?);
        Ok(())
    }
    fn end(self) -> Result<Value, Error> {
        Ok(Value::Object(Map {
            name: "",
            fields: vec![(self.variant, Value::Array(self.inner))],
        }))
    }
}

impl ser::SerializeStructVariant for Variant {
    type Ok = Value;
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        v: &T,
    ) -> Result<(), Error> {
        let v = v.serialize(Serializer)?;
        if !v.is_empty() {
            self.named.fields.push((key, v));
        }
        Ok(())
    }
    fn end(self) -> Result<Value, Error> {
        Ok(Value::Object(Map {
            name: "",
            fields: vec![(self.variant, Value::Object(self.named))],
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parse_tree_keeps_its_shape_without_the_noise() {
        let parsed = pg_query::parse("SELECT a FROM s.t WHERE b", 0).unwrap();
        let tree = to_tree(&parsed.protobuf).unwrap();
        let stmts = tree
            .as_object()
            .unwrap()
            .get("stmts")
            .unwrap()
            .as_array()
            .unwrap();
        let raw = stmts[0].as_object().unwrap();
        assert_eq!(raw.name(), "RawStmt");
        let node = raw.get("stmt").unwrap().as_object().unwrap();
        let wrapper = node.get("node").unwrap().as_object().unwrap();
        let (kind, select) = wrapper.iter().next().unwrap();
        assert_eq!(kind, "SelectStmt");
        let select = select.as_object().unwrap();
        assert_eq!(select.name(), "SelectStmt");
        // No locations, no empty fields.
        fn walk(v: &Value, f: &mut impl FnMut(&'static str, &Value)) {
            match v {
                Value::Object(m) => m.iter().for_each(|(k, v)| {
                    f(k, v);
                    walk(v, f)
                }),
                Value::Array(a) => a.iter().for_each(|v| walk(v, f)),
                _ => {}
            }
        }
        let mut names = Vec::new();
        walk(&tree, &mut |k, v| {
            assert_ne!(k, "location");
            assert!(!v.is_empty(), "{k}: {v:?}");
            names.push(k);
        });
        for want in [
            "target_list",
            "from_clause",
            "where_clause",
            "relname",
            "schemaname",
        ] {
            assert!(names.contains(&want), "{want} missing: {names:?}");
        }
    }
}
