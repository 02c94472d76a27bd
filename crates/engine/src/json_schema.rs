//! Constrained decoding to a JSON Schema (OpenAI's `response_format: {"type": "json_schema"}`),
//! for the subset structured outputs use: objects with `properties` (each written at most once,
//! `}` only once every `required` one is; no other keys: `additionalProperties` must be absent
//! or false), arrays with `items` (`minItems`, `maxItems`), strings, numbers, integers, booleans,
//! null, and `enum` / `const` of any JSON values (their compact JSON text, matched byte for
//! byte), local `$ref`s (`#/$defs/...`, expanded in place; recursion refused) and alternatives
//! (`anyOf`, `oneOf`, a list of types) whose values begin with different bytes, so that a
//! value's first byte picks one (`["string", "null"]`, Pydantic's optional fields).
//! Annotations (`title`, `description`, `$schema`, `default`, `examples`, `$defs`) are ignored;
//! any other keyword (`allOf`, `pattern`, `format`, ...), alternatives that could begin alike,
//! or a schema without a type is refused by name when compiled, never silently dropped. Up to [`MAX_DEPTH`] nested containers
//! and [`MAX_PROPERTIES`] properties an object.
//!
//! [`SchemaPrefix`] recognizes the prefixes of texts that are JSON and valid against the schema,
//! so a generation that stops is one valid document. Whitespace between tokens as
//! [`crate::json_mode`] allows it. Owns the schema subset and its recognizer; knows nothing of
//! models.

use crate::json_mode::{MaskCache, Read, Scalar as Lexer, TokenBytes, MAX_WHITESPACE_RUN};
use serde_json::Value;
use std::sync::Arc;

/// Containers a document may nest.
pub const MAX_DEPTH: usize = 16;
/// Properties an object schema may list.
pub const MAX_PROPERTIES: usize = 64;
/// Values an `enum` may list.
pub const MAX_ENUM: usize = 64;
/// Compiled schemas a checkpoint keeps (with their masks) for the requests that send them again.
pub const SCHEMAS_KEPT: usize = 16;

/// States whose allowed tokens a schema keeps (0.75 MiB at most for 49152 tokens; with
/// [`SCHEMAS_KEPT`] schemas, 12 MiB a checkpoint).
pub const SCHEMA_MASKS_KEPT: usize = 128;

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Object {
        props: Vec<(Vec<u8>, u16)>,
        required: u64,
    },
    Array {
        items: u16,
        min: u32,
        max: u32,
    },
    String,
    Number {
        integer: bool,
    },
    Boolean,
    Null,
    /// `enum` / `const`: each value's compact JSON text.
    Literals(Vec<Vec<u8>>),
    /// `anyOf` / `oneOf` / a list of types: alternatives that begin with different bytes, so
    /// that a value's first byte says which it is: the alternative of each first byte.
    Union(Box<[Option<u16>; 256]>),
}

/// A compiled schema: its nodes (the root first) and the allowed tokens of each state.
#[derive(Debug)]
pub struct Schema {
    nodes: Vec<Node>,
    masks: MaskCache<SchemaPrefix>,
}

/// Why a schema cannot be compiled: the keyword or construct, and where (a JSON pointer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("json_schema at `{at}`: {what}")]
pub struct SchemaError {
    pub at: String,
    pub what: String,
}

/// The keywords a schema node may hold (besides `$ref`, `anyOf`, `oneOf`).
const SUPPORTED: &[&str] = &[
    "type",
    "enum",
    "const",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
];

const ANNOTATIONS: &[&str] = &[
    "$defs",
    "definitions",
    "title",
    "description",
    "$schema",
    "$id",
    "default",
    "examples",
    "$comment",
];

impl Schema {
    /// Compiles `schema` (see the module doc for the subset).
    pub fn compile(schema: &Value) -> Result<Schema, SchemaError> {
        let mut cx = Compiler {
            root: schema,
            nodes: vec![],
            refs: vec![],
        };
        add(schema, "", 0, &mut cx)?;
        Ok(Schema {
            nodes: cx.nodes,
            masks: MaskCache::keeping(SCHEMA_MASKS_KEPT),
        })
    }
}

/// What compiling holds: the root (for local `$ref`s), the nodes so far, and the references
/// being expanded (a reference inside its own expansion is recursion).
struct Compiler<'a> {
    root: &'a Value,
    nodes: Vec<Node>,
    refs: Vec<String>,
}

/// The bytes a value of `node` may begin with.
fn first_bytes(nodes: &[Node], node: u16) -> [bool; 256] {
    let mut set = [false; 256];
    let mut put = |bytes: &[u8]| bytes.iter().for_each(|&b| set[b as usize] = true);
    match &nodes[node as usize] {
        Node::Object { .. } => put(b"{"),
        Node::Array { .. } => put(b"["),
        Node::String => put(b"\""),
        Node::Number { .. } => put(b"-0123456789"),
        Node::Boolean => put(b"tf"),
        Node::Null => put(b"n"),
        Node::Literals(values) => values.iter().for_each(|v| put(&v[..1])),
        Node::Union(by_first) => (0..256)
            .filter(|&b| by_first[b].is_some())
            .for_each(|b| set[b] = true),
    }
    set
}

fn err(at: &str, what: impl Into<String>) -> SchemaError {
    SchemaError {
        at: if at.is_empty() { "/".into() } else { at.into() },
        what: what.into(),
    }
}

/// Adds the node of `s` (and its children) and returns its index.
fn add(s: &Value, at: &str, depth: usize, cx: &mut Compiler) -> Result<u16, SchemaError> {
    if depth > MAX_DEPTH {
        return Err(err(at, format!("nested deeper than {MAX_DEPTH}")));
    }
    let Some(obj) = s.as_object() else {
        return Err(err(at, "a schema must be an object"));
    };
    // A local reference (`#/$defs/Name`, as Pydantic writes nested models): its target, in
    // place.
    if let Some(r) = obj.get("$ref") {
        if let Some(k) = obj.keys().find(|k| {
            !["$ref", "$defs", "definitions"].contains(&k.as_str())
                && !ANNOTATIONS.contains(&k.as_str())
        }) {
            return Err(err(
                at,
                format!("keyword `{k}` beside `$ref` is not supported"),
            ));
        }
        let r = r.as_str().unwrap_or_default();
        let target = r
            .strip_prefix('#')
            .and_then(|p| cx.root.pointer(p))
            .ok_or_else(|| {
                err(
                    at,
                    format!("`$ref` {r:?} is not a local reference this schema holds"),
                )
            })?;
        if cx.refs.iter().any(|x| x == r) {
            return Err(err(
                at,
                format!("`$ref` {r:?} is recursive (not supported)"),
            ));
        }
        cx.refs.push(r.to_string());
        let node = add(target, r.trim_start_matches('#'), depth, cx);
        cx.refs.pop();
        return node;
    }
    // Alternatives: `anyOf` / `oneOf`, or a list of types (`["string", "null"]`, as optional
    // fields are written).
    let alternatives: Option<Vec<(Value, String)>> =
        if let Some(list) = obj.get("anyOf").or(obj.get("oneOf")) {
            let key = if obj.contains_key("anyOf") {
                "anyOf"
            } else {
                "oneOf"
            };
            if let Some(k) = obj.keys().find(|k| {
                k.as_str() != key
                    && !["$defs", "definitions"].contains(&k.as_str())
                    && !ANNOTATIONS.contains(&k.as_str())
            }) {
                return Err(err(
                    at,
                    format!("keyword `{k}` beside `{key}` is not supported"),
                ));
            }
            let list = list
                .as_array()
                .filter(|l| !l.is_empty() && l.len() <= MAX_ENUM)
                .ok_or_else(|| err(at, format!("`{key}` must list 1 to {MAX_ENUM} schemas")))?;
            Some(
                list.iter()
                    .enumerate()
                    .map(|(i, v)| (v.clone(), format!("{at}/{key}/{i}")))
                    .collect(),
            )
        } else if let Some(Value::Array(types)) = obj.get("type") {
            if let Some(k) = obj
                .keys()
                .find(|k| !SUPPORTED.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str()))
            {
                return Err(err(at, format!("keyword `{k}` is not supported")));
            }
            let mut alts = vec![];
            for (i, t) in types.iter().enumerate() {
                // Each type with the keywords that apply to it.
                let mut one = obj.clone();
                one.insert("type".into(), t.clone());
                if t != "object" {
                    for k in ["properties", "required", "additionalProperties"] {
                        one.remove(k);
                    }
                }
                if t != "array" {
                    for k in ["items", "minItems", "maxItems"] {
                        one.remove(k);
                    }
                }
                alts.push((Value::Object(one), format!("{at}/type/{i}")));
            }
            Some(alts)
        } else {
            None
        };
    if let Some(alts) = alternatives {
        let mut by_first = Box::new([None; 256]);
        for (v, where_) in &alts {
            let n = add(v, where_, depth, cx)?;
            let first = first_bytes(&cx.nodes, n);
            if (0..256).any(|b| first[b] && by_first[b].is_some()) {
                return Err(err(where_, "alternatives that can begin with the same byte are not supported (number and integer, two objects, a string and a string enum, ...)"));
            }
            (0..256)
                .filter(|&b| first[b])
                .for_each(|b| by_first[b] = Some(n));
        }
        if cx.nodes.len() >= u16::MAX as usize {
            return Err(err(at, "too many schemas"));
        }
        cx.nodes.push(Node::Union(by_first));
        return Ok((cx.nodes.len() - 1) as u16);
    }
    let nodes = &mut cx.nodes;
    let index = nodes.len();
    if index >= u16::MAX as usize {
        return Err(err(at, "too many schemas"));
    }
    nodes.push(Node::Null); // placeholder, set below
    if let Some(k) = obj
        .keys()
        .find(|k| !SUPPORTED.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str()))
    {
        return Err(err(at, format!("keyword `{k}` is not supported")));
    }
    let known = |keys: &[&str]| -> Result<(), SchemaError> {
        for k in obj.keys() {
            if !keys.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str()) {
                return Err(err(at, format!("keyword `{k}` is not supported")));
            }
        }
        Ok(())
    };
    let literal = |v: &Value| serde_json::to_vec(v).expect("a JSON value serializes");
    let node = if let Some(values) = obj.get("enum") {
        known(&["enum", "type"])?;
        let values = values
            .as_array()
            .filter(|v| !v.is_empty() && v.len() <= MAX_ENUM)
            .ok_or_else(|| err(at, format!("`enum` must list 1 to {MAX_ENUM} values")))?;
        Node::Literals(values.iter().map(literal).collect())
    } else if let Some(value) = obj.get("const") {
        known(&["const", "type"])?;
        Node::Literals(vec![literal(value)])
    } else {
        let ty = obj
            .get("type")
            .and_then(|t| t.as_str())
            .ok_or_else(|| err(at, "a schema needs `type` (one of object, array, string, number, integer, boolean, null), `enum` or `const`"))?;
        match ty {
            "object" => {
                known(&["type", "properties", "required", "additionalProperties"])?;
                if obj
                    .get("additionalProperties")
                    .is_some_and(|a| a != &Value::Bool(false))
                {
                    return Err(err(at, "`additionalProperties` must be false or absent"));
                }
                let empty = serde_json::Map::new();
                let props_in = match obj.get("properties") {
                    None => &empty,
                    Some(Value::Object(p)) => p,
                    Some(_) => return Err(err(at, "`properties` must be an object")),
                };
                if props_in.len() > MAX_PROPERTIES {
                    return Err(err(at, format!("more than {MAX_PROPERTIES} properties")));
                }
                let mut props = vec![];
                for (name, sub) in props_in {
                    if name.is_empty() || name.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\')
                    {
                        return Err(err(
                            at,
                            format!("property name {name:?}: quotes, backslashes and control characters are not supported"),
                        ));
                    }
                    let child = add(sub, &format!("{at}/properties/{name}"), depth + 1, cx)?;
                    props.push((name.as_bytes().to_vec(), child));
                }
                let mut required = 0u64;
                for r in obj
                    .get("required")
                    .and_then(|r| r.as_array())
                    .into_iter()
                    .flatten()
                {
                    let name = r.as_str().unwrap_or_default();
                    let i = props
                        .iter()
                        .position(|(n, _)| n == name.as_bytes())
                        .ok_or_else(|| err(at, format!("required `{name}` is not a property")))?;
                    required |= 1 << i;
                }
                Node::Object { props, required }
            }
            "array" => {
                known(&["type", "items", "minItems", "maxItems"])?;
                let items = obj
                    .get("items")
                    .ok_or_else(|| err(at, "an array needs `items`"))?;
                let items = add(items, &format!("{at}/items"), depth + 1, cx)?;
                let count = |k: &str, default: u32| -> Result<u32, SchemaError> {
                    match obj.get(k) {
                        None => Ok(default),
                        Some(v) => v
                            .as_u64()
                            .and_then(|n| u32::try_from(n).ok())
                            .ok_or_else(|| err(at, format!("`{k}` must be a count"))),
                    }
                };
                let (min, max) = (count("minItems", 0)?, count("maxItems", u32::MAX)?);
                if min > max {
                    return Err(err(at, "`minItems` is over `maxItems`"));
                }
                Node::Array { items, min, max }
            }
            "string" => {
                known(&["type"])?;
                Node::String
            }
            "number" | "integer" => {
                known(&["type"])?;
                Node::Number {
                    integer: ty == "integer",
                }
            }
            "boolean" => {
                known(&["type"])?;
                Node::Boolean
            }
            "null" => {
                known(&["type"])?;
                Node::Null
            }
            other => return Err(err(at, format!("type `{other}` is not supported"))),
        }
    };
    cx.nodes[index] = node;
    Ok(index as u16)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Phase {
    /// Object: a key or `}` (after `{`); a key (after `,`); inside a key, the properties it
    /// may still be and the bytes matched; its `:`; its value; after it.
    KeyOrClose,
    Key,
    InKey {
        candidates: u64,
        at: u16,
    },
    Colon {
        prop: u8,
    },
    Value {
        prop: u8,
    },
    /// Array: a value or `]` (after `[`); a value (after `,`).
    ItemOrClose,
    Item,
    After,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Frame {
    node: u16,
    /// Object: the properties written; array: the items begun.
    used: u64,
    phase: Phase,
}

/// The value being read, if it is a scalar: a JSON string, number or word (the shared lexer),
/// or an `enum`/`const` (its node, the values still possible and the bytes matched).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Scalar {
    None,
    Json(crate::json_mode::Scalar),
    Literal { node: u16, candidates: u64, at: u16 },
}

/// Where a document's prefix stands against its schema (`Copy`, hashable: see [`BytePrefix`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SchemaPrefix {
    frames: [Frame; MAX_DEPTH],
    depth: u8,
    scalar: Scalar,
    whitespace_run: u8,
    done: bool,
}

/// A [`SchemaPrefix`] with its schema, to feed.
struct Cursor<'a> {
    p: &'a mut SchemaPrefix,
    nodes: &'a [Node],
}

impl SchemaPrefix {
    fn new() -> Self {
        Self {
            frames: [Frame {
                node: 0,
                used: 0,
                phase: Phase::After,
            }; MAX_DEPTH],
            depth: 0,
            scalar: Scalar::None,
            whitespace_run: 0,
            done: false,
        }
    }
}

impl Cursor<'_> {
    fn top(&mut self) -> Option<&mut Frame> {
        let d = self.p.depth as usize;
        (d > 0).then(|| &mut self.p.frames[d - 1])
    }

    /// The node a value must match here, if a value may begin here.
    fn expected(&self) -> Option<(u16, bool)> {
        let d = self.p.depth as usize;
        if d == 0 {
            return (!self.p.done).then_some((0, false));
        }
        let f = &self.p.frames[d - 1];
        match (&self.nodes[f.node as usize], f.phase) {
            (Node::Object { props, .. }, Phase::Value { prop }) => {
                Some((props[prop as usize].1, false))
            }
            (Node::Array { items, min, .. }, Phase::ItemOrClose) => Some((*items, *min == 0)),
            (Node::Array { items, .. }, Phase::Item) => Some((*items, false)),
            _ => None,
        }
    }

    fn value_done(&mut self) {
        self.p.scalar = Scalar::None;
        match self.top() {
            None => self.p.done = true,
            Some(f) => f.phase = Phase::After,
        }
    }

    fn close(&mut self) -> bool {
        self.p.depth -= 1;
        self.value_done();
        true
    }

    /// Begins a value of `node` with byte `b`.
    fn begin(&mut self, node: u16, b: u8) -> bool {
        // The parent counts the value as written: an object's property, an array's item.
        if let Some(f) = self.top() {
            match f.phase {
                Phase::ItemOrClose | Phase::Item => f.used += 1,
                Phase::Value { prop } => f.used |= 1 << prop,
                _ => {}
            }
        }
        self.start(node, b)
    }

    /// Starts a value of `node` with byte `b` (an alternative chosen by the byte).
    fn start(&mut self, node: u16, b: u8) -> bool {
        let nodes = self.nodes;
        let started = match &nodes[node as usize] {
            Node::Union(by_first) => {
                return by_first[b as usize].is_some_and(|a| self.start(a, b));
            }
            Node::Object { .. } | Node::Array { .. } => {
                let object = matches!(self.nodes[node as usize], Node::Object { .. });
                if b != if object { b'{' } else { b'[' } || self.p.depth as usize >= MAX_DEPTH {
                    return false;
                }
                self.p.frames[self.p.depth as usize] = Frame {
                    node,
                    used: 0,
                    phase: if object {
                        Phase::KeyOrClose
                    } else {
                        Phase::ItemOrClose
                    },
                };
                self.p.depth += 1;
                return true;
            }
            Node::String => Lexer::start(b, true, None, &[]),
            Node::Number { integer } => Lexer::start(b, false, Some(*integer), &[]),
            Node::Boolean => Lexer::start(b, false, None, &[0, 1]),
            Node::Null => Lexer::start(b, false, None, &[2]),
            Node::Literals(values) => {
                let candidates = values
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.first() == Some(&b))
                    .fold(0u64, |m, (i, _)| m | 1 << i);
                if candidates == 0 {
                    return false;
                }
                self.p.scalar = Scalar::Literal {
                    node,
                    candidates,
                    at: 1,
                };
                self.literal_maybe_done();
                return true;
            }
        };
        match started {
            Some(s) => {
                self.p.scalar = Scalar::Json(s);
                true
            }
            None => false,
        }
    }

    /// Ends a literal whose every remaining candidate is complete (nothing can extend it).
    fn literal_maybe_done(&mut self) {
        if let Scalar::Literal {
            node,
            candidates,
            at,
        } = self.p.scalar
        {
            let Node::Literals(values) = &self.nodes[node as usize] else {
                return;
            };
            let all_whole = (0..values.len())
                .filter(|i| candidates >> i & 1 == 1)
                .all(|i| values[i].len() == at as usize);
            if all_whole {
                self.value_done();
            }
        }
    }

    fn feed(&mut self, b: u8) -> bool {
        match self.p.scalar {
            Scalar::None => {}
            Scalar::Json(mut lexer) => match lexer.read(b) {
                Read::More => {
                    self.p.scalar = Scalar::Json(lexer);
                    return true;
                }
                Read::Whole => {
                    self.value_done();
                    return true;
                }
                // A number ends at what follows it (never at the top: the root is a container
                // or a literal in practice, and a bare number could never be known to end).
                Read::EndedBefore if self.p.depth > 0 => self.value_done(),
                Read::EndedBefore | Read::Invalid => return false,
            },
            Scalar::Literal {
                node,
                candidates,
                at,
            } => {
                let Node::Literals(values) = &self.nodes[node as usize] else {
                    return false;
                };
                let next = (0..values.len())
                    .filter(|&i| candidates >> i & 1 == 1)
                    .filter(|&i| values[i].get(at as usize) == Some(&b))
                    .fold(0u64, |m, i| m | 1 << i);
                if next != 0 {
                    self.p.scalar = Scalar::Literal {
                        node,
                        candidates: next,
                        at: at + 1,
                    };
                    self.literal_maybe_done();
                    return true;
                }
                // A whole candidate (a number, `1` of `1` and `10`) ends before this byte.
                let whole = (0..values.len())
                    .any(|i| candidates >> i & 1 == 1 && values[i].len() == at as usize);
                if !whole || self.p.depth == 0 {
                    return false;
                }
                self.value_done();
            }
        }
        // Between values: whitespace (not inside a key), structure, or the start of a value.
        let in_key = self.p.depth > 0
            && matches!(
                self.p.frames[self.p.depth as usize - 1].phase,
                Phase::InKey { .. }
            );
        if !in_key && matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            if self.p.done || self.p.whitespace_run >= MAX_WHITESPACE_RUN {
                return false;
            }
            self.p.whitespace_run += 1;
            return true;
        }
        self.p.whitespace_run = 0;
        if let Some((node, or_close)) = self.expected() {
            if b == b']' && or_close {
                return self.close();
            }
            return self.begin(node, b);
        }
        let nodes = self.nodes;
        let Some(f) = self.top() else {
            return false;
        };
        match (&nodes[f.node as usize], f.phase) {
            (Node::Object { props, required }, Phase::KeyOrClose | Phase::Key | Phase::After) => {
                let unused = ((1u128 << props.len()) - 1) as u64 & !f.used;
                match (f.phase, b) {
                    (Phase::KeyOrClose | Phase::Key, b'"') if unused != 0 => {
                        f.phase = Phase::InKey {
                            candidates: unused,
                            at: 0,
                        };
                        true
                    }
                    (Phase::After, b',') if unused != 0 => {
                        f.phase = Phase::Key;
                        true
                    }
                    (Phase::KeyOrClose | Phase::After, b'}') if f.used & required == *required => {
                        self.close()
                    }
                    _ => false,
                }
            }
            (Node::Object { props, .. }, Phase::InKey { candidates, at }) => {
                let at_ = at as usize;
                if b == b'"' {
                    match (0..props.len())
                        .find(|&i| candidates >> i & 1 == 1 && props[i].0.len() == at_)
                    {
                        Some(i) => {
                            f.phase = Phase::Colon { prop: i as u8 };
                            true
                        }
                        None => false,
                    }
                } else {
                    let next = (0..props.len())
                        .filter(|&i| candidates >> i & 1 == 1 && props[i].0.get(at_) == Some(&b))
                        .fold(0u64, |m, i| m | 1 << i);
                    if next == 0 {
                        return false;
                    }
                    f.phase = Phase::InKey {
                        candidates: next,
                        at: at + 1,
                    };
                    true
                }
            }
            (Node::Object { .. }, Phase::Colon { prop }) if b == b':' => {
                f.phase = Phase::Value { prop };
                true
            }
            (Node::Array { max, min, .. }, Phase::After) => match b {
                b',' if f.used < *max as u64 => {
                    f.phase = Phase::Item;
                    true
                }
                b']' if f.used >= *min as u64 => self.close(),
                _ => false,
            },
            _ => false,
        }
    }
}

/// A sequence's schema constraint: the compiled schema, where the output stands, and the
/// vocabulary's bytes.
#[derive(Debug, Clone)]
pub struct SchemaConstraint {
    schema: Arc<Schema>,
    prefix: SchemaPrefix,
    tokens: Arc<TokenBytes>,
}

impl SchemaConstraint {
    pub fn new(schema: Arc<Schema>, tokens: Arc<TokenBytes>) -> Self {
        Self {
            schema,
            prefix: SchemaPrefix::new(),
            tokens,
        }
    }

    /// Whether `bytes` may follow `state` (moving it past them).
    fn feed_all(nodes: &[Node], state: &mut SchemaPrefix, bytes: &[u8]) -> bool {
        let mut c = Cursor { p: state, nodes };
        bytes.iter().all(|&b| c.feed(b))
    }

    /// Sets every logit the constraint forbids to −∞ (see [`crate::constraint`]); returns
    /// whether any token is left.
    pub fn mask(&self, logits: &mut [f32], stop_ids: &[u32]) -> bool {
        let nodes = &self.schema.nodes;
        let plain_string = matches!(self.prefix.scalar, Scalar::Json(l) if l.in_plain_string());
        let bits =
            self.schema
                .masks
                .allowed_with(&self.tokens, &self.prefix, plain_string, |s, t| {
                    let mut s = *s;
                    Self::feed_all(nodes, &mut s, t)
                });
        crate::json_mode::apply_mask(&bits, self.prefix.done, logits, stop_ids)
    }

    /// Moves past a drawn token (one the mask allowed).
    pub fn accept(&mut self, id: u32) {
        if (id as usize) < self.tokens.len() {
            let ok = Self::feed_all(
                &self.schema.nodes,
                &mut self.prefix,
                self.tokens.get(id as usize),
            );
            debug_assert!(ok, "a token the mask forbade");
        }
    }

    pub fn is_complete(&self) -> bool {
        self.prefix.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        Schema::compile(&json!({
            "type": "object",
            "title": "a caption",
            "properties": {
                "caption": {"type": "string", "description": "one sentence"},
                "objects": {"type": "array", "items": {"enum": ["cat", "dog", 7]}, "minItems": 1, "maxItems": 2},
                "count": {"type": "integer"},
                "score": {"type": "number"},
                "moving": {"type": "boolean"},
                "colour": {"enum": ["red", "reddish", null]},
                "meta": {"type": "object", "properties": {"n": {"const": 1}}, "required": ["n"], "additionalProperties": false}
            },
            "required": ["caption", "count"],
            "additionalProperties": false
        }))
        .unwrap()
    }

    fn accepted(s: &Schema, text: &str) -> Result<(), usize> {
        let mut p = SchemaPrefix::new();
        let mut c = Cursor {
            p: &mut p,
            nodes: &s.nodes,
        };
        for (i, &b) in text.as_bytes().iter().enumerate() {
            if !c.feed(b) {
                return Err(i);
            }
        }
        if c.p.done {
            Ok(())
        } else {
            Err(text.len())
        }
    }

    #[test]
    fn documents_valid_against_the_schema_are_accepted() {
        let s = schema();
        for text in [
            r#"{"caption": "A cat.", "count": 1}"#,
            r#"{"count": -20, "caption": "x", "objects": ["dog", 7], "score": 1.5e-3}"#,
            r#"{"caption": "é \"q\" \u00e9", "count": 0, "moving": false, "colour": "reddish"}"#,
            r#"{"caption": "", "count": 3, "colour": null, "meta": {"n": 1}, "score": 0}"#,
            "{\n  \"caption\": \"a\",\n  \"count\": 2\n}",
        ] {
            assert_eq!(accepted(&s, text), Ok(()), "{text}");
            serde_json::from_str::<Value>(text).unwrap();
        }
    }

    #[test]
    fn what_the_schema_rules_out_is_refused_where_it_goes_wrong() {
        let s = schema();
        for (text, at) in [
            (r#"["caption"]"#, 0),
            (r#"{"title": 1}"#, 2),
            (r#"{"cou nt": 1}"#, 5),
            (r#"{"count": 1.5"#, 11),
            (r#"{"count": 1}"#, 11),
            (r#"{"caption": 5"#, 12),
            (r#"{"caption": "a", "caption": "b"}"#, 19),
            (r#"{"objects": [7], "objects": [7]}"#, 18),
            (r#"{"meta": {"n": 1}, "meta""#, 21),
            (r#"{"objects": []"#, 13),
            (r#"{"objects": ["cat", "dog", 7]"#, 25),
            (r#"{"objects": ["bird"]"#, 14),
            (r#"{"colour": "re"}"#, 14),
            (r#"{"moving": "yes"}"#, 11),
            (r#"{"meta": {}}"#, 10),
            (r#"{"meta": {"n": 2}}"#, 15),
        ] {
            assert_eq!(accepted(&s, text), Err(at), "{text}");
        }
        // Every property written: no comma may follow.
        let one =
            Schema::compile(&json!({"type": "object", "properties": {"a": {"type": "null"}}}))
                .unwrap();
        assert_eq!(accepted(&one, r#"{"a": null, "#), Err(10));
        assert_eq!(accepted(&one, "{}"), Ok(()));
    }

    /// What Pydantic writes for nested models and optional fields: `$defs` and `$ref`,
    /// `anyOf` with null, a list of types, titles and defaults.
    fn pydantic_like() -> Schema {
        Schema::compile(&pydantic_like_value()).unwrap()
    }

    fn pydantic_like_value() -> Value {
        json!({
            "$defs": {"Animal": {"title": "Animal", "type": "object", "properties": {
                "kind": {"enum": ["cat", "dog"], "title": "Kind", "type": "string"},
                "age": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": null, "title": "Age"}},
                "required": ["kind"]}},
            "title": "Photo", "type": "object",
            "properties": {
                "caption": {"title": "Caption", "type": "string"},
                "animals": {"items": {"$ref": "#/$defs/Animal"}, "title": "Animals", "type": "array"},
                "place": {"type": ["string", "null"], "default": null}
            },
            "required": ["caption", "animals"]
        })
    }

    /// JSON Schema's meaning for the subset, on parsed values (independent of the byte-level
    /// recognizer): what a document must be to be valid.
    fn valid(v: &Value, s: &Value, root: &Value) -> bool {
        if let Some(r) = s.get("$ref").and_then(|r| r.as_str()) {
            return valid(v, root.pointer(&r[1..]).unwrap(), root);
        }
        if let Some(alts) = s.get("anyOf").or(s.get("oneOf")).and_then(|a| a.as_array()) {
            return alts.iter().any(|a| valid(v, a, root));
        }
        if let Some(values) = s.get("enum").and_then(|e| e.as_array()) {
            return values.contains(v);
        }
        if let Some(c) = s.get("const") {
            return c == v;
        }
        let types: Vec<&str> = match &s["type"] {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(|t| t.as_str()).collect(),
            _ => vec![],
        };
        types.iter().any(|&t| match (t, v) {
            ("null", Value::Null) | ("boolean", Value::Bool(_)) | ("string", Value::String(_)) => {
                true
            }
            ("number", Value::Number(_)) => true,
            ("integer", Value::Number(n)) => n.is_i64() || n.is_u64(),
            ("array", Value::Array(items)) => {
                let n = items.len() as u64;
                n >= s.get("minItems").and_then(|m| m.as_u64()).unwrap_or(0)
                    && n <= s
                        .get("maxItems")
                        .and_then(|m| m.as_u64())
                        .unwrap_or(u64::MAX)
                    && items.iter().all(|i| valid(i, &s["items"], root))
            }
            ("object", Value::Object(o)) => {
                let props = s["properties"].as_object().cloned().unwrap_or_default();
                let required = s["required"].as_array().cloned().unwrap_or_default();
                o.iter()
                    .all(|(k, x)| props.get(k).is_some_and(|p| valid(x, p, root)))
                    && required.iter().all(|r| o.contains_key(r.as_str().unwrap()))
            }
            _ => false,
        })
    }

    #[test]
    fn random_documents_agree_with_the_schemas_meaning() {
        use crate::json_mode::tests::{random_value, Lcg};
        let schema = pydantic_like_value();
        let s = Schema::compile(&schema).unwrap();
        let mut r = Lcg(11);
        let pick = |r: &mut Lcg, xs: &[Value]| xs[r.below(xs.len())].clone();
        let (mut valid_seen, mut invalid_seen) = (0, 0);
        for i in 0..3000 {
            // Mostly schema-shaped documents with random slips (a wrong kind, a missing or extra
            // key, an item count), some entirely random objects.
            let animal = |r: &mut Lcg| {
                let mut a = serde_json::Map::new();
                if r.below(8) != 0 {
                    a.insert(
                        "kind".into(),
                        pick(r, &[json!("cat"), json!("dog"), json!("cow"), json!(3)]),
                    );
                }
                if r.below(2) == 0 {
                    a.insert(
                        "age".into(),
                        pick(r, &[json!(4), json!(null), json!(2.5), json!("4")]),
                    );
                }
                if r.below(12) == 0 {
                    a.insert("name".into(), json!("x"));
                }
                Value::Object(a)
            };
            let doc = if i % 10 == 9 {
                random_value(&mut r, 3)
            } else {
                let mut d = serde_json::Map::new();
                if r.below(10) != 0 {
                    d.insert(
                        "caption".into(),
                        pick(
                            &mut r,
                            &[json!("two cats"), json!(""), json!(1), json!(null)],
                        ),
                    );
                }
                if r.below(10) != 0 {
                    let n = r.below(4);
                    d.insert(
                        "animals".into(),
                        Value::Array((0..n).map(|_| animal(&mut r)).collect()),
                    );
                }
                if r.below(2) == 0 {
                    d.insert(
                        "place".into(),
                        pick(&mut r, &[json!("home"), json!(null), json!(false)]),
                    );
                }
                Value::Object(d)
            };
            let text = if i % 2 == 0 {
                serde_json::to_string(&doc).unwrap()
            } else {
                serde_json::to_string_pretty(&doc).unwrap()
            };
            let want = valid(&doc, &schema, &schema);
            assert_eq!(accepted(&s, &text).is_ok(), want, "{text}");
            if want {
                valid_seen += 1;
            } else {
                invalid_seen += 1;
            }
        }
        assert!(
            valid_seen > 300 && invalid_seen > 300,
            "{valid_seen} valid, {invalid_seen} not"
        );
    }

    #[test]
    fn references_and_alternatives_are_followed() {
        let s = pydantic_like();
        for text in [
            r#"{"caption": "x", "animals": [{"kind": "cat", "age": 3}, {"age": null, "kind": "dog"}], "place": null}"#,
            r#"{"animals": [], "caption": "", "place": "home"}"#,
        ] {
            assert_eq!(accepted(&s, text), Ok(()), "{text}");
        }
        for (text, at) in [
            (r#"{"caption": "x", "animals": [{"age": 1}"#, 38),
            (r#"{"caption": "x", "animals": [], "place": 5"#, 41),
            (r#"{"caption": "x", "animals": [{"kind": "cow""#, 40),
            (
                r#"{"caption": "x", "animals": [{"kind": "cat", "age": 1.5"#,
                53,
            ),
        ] {
            assert_eq!(accepted(&s, text), Err(at), "{text}");
        }
    }

    #[test]
    fn unsupported_keywords_are_named_with_where_they_are() {
        for (schema, at, says) in [
            (
                json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "x"}}}),
                "/properties/a",
                "`pattern`",
            ),
            (json!({"allOf": [{"type": "string"}]}), "/", "`allOf`"),
            (json!({"description": "no type"}), "/", "needs `type`"),
            (
                json!({"type": "string", "items": {"type": "null"}}),
                "/",
                "`items`",
            ),
            (
                json!({"type": "object", "additionalProperties": true}),
                "/",
                "additionalProperties",
            ),
            (json!({"type": "array"}), "/", "`items`"),
            (
                json!({"type": "object", "properties": {"a": {"type": "null"}}, "required": ["b"]}),
                "/",
                "required `b`",
            ),
            (json!({"type": "tuple"}), "/", "`tuple`"),
            (json!({"enum": []}), "/", "`enum`"),
            (
                json!({"$defs": {"N": {"type": "object", "properties": {"next": {"$ref": "#/$defs/N"}}}}, "$ref": "#/$defs/N"}),
                "/$defs/N/properties/next",
                "recursive",
            ),
            (
                json!({"$ref": "#/$defs/Missing"}),
                "/",
                "not a local reference",
            ),
            (
                json!({"$ref": "https://example.com/s.json"}),
                "/",
                "not a local reference",
            ),
            (
                json!({"anyOf": [{"type": "integer"}, {"type": "number"}]}),
                "/anyOf/1",
                "same byte",
            ),
            (
                json!({"type": ["string", "null"], "pattern": "x"}),
                "/",
                "`pattern`",
            ),
        ] {
            let e = Schema::compile(&schema).unwrap_err();
            assert_eq!(e.at, at, "{schema}");
            assert!(e.what.contains(says), "{schema}: {}", e.what);
        }
    }

    #[test]
    fn the_mask_walks_a_document_token_by_token() {
        let s = Arc::new(
            Schema::compile(&json!({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}))
                .unwrap(),
        );
        use crate::constraint::{testing, OutputConstraint};
        let words = [
            "<eos>", "{", "\"ok\"", ":", " true", "}", "\"", "o", "k", "x",
        ];
        let mut c =
            OutputConstraint::Schema(Box::new(SchemaConstraint::new(s, testing::vocab(&words))));
        let allowed = |c: &OutputConstraint| testing::allowed(c, &words);
        assert_eq!(allowed(&c), vec!["{"]);
        c.accept(1);
        assert_eq!(
            allowed(&c),
            vec!["\"ok\"", "\""],
            "a key, not `}}` (ok is required)"
        );
        c.accept(6);
        assert_eq!(allowed(&c), vec!["o"]);
        for id in [7, 8, 6, 3] {
            c.accept(id);
        }
        assert_eq!(allowed(&c), vec![" true"]);
        c.accept(4);
        assert_eq!(allowed(&c), vec!["}"]);
        c.accept(5);
        assert!(c.is_complete());
        assert_eq!(allowed(&c), vec!["<eos>"]);
    }
}
