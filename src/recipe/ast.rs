//! The KDL document shape the decoder reads: nodes, entries and values with
//! byte spans into the file's text. Filled either by the fast parser
//! ([`super::fastkdl`]) or, for everything it does not handle, from a kdl-rs
//! document ([`from_kdl`]); both give the same tree for the same text.

/// A byte range `offset..offset + len` in the parsed text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub offset: usize,
    pub len: usize,
}

impl Range {
    pub fn new(start: usize, end: usize) -> Self {
        Range { offset: start, len: end - start }
    }

    pub fn end(&self) -> usize {
        self.offset + self.len
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    String(String),
    Integer(i128),
    Float(f64),
    Bool(bool),
    Null,
}

/// An argument (`name` is `None`) or a property.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: Option<(String, Range)>,
    pub value: Value,
    pub value_span: Range,
}

impl Entry {
    /// The whole entry: `key=value` for a property.
    pub fn span(&self) -> Range {
        match &self.name {
            Some((_, key)) => Range::new(key.offset, self.value_span.end()),
            None => self.value_span,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: String,
    pub name_span: Range,
    /// From the name to the end of the node's last entry or closing brace.
    pub span: Range,
    pub entries: Vec<Entry>,
    pub children: Option<Vec<Node>>,
}

/// Converts a kdl-rs document (the reference parser) into the decoder's shape.
pub fn from_kdl(document: &kdl::KdlDocument, text: &str) -> Vec<Node> {
    document.nodes().iter().map(|n| node_from_kdl(n, text)).collect()
}

fn range(span: miette::SourceSpan, text: &str) -> Range {
    let offset = span.offset().min(text.len());
    Range { offset, len: span.len().min(text.len() - offset) }
}

fn node_from_kdl(node: &kdl::KdlNode, text: &str) -> Node {
    let name_span = range(node.name().span(), text);
    let whole = range(node.span(), text);
    Node {
        name: node.name().value().to_string(),
        name_span,
        span: Range::new(name_span.offset, whole.end().max(name_span.end())),
        entries: node.entries().iter().map(|e| entry_from_kdl(e, text)).collect(),
        children: node.children().map(|c| from_kdl(c, text)),
    }
}

fn entry_from_kdl(entry: &kdl::KdlEntry, text: &str) -> Entry {
    let span = range(entry.span(), text);
    let value = match entry.value() {
        kdl::KdlValue::String(s) => Value::String(s.clone()),
        kdl::KdlValue::Integer(i) => Value::Integer(*i),
        kdl::KdlValue::Float(f) => Value::Float(*f),
        kdl::KdlValue::Bool(b) => Value::Bool(*b),
        kdl::KdlValue::Null => Value::Null,
    };
    match entry.name() {
        None => Entry { name: None, value, value_span: span },
        Some(key) => {
            // kdl-rs spans the whole `key=value`; the value starts after the
            // key, node space, `=` and node space again.
            let key_span = range(key.span(), text);
            let after = skip_node_space(text, key_span.end());
            let value_start = if text[after..].starts_with('=') {
                skip_node_space(text, after + 1)
            } else {
                after
            };
            let value_span = Range::new(value_start.min(span.end()), span.end());
            Entry { name: Some((key.value().to_string(), key_span)), value, value_span }
        }
    }
}

/// The offset after spaces, `/* */` comments and `\` line continuations from `at`.
fn skip_node_space(text: &str, mut at: usize) -> usize {
    let b = text.as_bytes();
    loop {
        match b.get(at) {
            Some(b' ' | b'\t') => at += 1,
            Some(b'/') if b.get(at + 1) == Some(&b'*') => {
                let mut depth = 0usize;
                while at < b.len() {
                    if b[at..].starts_with(b"/*") {
                        depth += 1;
                        at += 2;
                    } else if b[at..].starts_with(b"*/") {
                        depth -= 1;
                        at += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        at += 1;
                    }
                }
            }
            Some(b'\\') => {
                // A line continuation: everything up to and including the newline
                // (LF, CR or CRLF).
                while at < b.len() && b[at] != b'\n' && b[at] != b'\r' {
                    at += 1;
                }
                if b[at..].starts_with(b"\r\n") {
                    at += 1;
                }
                at += 1;
            }
            _ => return at.min(b.len()),
        }
    }
}
