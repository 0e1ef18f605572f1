//! A fast path for parsing the KDL v2 that recipes are made of.
//!
//! kdl-rs 6 (the reference parser) runs at about 1 MB/s, too slow for large
//! generated recipes. This parser handles the common syntax — bare, quoted and
//! single-line raw strings, decimal numbers, `#true`/`#false`/`#null`,
//! children blocks, `;`, `//` and nested `/* */` comments, `/-` slashdash and
//! `\` line continuations — at hundreds of MB/s. Whenever it meets anything
//! else (type annotations, multi-line strings, hex/octal/binary numbers,
//! `#inf`/`#nan`, Unicode whitespace, or any error) it answers `None`, and
//! the caller falls back to kdl-rs, which also reports every syntax error. So
//! this module may refuse valid documents but must never accept an invalid one
//! or read a valid one differently: a differential test checks it against
//! kdl-rs on generated documents.

use super::ast::{Entry, Node, Range, Value};

/// How deeply blocks (and, separately, `/* */` comments) may nest. Both parsers
/// recurse per level; real recipes nest three or four levels.
pub const MAX_NESTING: usize = 128;

/// The offset where `text` first nests blocks or block comments deeper than
/// [`MAX_NESTING`], found by a cheap scan that skips quoted strings and line
/// comments. Run before either parser so neither can exhaust the stack.
pub fn too_deep(text: &str) -> Option<usize> {
    let b = text.as_bytes();
    let (mut blocks, mut comments, mut i) = (0usize, 0usize, 0usize);
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'*') => {
                comments += 1;
                if comments > MAX_NESTING {
                    return Some(i);
                }
                i += 2;
                continue;
            }
            b'*' if comments > 0 && b.get(i + 1) == Some(&b'/') => {
                comments -= 1;
                i += 2;
                continue;
            }
            _ if comments > 0 => {}
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' && b[i] != b'\r' {
                    i += 1;
                }
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'{' => {
                blocks += 1;
                if blocks > MAX_NESTING {
                    return Some(i);
                }
            }
            b'}' => blocks = blocks.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    None
}

/// Parses `text`, or `None` when the fast path does not apply.
pub fn parse(text: &str) -> Option<Vec<Node>> {
    let mut p = Parser { src: text, b: text.as_bytes(), i: 0 };
    let nodes = p.nodes(false)?;
    (p.i == p.b.len()).then_some(nodes)
}

struct Parser<'a> {
    src: &'a str,
    b: &'a [u8],
    i: usize,
}

/// Characters that end a bare identifier (besides whitespace and newlines).
fn is_ident_stop(c: u8) -> bool {
    matches!(c, b'\\' | b'/' | b'(' | b')' | b'{' | b'}' | b';' | b'[' | b']' | b'"' | b'#' | b'=')
}

/// ASCII characters allowed literally in identifiers and strings.
fn is_plain_ascii(c: u8) -> bool {
    (0x21..0x7f).contains(&c) || c == b' ' || c == b'\t'
}

/// Non-ASCII characters that are whitespace, newlines or disallowed in KDL;
/// the fast path gives up on them rather than classify each.
fn is_special_unicode(c: char) -> bool {
    matches!(c,
        '\u{85}' | '\u{a0}' | '\u{1680}' | '\u{2000}'..='\u{200f}' | '\u{2028}'..='\u{202f}'
        | '\u{205f}' | '\u{2066}'..='\u{2069}' | '\u{3000}' | '\u{feff}')
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn peek_at(&self, k: usize) -> Option<u8> {
        self.b.get(self.i + k).copied()
    }

    fn starts_with(&self, s: &[u8]) -> bool {
        self.b[self.i..].starts_with(s)
    }

    /// Nodes until end of input (top level) or the closing `}` (in a block, consumed).
    fn nodes(&mut self, in_block: bool) -> Option<Vec<Node>> {
        let mut nodes = Vec::new();
        loop {
            self.line_space()?;
            match self.peek() {
                None if in_block => return None,
                None => return Some(nodes),
                Some(b'}') if in_block => {
                    self.i += 1;
                    return Some(nodes);
                }
                Some(b'}') => return None,
                _ => {}
            }
            let discard = self.slashdash()?;
            let node = self.node(in_block)?;
            if !discard {
                nodes.push(node);
            } else if self.b[..self.i].ends_with(b";") {
                // kdl-rs rejects `/-node;`; leave that judgement to it.
                return None;
            }
        }
    }

    /// Consumes `/-` and the line space after it, if present.
    fn slashdash(&mut self) -> Option<bool> {
        if self.starts_with(b"/-") {
            self.i += 2;
            self.line_space()?;
            Some(true)
        } else {
            Some(false)
        }
    }

    fn node(&mut self, in_block: bool) -> Option<Node> {
        let start = self.i;
        let name = self.string()?;
        let name_span = Range::new(start, self.i);
        let mut entries = Vec::new();
        let mut children = None;
        let mut end = self.i;
        // After a (slashdashed) block, only more blocks or the terminator may follow.
        let mut saw_block = false;
        loop {
            let spaced = self.node_space()?;
            match self.peek() {
                None => break,
                Some(b'\n' | b'\r' | b';') => {
                    self.newline_or_semicolon();
                    break;
                }
                Some(b'/') if self.peek_at(1) == Some(b'/') => {
                    self.line_comment()?;
                    break;
                }
                Some(b'}') if in_block => break,
                Some(b'{') if spaced => {
                    let block = self.children()?;
                    end = self.i;
                    if children.is_none() {
                        children = Some(block);
                        self.after_children(in_block)?;
                        break;
                    }
                    return None;
                }
                Some(b'/') if spaced && self.peek_at(1) == Some(b'-') => {
                    self.i += 2;
                    self.line_space()?;
                    if self.peek() == Some(b'{') {
                        self.children()?;
                        saw_block = true;
                    } else if saw_block {
                        return None;
                    } else {
                        self.entry()?;
                    }
                }
                Some(_) if spaced && !saw_block => {
                    entries.push(self.entry()?);
                    end = self.i;
                }
                Some(_) => return None,
            }
        }
        Some(Node { name, name_span, span: Range::new(start, end), entries, children })
    }

    /// After a children block: only space, slashdashed blocks, then a terminator.
    fn after_children(&mut self, in_block: bool) -> Option<()> {
        let spaced = self.node_space()?;
        match self.peek() {
            None => Some(()),
            // kdl-rs rejects some `} ;`: leave spaced semicolons to it.
            Some(b';') if spaced => None,
            Some(b'\n' | b'\r' | b';') => {
                self.newline_or_semicolon();
                Some(())
            }
            Some(b'/') if self.peek_at(1) == Some(b'/') => self.line_comment(),
            Some(b'}') if in_block => Some(()),
            _ => None,
        }
    }

    fn children(&mut self) -> Option<Vec<Node>> {
        self.i += 1; // `{`
        self.nodes(true)
    }

    fn entry(&mut self) -> Option<Entry> {
        let start = self.i;
        let c = self.peek()?;
        if self.looks_numeric()
            || c == b'#' && self.peek_at(1) != Some(b'"') && self.peek_at(1) != Some(b'#')
        {
            let value = self.scalar()?;
            return Some(Entry { name: None, value, value_span: Range::new(start, self.i) });
        }
        let text = self.string()?;
        let key_span = Range::new(start, self.i);
        let after_key = self.i;
        self.node_space()?;
        if self.peek() == Some(b'=') {
            self.i += 1;
            self.node_space()?;
            let value_start = self.i;
            let value = self.value()?;
            return Some(Entry {
                name: Some((text, key_span)),
                value,
                value_span: Range::new(value_start, self.i),
            });
        }
        self.i = after_key;
        Some(Entry { name: None, value: Value::String(text), value_span: key_span })
    }

    fn value(&mut self) -> Option<Value> {
        let c = self.peek()?;
        if self.looks_numeric()
            || c == b'#' && self.peek_at(1) != Some(b'"') && self.peek_at(1) != Some(b'#')
        {
            self.scalar()
        } else {
            self.string().map(Value::String)
        }
    }

    /// A digit, or a sign or dot followed by a digit: the start of a number.
    fn looks_numeric(&self) -> bool {
        let digit = |k| self.peek_at(k).is_some_and(|c: u8| c.is_ascii_digit());
        match self.peek() {
            Some(b'0'..=b'9') => true,
            Some(b'+' | b'-') => digit(1) || (self.peek_at(1) == Some(b'.') && digit(2)),
            Some(b'.') => digit(1),
            _ => false,
        }
    }

    /// A number or `#true`/`#false`/`#null`, followed by a separator.
    fn scalar(&mut self) -> Option<Value> {
        let value = if self.peek() == Some(b'#') {
            let rest = &self.b[self.i..];
            let (value, len) = if rest.starts_with(b"#true") {
                (Value::Bool(true), 5)
            } else if rest.starts_with(b"#false") {
                (Value::Bool(false), 6)
            } else if rest.starts_with(b"#null") {
                (Value::Null, 5)
            } else {
                return None;
            };
            self.i += len;
            value
        } else {
            self.number()?
        };
        self.separator_follows().then_some(value)
    }

    /// Decimal integers and `digits.digits`; anything fancier is left to kdl-rs.
    /// Like kdl-rs, the magnitude, and each side of a decimal point, must fit
    /// in an `i128`; anything it would reject is refused here too.
    fn number(&mut self) -> Option<Value> {
        let negative = match self.peek() {
            Some(b'-') => {
                self.i += 1;
                true
            }
            Some(b'+') => {
                self.i += 1;
                false
            }
            _ => false,
        };
        let digits = |p: &mut Self| {
            let s = p.i;
            while p.peek().is_some_and(|c| c.is_ascii_digit()) {
                p.i += 1;
            }
            (p.i > s).then(|| p.src[s..p.i].parse::<i128>().ok())?
        };
        let whole_start = self.i;
        let whole = digits(self)?;
        if self.peek() != Some(b'.') {
            return Some(Value::Integer(if negative { -whole } else { whole }));
        }
        self.i += 1;
        digits(self)?;
        let magnitude: f64 =
            self.src[whole_start..self.i].parse().ok().filter(|f: &f64| f.is_finite())?;
        Some(Value::Float(if negative { -magnitude } else { magnitude }))
    }

    /// Whether the next character may follow a value or name.
    fn separator_follows(&self) -> bool {
        match self.peek() {
            None => true,
            Some(b' ' | b'\t' | b'\n' | b'\r' | b';' | b'}' | b'=') => true,
            Some(b'/') => matches!(self.peek_at(1), Some(b'/' | b'*')),
            Some(b'\\') => true,
            _ => false,
        }
    }

    /// A bare identifier, quoted string or single-line raw string.
    fn string(&mut self) -> Option<String> {
        let value = match self.peek()? {
            b'"' => self.quoted()?,
            b'#' => self.raw()?,
            _ => self.identifier()?,
        };
        self.separator_follows().then_some(value)
    }

    fn identifier(&mut self) -> Option<String> {
        if self.looks_numeric() {
            return None;
        }
        let start = self.i;
        while let Some(c) = self.peek() {
            if c < 0x80 {
                if !is_plain_ascii(c) || c == b' ' || c == b'\t' || is_ident_stop(c) {
                    break;
                }
                self.i += 1;
            } else {
                let ch = self.src[self.i..].chars().next()?;
                if is_special_unicode(ch) {
                    return None;
                }
                self.i += ch.len_utf8();
            }
        }
        let text = &self.src[start..self.i];
        if text.is_empty() || matches!(text, "true" | "false" | "null" | "inf" | "-inf" | "nan") {
            return None;
        }
        Some(text.to_string())
    }

    fn quoted(&mut self) -> Option<String> {
        if self.starts_with(b"\"\"\"") {
            return None; // multi-line string
        }
        self.i += 1;
        let mut out = String::new();
        loop {
            let c = self.peek()?;
            match c {
                b'"' => {
                    self.i += 1;
                    return Some(out);
                }
                b'\\' => {
                    self.i += 1;
                    let escaped = match self.peek()? {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b's' => ' ',
                        _ => return None, // \u{…} and whitespace escapes: kdl-rs
                    };
                    self.i += 1;
                    out.push(escaped);
                }
                _ => out.push(self.literal_char(&[])?),
            }
        }
    }

    /// `#"…"#` with any number of `#`, on one line.
    fn raw(&mut self) -> Option<String> {
        let hashes = self.b[self.i..].iter().take_while(|&&c| c == b'#').count();
        if self.peek_at(hashes) != Some(b'"') || self.b[self.i + hashes..].starts_with(b"\"\"\"") {
            return None;
        }
        self.i += hashes + 1;
        let start = self.i;
        loop {
            let c = self.peek()?;
            if c == b'"'
                && self.b[self.i + 1..].iter().take(hashes).filter(|&&h| h == b'#').count()
                    == hashes
            {
                let text = self.src[start..self.i].to_string();
                self.i += 1 + hashes;
                return Some(text);
            }
            self.literal_char(&[])?;
        }
    }

    /// Consumes one character allowed literally in strings and comments (plain
    /// ASCII, one of `also`, or Unicode that is not whitespace, a newline or
    /// disallowed) and returns it.
    fn literal_char(&mut self, also: &[u8]) -> Option<char> {
        let c = self.peek()?;
        if c < 0x80 {
            if !is_plain_ascii(c) && !also.contains(&c) {
                return None;
            }
            self.i += 1;
            return Some(c as char);
        }
        let ch = self.src[self.i..].chars().next()?;
        if is_special_unicode(ch) {
            return None;
        }
        self.i += ch.len_utf8();
        Some(ch)
    }

    /// Spaces, tabs, `/* */` comments and `\` line continuations within a node.
    /// Returns whether anything was skipped.
    fn node_space(&mut self) -> Option<bool> {
        let start = self.i;
        loop {
            match self.peek() {
                Some(b' ' | b'\t') => self.i += 1,
                Some(b'/') if self.peek_at(1) == Some(b'*') => self.block_comment()?,
                Some(b'\\') => {
                    self.i += 1;
                    while matches!(self.peek(), Some(b' ' | b'\t')) {
                        self.i += 1;
                    }
                    match self.peek() {
                        Some(b'\n' | b'\r') => self.newline_or_semicolon(),
                        Some(b'/') if self.peek_at(1) == Some(b'/') => self.line_comment()?,
                        None => {}
                        _ => return None,
                    }
                }
                Some(c) if c >= 0x80 => {
                    let ch = self.src[self.i..].chars().next()?;
                    if is_special_unicode(ch) {
                        return None;
                    }
                    break;
                }
                _ => break,
            }
        }
        Some(self.i > start)
    }

    /// Node space plus newlines and `//` comments, between nodes.
    fn line_space(&mut self) -> Option<()> {
        loop {
            self.node_space()?;
            match self.peek() {
                Some(b'\n' | b'\r') => self.newline_or_semicolon(),
                Some(b'/') if self.peek_at(1) == Some(b'/') => self.line_comment()?,
                Some(b'\x0b' | b'\x0c') => return None,
                _ => return Some(()),
            }
        }
    }

    fn newline_or_semicolon(&mut self) {
        if self.starts_with(b"\r\n") {
            self.i += 2;
        } else {
            self.i += 1;
        }
    }

    /// `// …` up to and including the newline.
    fn line_comment(&mut self) -> Option<()> {
        while let Some(c) = self.peek() {
            match c {
                b'\n' => {
                    self.i += 1;
                    return Some(());
                }
                b'\r' => {
                    self.newline_or_semicolon();
                    return Some(());
                }
                _ => self.comment_char()?,
            }
        }
        Some(())
    }

    /// Skips one character of a comment, refusing control and special characters.
    fn comment_char(&mut self) -> Option<()> {
        self.literal_char(b"\n\r").map(drop)
    }

    /// `/* … */`, nested.
    fn block_comment(&mut self) -> Option<()> {
        let mut depth = 0usize;
        loop {
            if self.starts_with(b"/*") {
                depth += 1;
                self.i += 2;
            } else if self.starts_with(b"*/") {
                depth -= 1;
                self.i += 2;
                if depth == 0 {
                    return Some(());
                }
            } else {
                self.comment_char()?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::ast::from_kdl;
    use proptest::prelude::*;

    /// Nodes without the whole-node span, which the two parsers draw differently
    /// and the decoder only uses to attribute problems to a node.
    fn shape(nodes: &[Node]) -> Vec<Node> {
        nodes
            .iter()
            .map(|n| Node {
                span: Range::new(0, 0),
                children: n.children.as_deref().map(shape),
                ..n.clone()
            })
            .collect()
    }

    /// If the fast path accepts `text`, kdl-rs accepts it and reads the same tree.
    fn agrees(text: &str) -> Result<bool, TestCaseError> {
        let Some(fast) = parse(text) else { return Ok(false) };
        let reference = kdl::KdlDocument::parse_v2(text);
        prop_assert!(reference.is_ok(), "fast path accepted what kdl-rs rejects: {text:?}");
        let reference = from_kdl(&reference.unwrap(), text);
        prop_assert_eq!(shape(&fast), shape(&reference), "text: {:?}", text);
        Ok(true)
    }

    fn kdlish() -> impl Strategy<Value = String> {
        let token = prop_oneof![
            4 => Just("node ".to_string()),
            2 => Just("\"quoted str\" ".to_string()),
            1 => Just("\"esc \\\" \\n \\t \\\\\" ".to_string()),
            1 => Just("\"\\u{1F600}\" ".to_string()),
            1 => Just("#\"raw \"str\"# ".to_string()),
            1 => Just("##\"r\"#\"## ".to_string()),
            1 => Just("key=".to_string()),
            1 => Just("key = ".to_string()),
            1 => Just("\"k k\"=".to_string()),
            1 => Just("=".to_string()),
            1 => Just("12 ".to_string()),
            1 => Just("-3 ".to_string()),
            1 => Just("+4 ".to_string()),
            1 => Just("1.5 ".to_string()),
            1 => Just("1e3 ".to_string()),
            1 => Just("170141183460469231731687303715884105727 ".to_string()),
            1 => Just("-170141183460469231731687303715884105728 ".to_string()),
            1 => Just("0.1234567890123456789012345678901234567890 ".to_string()),
            1 => Just("0x1f ".to_string()),
            1 => Just("1_000 ".to_string()),
            1 => Just(".5 ".to_string()),
            1 => Just("#true ".to_string()),
            1 => Just("#false ".to_string()),
            1 => Just("#null ".to_string()),
            1 => Just("#inf ".to_string()),
            1 => Just("true ".to_string()),
            1 => Just("- ".to_string()),
            1 => Just("-x ".to_string()),
            1 => Just(".x ".to_string()),
            1 => Just("a.b-c_d/e ".to_string()),
            1 => Just("é ".to_string()),
            3 => Just("{".to_string()),
            3 => Just("}".to_string()),
            2 => Just(";".to_string()),
            4 => Just("\n".to_string()),
            1 => Just("\r\n".to_string()),
            1 => Just(" ".to_string()),
            1 => Just("\t".to_string()),
            1 => Just("// c\n".to_string()),
            1 => Just("/* c /* n */ */".to_string()),
            1 => Just("/-".to_string()),
            1 => Just("\\\n".to_string()),
            1 => Just("\\ // c\n".to_string()),
            1 => Just("(t)".to_string()),
            1 => Just("\"\"\"\n  m\n  \"\"\"".to_string()),
            1 => Just("\u{a0}".to_string()),
            1 => Just("\u{2028}".to_string()),
            1 => Just("[".to_string()),
            1 => "\\PC{0,3}",
        ];
        proptest::collection::vec(token, 0..40).prop_map(|t| t.concat())
    }

    fn pick(options: &'static [&'static str]) -> impl Strategy<Value = String> + Clone {
        proptest::sample::select(options).prop_map(str::to_string)
    }

    /// Mostly valid documents: nodes with entries, blocks, comments and slashdashes.
    fn structured() -> impl Strategy<Value = String> {
        let name =
            pick(&["node", "package", "\"q n\"", "#\"raw\"#", "a.b-c", "é", "-", "--x", ".x"]);
        let value = pick(&[
            "\"str\"",
            "\"esc \\\" \\n \\\\\"",
            "x",
            "#\"r\"#",
            "##\"r\"#\"##",
            "12",
            "-3",
            "+4",
            "01",
            "1.5",
            "-0.25",
            "#true",
            "#false",
            "#null",
            "\"\"",
            "\"ü\"",
        ]);
        let key = pick(&["k", "\"k k\"", "#\"k\"#", "version"]);
        let eq = pick(&["=", " = ", "= ", " ="]);
        let space = pick(&[" ", "  ", "\t", " /* c */ ", " \\\n ", " \\ // c\n  ", "/* c */"]);
        let entry = prop_oneof![
            3 => value.clone(),
            2 => (key, eq, value.clone()).prop_map(|(k, e, v)| format!("{k}{e}{v}")),
            1 => value.prop_map(|v| format!("/-{v}")),
        ];
        let entries = proptest::collection::vec((space, entry), 0..4)
            .prop_map(|es| es.into_iter().map(|(s, e)| format!("{s}{e}")).collect::<String>());
        let terminator = pick(&["\n", ";", " // c\n", "\r\n", " ;\n", "\n\n"]);
        let leaf = (name.clone(), entries.clone(), terminator.clone())
            .prop_map(|(n, e, t)| format!("{n}{e}{t}"));
        let tree = leaf.prop_recursive(3, 24, 4, move |inner| {
            (
                name.clone(),
                entries.clone(),
                proptest::collection::vec(inner, 0..4),
                pick(&[" ", "  ", " /-{ x } "]),
                terminator.clone(),
                proptest::bool::weighted(0.1),
            )
                .prop_map(|(n, e, children, before, t, slashdash)| {
                    let dash = if slashdash { "/-" } else { "" };
                    format!("{dash}{n}{e}{before}{{\n{}}}{t}", children.concat())
                })
        });
        proptest::collection::vec(tree, 0..5).prop_map(|nodes| nodes.concat())
    }

    /// Structured documents, with one token of noise spliced in now and then.
    fn documents() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => structured(),
            1 => (structured(), kdlish(), any::<proptest::sample::Index>()).prop_map(|(doc, noise, at)| {
                let mut cut = at.index(doc.len() + 1);
                while !doc.is_char_boundary(cut) {
                    cut -= 1;
                }
                format!("{}{noise}{}", &doc[..cut], &doc[cut..])
            }),
            1 => kdlish(),
        ]
    }

    /// 3,000 generated documents per run (PROPTEST_CASES overrides; a local
    /// run of 200,000, with integer and fraction limits in the generator, found
    /// no disagreement). At least a quarter must take the fast path, or the
    /// test would prove nothing.
    #[test]
    fn fast_path_agrees_with_kdl_rs() {
        let cases =
            std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(3_000);
        let config =
            ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() };
        let mut runner = proptest::test_runner::TestRunner::new(config);
        let accepted = std::cell::Cell::new(0u32);
        let result = runner.run(&documents(), |text| {
            if agrees(&text)? {
                accepted.set(accepted.get() + 1);
            }
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
        assert!(
            accepted.get() >= cases / 4,
            "only {} of {cases} cases took the fast path",
            accepted.get()
        );
    }

    #[test]
    fn fast_path_covers_recipes() {
        for text in [
            include_str!("../../recipes/hello/pkg.kdl"),
            include_str!("../../recipes/common/base-files.kdl"),
            "package \"a\" version=\"1\" { build \"script\" { run \"true\" }; depends \"b\" }\n",
            "image \"i\" {\n  contents \"a\" // why\n  /- cmd \"x\"\n  label \"k\" \"v\"\n}\n",
        ] {
            let fast = parse(text).unwrap_or_else(|| panic!("fast path refused:\n{text}"));
            let reference = from_kdl(&kdl::KdlDocument::parse_v2(text).unwrap(), text);
            assert_eq!(shape(&fast), shape(&reference));
        }
    }

    #[test]
    fn measures_nesting() {
        let deep = format!("a {}{}", "{ b ".repeat(MAX_NESTING + 1), "}".repeat(MAX_NESTING + 1));
        assert_eq!(too_deep(&deep), Some(2 + 4 * MAX_NESTING));
        let ok = format!("a {}{}", "{ b ".repeat(MAX_NESTING), "}".repeat(MAX_NESTING));
        assert_eq!(too_deep(&ok), None);
        assert_eq!(too_deep(&"/* ".repeat(MAX_NESTING + 1)), Some(3 * MAX_NESTING));
        // Braces in strings and comments do not count.
        let quoted = format!("a \"{}\" // {}\n", "{".repeat(500), "{".repeat(500));
        assert_eq!(too_deep(&quoted), None);
    }

    #[test]
    fn refuses_what_it_does_not_handle() {
        for text in [
            "a (t)1",
            "a 0x10",
            "a \"\"\"\n x\n \"\"\"",
            "a #inf",
            "a \"\\u{41}\"",
            "a {",
            "}",
            "a{}",
        ] {
            assert!(parse(text).is_none(), "{text:?}");
        }
    }
}
