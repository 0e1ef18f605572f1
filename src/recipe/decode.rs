//! The KDL adapter: decodes one recipe file's text into model items.
//!
//! This is the only module that knows KDL. It checks everything that can be
//! checked within one file (node and option names, value types and counts,
//! value syntax) and records each problem as an [`Issue`] instead of stopping,
//! so a user sees every mistake of a file at once. Cross-file checks
//! (duplicates, references, cycles) belong to [`super::load()`].

use std::collections::BTreeMap;

use super::ast::{self, Entry, Node, Range, Value};

use super::diagnostic::{Issue, Problem, did_you_mean};
use super::model::{
    Builder, Compression, FileId, Image, Install, Package, Port, Protocol, Source, Span, Spanned,
};
use crate::platform::{Platform, arch_alias, known_arch_names};

/// Everything one file declares.
#[derive(Debug, Default)]
pub struct FileItems {
    pub imports: Vec<Spanned<String>>,
    /// Names of packages that had errors: references to them are not reported again.
    pub broken_packages: Vec<String>,
    pub packages: Vec<Package>,
    pub images: Vec<Image>,
}

/// Decodes `text` (the contents of file `file`), appending problems to `issues`.
pub fn decode_file(file: FileId, text: &str, issues: &mut Vec<Issue>) -> FileItems {
    let mut decoder = Decoder { file, text, issues };
    if let Some(offset) = super::fastkdl::too_deep(text) {
        let span = decoder.span(Range { offset, len: 1 });
        decoder.issues.push(
            Issue::new(
                Problem::Syntax(format!(
                    "nested more than {} levels deep",
                    super::fastkdl::MAX_NESTING
                )),
                span,
                "too deep",
            )
            .help("recipes nest a few levels: package { build { … } }"),
        );
        return FileItems::default();
    }
    let nodes = match super::fastkdl::parse(text) {
        Some(nodes) => Ok(nodes),
        None => kdl::KdlDocument::parse_v2(text).map(|document| ast::from_kdl(&document, text)),
    };
    let document = match nodes {
        Ok(nodes) => nodes,
        Err(error) => {
            // kdl-rs often reports one mistake twice, from nested rules: keep
            // the first report at each place.
            let mut reported: Vec<Range> = Vec::new();
            for d in error.diagnostics {
                let range = Range { offset: d.span.offset(), len: d.span.len() };
                let overlaps =
                    reported.iter().any(|r| range.offset >= r.offset && range.offset <= r.end());
                if overlaps {
                    continue;
                }
                reported.push(range);
                let message = d.message.unwrap_or_else(|| "invalid KDL".to_string());
                let label = d.label.unwrap_or_else(|| "here".to_string());
                let help = d.help.unwrap_or_else(|| {
                    if message.contains('}') || message.contains('{') {
                        "every `{` needs a matching `}`".to_string()
                    } else {
                        "recipes are KDL v2: strings in double quotes, booleans as #true and #false"
                            .to_string()
                    }
                });
                let span = decoder.span(range);
                decoder.issues.push(Issue::new(Problem::Syntax(message), span, label).help(help));
            }
            return FileItems::default();
        }
    };
    decoder.document(&document)
}

const TOP_NODES: [&str; 3] = ["import", "package", "image"];
const PACKAGE_NODES: [&str; 8] =
    ["description", "license", "source", "build", "env", "depends", "build-depends", "tools"];
const IMAGE_NODES: [&str; 12] = [
    "contents",
    "platforms",
    "entrypoint",
    "cmd",
    "env",
    "workdir",
    "user",
    "expose",
    "label",
    "compression",
    "created",
    // Listed so a misspelling of `platforms` gets a suggestion either way.
    "platform",
];

struct Decoder<'a> {
    file: FileId,
    text: &'a str,
    issues: &'a mut Vec<Issue>,
}

impl Decoder<'_> {
    fn span(&self, span: Range) -> Span {
        let offset = span.offset.min(self.text.len());
        Span { file: self.file, offset, len: span.len.min(self.text.len() - offset) }
    }

    fn node_span(&self, node: &Node) -> Span {
        self.span(node.name_span)
    }

    /// The span of an entry's value (for a property, without `key=`).
    fn value_span(&self, entry: &Entry) -> Span {
        self.span(entry.value_span)
    }

    fn report(&mut self, issue: Issue) {
        self.issues.push(issue);
    }

    fn document(&mut self, document: &[Node]) -> FileItems {
        let mut items = FileItems::default();
        for node in document {
            match node.name.as_str() {
                "import" => {
                    self.check_options(node, &[], "`import`");
                    self.no_block(node);
                    if let Some(path) = self.single_string(node, "import path") {
                        items.imports.push(path);
                    }
                }
                "package" => match self.package(node) {
                    Ok(package) => items.packages.push(package),
                    Err(Some(name)) => items.broken_packages.push(name),
                    Err(None) => {}
                },
                "image" => items.images.extend(self.image(node)),
                other => {
                    let issue = Issue::new(
                        Problem::UnknownNode {
                            name: other.to_string(),
                            context: "a recipe".into(),
                        },
                        self.node_span(node),
                        "not a recipe node",
                    )
                    .help(did_you_mean(other, TOP_NODES).unwrap_or_else(|| {
                        "a recipe holds `package`, `image` and `import` nodes".into()
                    }));
                    self.report(issue);
                }
            }
        }
        items
    }

    // ----- packages -----

    /// The package, or (when it has errors) its name if it has one.
    fn package(&mut self, node: &Node) -> Result<Package, Option<String>> {
        self.check_options(node, &["version"], "`package`");
        let name =
            self.single_string(node, "package name").filter(|n| self.valid_name(n, "package name"));
        let version = self.string_option(node, "version").map(|v| v.value);
        let mut description = None;
        let mut license = None;
        let mut source = None;
        let mut build = None;
        let mut saw_build = false;
        let mut env = BTreeMap::new();
        let (mut depends, mut build_depends, mut tools) = (Vec::new(), Vec::new(), Vec::new());
        let context = match &name {
            Some(n) => format!("package `{}`", n.value),
            None => "a package".to_string(),
        };
        for child in self.children(node, &PACKAGE_NODES, &context) {
            let kind = child.name.as_str();
            match kind {
                "description" | "license" => {
                    self.check_options(child, &[], &format!("`{kind}`"));
                    self.no_block(child);
                    let value = self.single_string(child, kind).map(|v| v.value);
                    let slot = if kind == "description" { &mut description } else { &mut license };
                    if slot.is_some() {
                        self.duplicate(child, &context);
                    }
                    *slot = value.or(slot.take());
                }
                "source" => {
                    if source.is_some() {
                        self.duplicate(child, &context);
                    }
                    source = self.source(child).or(source);
                }
                "build" => {
                    if saw_build {
                        self.duplicate(child, &context);
                    }
                    saw_build = true;
                    build = self.build(child).or(build);
                }
                "env" => self.env(child, &mut env),
                "depends" | "build-depends" | "tools" => {
                    self.check_options(child, &[], &format!("`{kind}`"));
                    self.no_block(child);
                    let names = self.strings(child, 1, &format!("a `{kind}` name"));
                    match kind {
                        "depends" => depends.extend(names),
                        "build-depends" => build_depends.extend(names),
                        _ => tools.extend(names),
                    }
                }
                _ => unreachable!("children() only yields allowed names"),
            }
        }
        let Some(name) = name else { return Err(None) };
        let Some(build) = build else {
            if saw_build || self.misspelt_child(node, "build") {
                return Err(Some(name.value));
            }
            let issue = Issue::new(
                Problem::Missing { what: format!("`build` in package `{}`", name.value) },
                name.span,
                "this package has no builder",
            )
            .help(format!(
                "add a builder, e.g. `build \"script\" {{ run \"…\" }}`; builders: {}",
                Builder::NAMES.join(", ")
            ));
            self.report(issue);
            return Err(Some(name.value));
        };
        Ok(Package {
            name,
            version,
            description,
            license,
            source,
            build,
            env,
            depends,
            build_depends,
            tools,
        })
    }

    fn source(&mut self, node: &Node) -> Option<Spanned<Source>> {
        self.check_options(node, &["path", "url", "sha256"], "`source`");
        self.no_args(node);
        let path = self.string_option(node, "path");
        let url = self.string_option(node, "url");
        let sha256 = self.string_option(node, "sha256");
        let mut exclude = Vec::new();
        for child in self.children(node, &["exclude"], "`source`") {
            self.check_options(child, &[], "`exclude`");
            self.no_block(child);
            exclude
                .extend(self.strings(child, 1, "an exclude pattern").into_iter().map(|s| s.value));
        }
        let span = self.node_span(node);
        match (path, url) {
            (Some(path), None) => {
                if let Some(sha) = sha256 {
                    self.report(
                        Issue::new(
                            Problem::Conflict { a: "path".into(), b: "sha256".into() },
                            sha.span,
                            "only archives are pinned",
                        )
                        .help("a `path` source is hashed by content; `sha256` goes with `url`"),
                    );
                }
                if path.value.is_empty() {
                    self.invalid(path.span, "source path", "", "the path is empty");
                    return None;
                }
                Some(Spanned::new(Source::Path { path: path.value.into(), exclude }, path.span))
            }
            (None, Some(url)) => {
                if !(url.value.starts_with("https://") || url.value.starts_with("http://")) {
                    self.invalid(
                        url.span,
                        "source url",
                        &url.value,
                        "only http:// and https:// URLs can be fetched",
                    );
                }
                if !exclude.is_empty() {
                    self.report(Issue::new(
                        Problem::Conflict { a: "url".into(), b: "exclude".into() },
                        span,
                        "exclude applies to path sources",
                    ));
                }
                let Some(sha) = sha256 else {
                    self.report(
                        Issue::new(
                            Problem::Missing { what: "`sha256` for a `url` source".into() },
                            url.span,
                            "this archive is not pinned",
                        )
                        .help("add sha256=\"<64 hex digits>\"; `sha256sum FILE` prints it"),
                    );
                    return None;
                };
                let valid = sha.value.len() == 64
                    && sha.value.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                if !valid {
                    self.invalid(
                        sha.span,
                        "sha256",
                        &sha.value,
                        "expected 64 lowercase hex digits",
                    );
                    return None;
                }
                Some(Spanned::new(Source::Url { url: url.value, sha256: sha.value }, url.span))
            }
            (Some(_), Some(url)) => {
                self.report(
                    Issue::new(
                        Problem::Conflict { a: "path".into(), b: "url".into() },
                        url.span,
                        "a source is either local or downloaded",
                    )
                    .help("keep `path=\"…\"` for a local source or `url=\"…\" sha256=\"…\"` for an archive"),
                );
                None
            }
            (None, None) => {
                self.report(
                    Issue::new(
                        Problem::Missing { what: "`path` or `url` in `source`".into() },
                        span,
                        "no source given",
                    )
                    .help("write `source path=\"src\"` or `source url=\"https://…\" sha256=\"…\"`"),
                );
                None
            }
        }
    }

    fn build(&mut self, node: &Node) -> Option<Spanned<Builder>> {
        let span = self.node_span(node);
        let name = self.first_string(node, "builder name")?;
        let builder = match name.value.as_str() {
            "files" => {
                self.check_options(node, &[], "the `files` builder");
                let mut install = Vec::new();
                for child in self.children(node, &["install"], "the `files` builder") {
                    install.extend(self.install(child));
                }
                if install.is_empty() && !self.has_issues_in(node) {
                    self.report(
                        Issue::new(
                            Problem::Missing { what: "`install` in the `files` builder".into() },
                            name.span,
                            "installs nothing",
                        )
                        .help(
                            "add e.g. `install \"cert.pem\" \"/etc/ssl/cert.pem\" mode=\"0644\"`",
                        ),
                    );
                }
                Builder::Files { install }
            }
            "script" => {
                self.check_options(node, &[], "the `script` builder");
                let mut run = Vec::new();
                for child in self.children(node, &["run"], "the `script` builder") {
                    self.check_options(child, &[], "`run`");
                    self.no_block(child);
                    run.extend(self.single_string(child, "a shell command").map(|s| s.value));
                }
                if run.is_empty() && !self.has_issues_in(node) {
                    self.report(
                        Issue::new(
                            Problem::Missing { what: "`run` in the `script` builder".into() },
                            name.span,
                            "runs nothing",
                        )
                        .help("add e.g. `run \"mkdir -p $out/usr/bin\"`"),
                    );
                }
                Builder::Script { run }
            }
            "cc" => {
                self.check_options(node, &[], "the `cc` builder");
                let (mut sources, mut output, mut cflags, mut ldflags) =
                    (Vec::new(), None, Vec::new(), Vec::new());
                for child in self.children(
                    node,
                    &["sources", "output", "cflags", "ldflags"],
                    "the `cc` builder",
                ) {
                    let kind = child.name.as_str();
                    self.check_options(child, &[], &format!("`{kind}`"));
                    self.no_block(child);
                    match kind {
                        "sources" => sources.extend(
                            self.strings(child, 1, "a C source file").into_iter().map(|s| s.value),
                        ),
                        "output" => output = self.output_path(child).or(output),
                        "cflags" => cflags.extend(
                            self.strings(child, 1, "a compiler flag").into_iter().map(|s| s.value),
                        ),
                        _ => ldflags.extend(
                            self.strings(child, 1, "a linker flag").into_iter().map(|s| s.value),
                        ),
                    }
                }
                if sources.is_empty() && !self.has_issues_in(node) {
                    self.report(
                        Issue::new(
                            Problem::Missing { what: "`sources` in the `cc` builder".into() },
                            name.span,
                            "compiles nothing",
                        )
                        .help("add e.g. `sources \"hello.c\"`"),
                    );
                }
                Builder::Cc { sources, output, cflags, ldflags }
            }
            "go" => {
                self.check_options(node, &["main"], "the `go` builder");
                let main =
                    self.string_option(node, "main").map_or_else(|| ".".to_string(), |m| m.value);
                let (mut output, mut ldflags, mut tags) = (None, None, Vec::new());
                for child in self.children(node, &["output", "ldflags", "tags"], "the `go` builder")
                {
                    let kind = child.name.as_str();
                    self.check_options(child, &[], &format!("`{kind}`"));
                    self.no_block(child);
                    match kind {
                        "output" => output = self.output_path(child).or(output),
                        "ldflags" => {
                            ldflags = self
                                .single_string(child, "linker flags")
                                .map(|s| s.value)
                                .or(ldflags)
                        }
                        _ => tags.extend(
                            self.strings(child, 1, "a build tag").into_iter().map(|s| s.value),
                        ),
                    }
                }
                Builder::Go { main, output, ldflags, tags }
            }
            "cargo" => {
                self.check_options(node, &["bin"], "the `cargo` builder");
                let bin = self.string_option(node, "bin").map(|b| b.value);
                let mut features = Vec::new();
                for child in self.children(node, &["features"], "the `cargo` builder") {
                    self.check_options(child, &[], "`features`");
                    self.no_block(child);
                    features.extend(
                        self.strings(child, 1, "a cargo feature").into_iter().map(|s| s.value),
                    );
                }
                Builder::Cargo { bin, features }
            }
            other => {
                let help = did_you_mean(other, Builder::NAMES)
                    .unwrap_or_else(|| format!("builders: {}", Builder::NAMES.join(", ")));
                self.report(
                    Issue::new(
                        Problem::UnknownBuilder(other.to_string()),
                        name.span,
                        "not a builder",
                    )
                    .help(help),
                );
                return None;
            }
        };
        self.extra_args(node, 1);
        Some(Spanned::new(builder, span))
    }

    /// Whether a problem was already reported inside `node`'s text, to avoid
    /// piling a "missing" on top of a misspelt or mistyped child.
    fn has_issues_in(&self, node: &Node) -> bool {
        let span = self.span(node.span);
        self.issues.iter().any(|i| {
            i.span.file == self.file
                && i.span.offset >= span.offset
                && i.span.offset < span.offset + span.len
        })
    }

    /// Whether an unknown child of `node` looks like a misspelling of `wanted`.
    fn misspelt_child(&self, node: &Node, wanted: &str) -> bool {
        node.children
            .iter()
            .flatten()
            .any(|c| c.name != wanted && super::diagnostic::nearest(&c.name, [wanted]).is_some())
    }

    /// Package and image names become file names and OCI reference names:
    /// `/`-separated components of letters, digits and `._-+`, each starting
    /// with a letter or digit.
    fn valid_name(&mut self, name: &Spanned<String>, what: &'static str) -> bool {
        let components_ok = name.value.split('/').all(|c| {
            c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                && c.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
        });
        let ok = components_ok
            && name.value.len() <= 128
            && (what == "image name" || !name.value.contains('/'));
        if !ok {
            self.invalid(
                name.span,
                what,
                &name.value,
                if what == "image name" {
                    "use letters, digits and `._-+`, starting with a letter or digit (`/` separates parts)"
                } else {
                    "use letters, digits and `._-+`, starting with a letter or digit"
                },
            );
        }
        ok
    }

    fn install(&mut self, node: &Node) -> Option<Install> {
        self.check_options(node, &["mode"], "`install`");
        self.no_block(node);
        let args = self.strings(node, 2, "an install path");
        if args.len() > 2 {
            self.too_many(node, &args[2].span);
        }
        let mode = self.string_option(node, "mode").and_then(|m| {
            let parsed = u32::from_str_radix(&m.value, 8)
                .ok()
                .filter(|_| !m.value.is_empty() && m.value.bytes().all(|b| b.is_ascii_digit()));
            match parsed {
                Some(bits) if bits <= 0o777 => Some(bits),
                Some(_) => {
                    self.invalid(
                        m.span,
                        "mode",
                        &m.value,
                        "setuid, setgid and sticky bits are not allowed",
                    );
                    None
                }
                None => {
                    self.invalid(
                        m.span,
                        "mode",
                        &m.value,
                        "expected octal permission bits like \"0644\"",
                    );
                    None
                }
            }
        });
        let [from, to] =
            <[Spanned<String>; 2]>::try_from(args.into_iter().take(2).collect::<Vec<_>>()).ok()?;
        if !to.value.starts_with('/') {
            self.invalid(
                to.span,
                "install destination",
                &to.value,
                "destinations are absolute paths in the image",
            );
            return None;
        }
        Some(Install { from: from.value, to: to.value, mode })
    }

    fn output_path(&mut self, node: &Node) -> Option<String> {
        let path = self.single_string(node, "an output path")?;
        if !path.value.starts_with('/') {
            self.invalid(
                path.span,
                "output path",
                &path.value,
                "outputs are absolute paths in the image, e.g. /usr/bin/hello",
            );
            return None;
        }
        Some(path.value)
    }

    fn env(&mut self, node: &Node, env: &mut BTreeMap<String, String>) {
        self.no_block(node);
        for entry in &node.entries {
            let Some((name, key_span)) = &entry.name else {
                self.report(
                    Issue::new(
                        Problem::WrongType {
                            what: "an `env` entry".into(),
                            expected: "NAME=\"value\"",
                            found: "a bare value",
                        },
                        self.span(entry.span()),
                        "no variable name",
                    )
                    .help("write `env NAME=\"value\"`"),
                );
                continue;
            };
            let name = name.as_str();
            let valid_name = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_name {
                self.invalid(
                    self.span(*key_span),
                    "environment variable name",
                    name,
                    "names are letters, digits and `_`, not starting with a digit",
                );
                continue;
            }
            if let Some(value) = self.expect_string(entry, &format!("the value of `{name}`")) {
                env.insert(name.to_string(), value.value);
            }
        }
    }

    // ----- images -----

    fn image(&mut self, node: &Node) -> Option<Image> {
        self.check_options(node, &[], "`image`");
        let name =
            self.single_string(node, "image name").filter(|n| self.valid_name(n, "image name"));
        let context = match &name {
            Some(n) => format!("image `{}`", n.value),
            None => "an image".to_string(),
        };
        let mut image = Image {
            name: name.clone().unwrap_or_else(|| Spanned::new(String::new(), self.node_span(node))),
            contents: Vec::new(),
            platforms: Vec::new(),
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            env: BTreeMap::new(),
            workdir: None,
            user: None,
            expose: Vec::new(),
            labels: BTreeMap::new(),
            compression: Compression::default(),
            created: None,
        };
        let mut seen = Vec::new();
        let mut listed = std::collections::HashSet::new();
        for child in self.children(node, &IMAGE_NODES, &context) {
            let kind = child.name.as_str();
            if kind != "env" && kind != "label" {
                if kind != "platform" {
                    self.check_options(child, &[], &format!("`{kind}`"));
                }
                self.no_block(child);
            }
            let single = matches!(
                kind,
                "entrypoint" | "cmd" | "workdir" | "user" | "compression" | "created"
            );
            if single && seen.contains(&kind) {
                self.duplicate(child, &context);
            }
            seen.push(kind);
            match kind {
                "contents" => {
                    for name in self.strings(child, 1, "a package name") {
                        if !listed.insert(name.value.clone()) {
                            self.invalid(
                                name.span,
                                "contents",
                                &name.value,
                                "this package is already listed",
                            );
                        } else {
                            image.contents.push(name);
                        }
                    }
                }
                "platforms" => {
                    for text in self.strings(child, 1, "a platform") {
                        match text.value.parse::<Platform>() {
                            Ok(p) if image.platforms.iter().any(|q| q.value == p) => {
                                self.invalid(
                                    text.span,
                                    "platforms",
                                    &text.value,
                                    "this platform is already listed",
                                );
                            }
                            Ok(p) => image.platforms.push(Spanned::new(p, text.span)),
                            Err(e) => {
                                let arch = text.value.split('/').nth(1).unwrap_or("");
                                // An alias is already named in the message itself.
                                let help = (arch_alias(arch).is_none())
                                    .then(|| super::diagnostic::nearest(arch, known_arch_names()))
                                    .flatten()
                                    .map(|s| format!("did you mean `linux/{s}`?"))
                                    .unwrap_or_else(|| {
                                        "platforms are written like `linux/amd64` or `linux/arm64`"
                                            .into()
                                    });
                                self.report(
                                    Issue::new(
                                        Problem::InvalidPlatform {
                                            text: text.value.clone(),
                                            reason: e.to_string(),
                                        },
                                        text.span,
                                        "not a platform pkg can build for",
                                    )
                                    .help(help),
                                );
                            }
                        }
                    }
                }
                "platform" => {
                    self.report(
                        Issue::new(
                            Problem::UnknownNode {
                                name: "platform".into(),
                                context: context.clone(),
                            },
                            self.node_span(child),
                            "not an image setting",
                        )
                        .help("did you mean `platforms`?"),
                    );
                }
                "entrypoint" => {
                    image.entrypoint =
                        self.strings(child, 1, "an argument").into_iter().map(|s| s.value).collect()
                }
                "cmd" => {
                    image.cmd =
                        self.strings(child, 1, "an argument").into_iter().map(|s| s.value).collect()
                }
                "env" => self.env(child, &mut image.env),
                "workdir" => {
                    if let Some(dir) = self.single_string(child, "a directory") {
                        if dir.value.starts_with('/') {
                            image.workdir = Some(dir.value);
                        } else {
                            self.invalid(
                                dir.span,
                                "workdir",
                                &dir.value,
                                "the working directory is an absolute path",
                            );
                        }
                    }
                }
                "user" => {
                    if let Some(user) = self.single_string(child, "a user") {
                        if user.value.is_empty()
                            || user.value.contains(char::is_whitespace)
                            || user.value.split(':').count() > 2
                            || user.value.split(':').any(str::is_empty)
                        {
                            self.invalid(
                                user.span,
                                "user",
                                &user.value,
                                "expected `USER`, `UID` or `UID:GID`",
                            );
                        } else {
                            image.user = Some(user.value);
                        }
                    }
                }
                "expose" => {
                    for entry in child.entries.iter().filter(|e| e.name.is_none()) {
                        image.expose.extend(self.port(entry));
                    }
                    if child.entries.is_empty() {
                        self.missing_value(child, "a port");
                    }
                }
                "label" => {
                    self.check_options(child, &[], "`label`");
                    self.no_block(child);
                    let args = self.strings(child, 2, "a label key and value");
                    if args.len() > 2 {
                        self.too_many(child, &args[2].span);
                    }
                    if let [key, value, ..] = args.as_slice() {
                        image.labels.insert(key.value.clone(), value.value.clone());
                    }
                }
                "compression" => {
                    if let Some(c) = self.single_string(child, "a compression") {
                        match c.value.as_str() {
                            "gzip" => image.compression = Compression::Gzip,
                            "zstd" => image.compression = Compression::Zstd,
                            other => {
                                let help = did_you_mean(other, ["gzip", "zstd"])
                                    .unwrap_or_else(|| "choose `gzip` (default) or `zstd`".into());
                                self.report(
                                    Issue::new(
                                        Problem::InvalidValue {
                                            what: "compression",
                                            value: other.into(),
                                            reason: "expected `gzip` or `zstd`".into(),
                                        },
                                        c.span,
                                        "unknown compression",
                                    )
                                    .help(help),
                                );
                            }
                        }
                    }
                }
                "created" => image.created = self.created(child).or(image.created),
                _ => unreachable!("children() only yields allowed names"),
            }
        }
        let name = name?;
        if image.contents.is_empty() {
            if self.has_issues_in(node) {
                return None;
            }
            let issue = Issue::new(
                Problem::Missing { what: format!("`contents` in image `{}`", name.value) },
                name.span,
                "this image contains nothing",
            )
            .help("add `contents \"PACKAGE\"`: the packages to put in the image");
            self.report(issue);
            return None;
        }
        Some(image)
    }

    fn port(&mut self, entry: &Entry) -> Option<Port> {
        let span = self.value_span(entry);
        let text = match &entry.value {
            Value::String(s) => s.clone(),
            Value::Integer(i) => i.to_string(),
            other => {
                self.wrong_type(span, "a port", "a string like \"8080/tcp\"", other);
                return None;
            }
        };
        let (number, protocol) = text.split_once('/').unwrap_or((&text, "tcp"));
        let protocol = match protocol {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "sctp" => Protocol::Sctp,
            _ => {
                self.invalid(span, "port", &text, "the protocol is `tcp`, `udp` or `sctp`");
                return None;
            }
        };
        match number.parse::<u16>() {
            Ok(n) if n > 0 => Some(Port { number: n, protocol }),
            _ => {
                self.invalid(span, "port", &text, "the port is a number from 1 to 65535");
                None
            }
        }
    }

    fn created(&mut self, node: &Node) -> Option<i64> {
        let entry = self.args(node).into_iter().next();
        let Some(entry) = entry else {
            self.missing_value(node, "a time");
            return None;
        };
        self.extra_args(node, 1);
        let span = self.value_span(entry);
        match &entry.value {
            Value::Integer(i) if *i >= 0 && *i <= i128::from(i64::MAX) => Some(*i as i64),
            Value::String(s) => match parse_rfc3339_utc(s) {
                Some(t) => Some(t),
                None => {
                    self.invalid(
                        span,
                        "creation time",
                        s,
                        "expected seconds since 1970 or `YYYY-MM-DDTHH:MM:SSZ`",
                    );
                    None
                }
            },
            other => {
                self.wrong_type(
                    span,
                    "`created`",
                    "seconds since 1970 or an RFC 3339 UTC time",
                    other,
                );
                None
            }
        }
    }

    // ----- generic entry checks -----

    /// The children of `node` whose names are in `allowed`; others are reported.
    fn children<'n>(&mut self, node: &'n Node, allowed: &[&str], context: &str) -> Vec<&'n Node> {
        let Some(children) = &node.children else { return Vec::new() };
        let mut out = Vec::new();
        for child in children {
            let name = child.name.as_str();
            if allowed.contains(&name) {
                out.push(child);
            } else {
                let help = did_you_mean(name, allowed.iter().copied())
                    .unwrap_or_else(|| format!("{context} accepts: {}", allowed.join(", ")));
                self.report(
                    Issue::new(
                        Problem::UnknownNode {
                            name: name.to_string(),
                            context: context.to_string(),
                        },
                        self.node_span(child),
                        "unknown here",
                    )
                    .help(help),
                );
            }
        }
        out
    }

    /// Reports properties of `node` not in `allowed`.
    fn check_options(&mut self, node: &Node, allowed: &[&str], context: &str) {
        for entry in &node.entries {
            let Some((name, key_span)) = &entry.name else { continue };
            let name = name.as_str();
            if allowed.contains(&name) {
                continue;
            }
            let help = did_you_mean(name, allowed.iter().copied()).unwrap_or_else(|| {
                if allowed.is_empty() {
                    format!("{context} takes no options")
                } else {
                    format!("{context} accepts: {}", allowed.join(", "))
                }
            });
            self.report(
                Issue::new(
                    Problem::UnknownOption { name: name.to_string(), context: context.to_string() },
                    self.span(*key_span),
                    "unknown option",
                )
                .help(help),
            );
        }
    }

    fn no_block(&mut self, node: &Node) {
        if node.children.is_some() {
            let name = node.name.as_str().to_string();
            self.report(
                Issue::new(
                    Problem::UnexpectedBlock { node: name.clone() },
                    self.node_span(node),
                    "has a `{ … }` block",
                )
                .help(format!("remove the braces after `{name}`")),
            );
        }
    }

    fn no_args(&mut self, node: &Node) {
        if let Some(extra) = self.args(node).first() {
            let span = self.span(extra.span());
            self.too_many(node, &span);
        }
    }

    fn duplicate(&mut self, node: &Node, context: &str) {
        let name = node.name.as_str().to_string();
        self.report(
            Issue::new(
                Problem::DuplicateNode { node: name.clone(), context: context.to_string() },
                self.node_span(node),
                "given again here",
            )
            .help(format!("keep one `{name}`")),
        );
    }

    fn args<'n>(&self, node: &'n Node) -> Vec<&'n Entry> {
        node.entries.iter().filter(|e| e.name.is_none()).collect()
    }

    fn too_many(&mut self, node: &Node, extra: &Span) {
        let name = node.name.as_str().to_string();
        self.report(
            Issue::new(Problem::TooManyValues { node: name.clone() }, *extra, "unexpected value")
                .help(format!("`{name}` takes {}", arity(&name))),
        );
    }

    fn extra_args(&mut self, node: &Node, max: usize) {
        if let Some(extra) = self.args(node).get(max) {
            let span = self.span(extra.span());
            self.too_many(node, &span);
        }
    }

    fn missing_value(&mut self, node: &Node, what: &str) {
        let name = node.name.as_str().to_string();
        self.report(
            Issue::new(
                Problem::Missing { what: format!("{what} after `{name}`") },
                self.node_span(node),
                "needs a value",
            )
            .help(format!("`{name}` takes {}", arity(&name))),
        );
    }

    /// Exactly one string argument.
    fn single_string(&mut self, node: &Node, what: &str) -> Option<Spanned<String>> {
        let value = self.first_string(node, what);
        self.extra_args(node, 1);
        value
    }

    /// The first argument, which must be a string; further arguments are the caller's business.
    fn first_string(&mut self, node: &Node, what: &str) -> Option<Spanned<String>> {
        let Some(entry) = self.args(node).into_iter().next() else {
            self.missing_value(node, what);
            return None;
        };
        self.expect_string(entry, what)
    }

    /// All arguments, each a string, at least `min` of them.
    fn strings(&mut self, node: &Node, min: usize, what: &str) -> Vec<Spanned<String>> {
        let args = self.args(node);
        if args.len() < min {
            self.missing_value(node, what);
        }
        args.into_iter().filter_map(|e| self.expect_string(e, what)).collect()
    }

    fn string_option(&mut self, node: &Node, key: &str) -> Option<Spanned<String>> {
        // KDL: the rightmost property of a name wins.
        let entry =
            node.entries.iter().rev().find(|e| e.name.as_ref().is_some_and(|(n, _)| n == key))?;
        self.expect_string(entry, &format!("`{key}`"))
    }

    fn expect_string(&mut self, entry: &Entry, what: &str) -> Option<Spanned<String>> {
        let span = self.value_span(entry);
        match &entry.value {
            Value::String(s) => Some(Spanned::new(s.clone(), span)),
            other => {
                self.wrong_type(span, what, "a string", other);
                None
            }
        }
    }

    fn wrong_type(&mut self, span: Span, what: &str, expected: &'static str, found: &Value) {
        let found_name = type_name(found);
        let help = match found {
            Value::Integer(_) | Value::Float(_) | Value::Bool(_) | Value::Null => {
                format!(
                    "put the value in quotes: \"{}\"",
                    self.text[span.offset..span.offset + span.len].trim_start_matches('#')
                )
            }
            Value::String(_) => format!("expected {expected}"),
        };
        self.report(
            Issue::new(
                Problem::WrongType { what: what.to_string(), expected, found: found_name },
                span,
                format!("this is {found_name}"),
            )
            .help(help),
        );
    }

    fn invalid(&mut self, span: Span, what: &'static str, value: &str, reason: &str) {
        self.report(Issue::new(
            Problem::InvalidValue { what, value: value.to_string(), reason: reason.to_string() },
            span,
            format!("invalid {what}"),
        ));
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a number",
        Value::Bool(_) => "a boolean",
        Value::Null => "#null",
    }
}

/// How many values a node takes, for help lines.
fn arity(node: &str) -> &'static str {
    match node {
        "install" | "label" => "two values",
        "depends" | "build-depends" | "tools" | "contents" | "platforms" | "entrypoint" | "cmd"
        | "sources" | "cflags" | "ldflags" | "tags" | "features" | "expose" | "exclude" => {
            "one or more values"
        }
        "source" => "only options: path=, or url= and sha256=",
        _ => "one value",
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ` into seconds since the Unix epoch.
fn parse_rfc3339_utc(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| {
        let part = s.get(r)?;
        part.bytes().all(|b| b.is_ascii_digit()).then(|| part.parse::<i64>().ok())?
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in_month = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(1..=12).contains(&m)
        || d < 1
        || d > days_in_month[(m - 1) as usize]
        || hh > 23
        || mm > 59
        || ss > 59
        || y < 1970
    {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm), proleptic Gregorian calendar.
    let (y2, m2) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339_utc("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339_utc("2000-03-01T00:00:00Z"), Some(951_868_800));
        assert_eq!(parse_rfc3339_utc("2024-02-29T12:34:56Z"), Some(1_709_210_096));
        assert_eq!(parse_rfc3339_utc("2023-02-29T00:00:00Z"), None);
        assert_eq!(parse_rfc3339_utc("2024-01-01 00:00:00"), None);
    }

    fn decode(text: &str) -> (FileItems, Vec<Issue>) {
        let mut issues = Vec::new();
        let items = decode_file(FileId(0), text, &mut issues);
        (items, issues)
    }

    #[test]
    fn decodes_the_design_example() {
        let (items, issues) = decode(
            r#"
            import "../common/ca-certs.kdl"
            package "hello" version="1.0.0" {
                description "Static hello web server"
                license "MIT"
                source path="src"
                build "go" main="./cmd/hello"
                env GOFLAGS="-mod=vendor"
                depends "ca-certs"
                build-depends "zlib"
                tools "go"
            }
            image "hello" {
                contents "hello"
                platforms "linux/amd64" "linux/arm64"
                entrypoint "/usr/bin/hello"
                cmd "--listen" ":8080"
                env PATH="/usr/bin:/bin"
                workdir "/"
                user "65532:65532"
                expose "8080/tcp"
                label "org.opencontainers.image.title" "hello"
                compression "gzip"
            }
            "#,
        );
        assert_eq!(issues, vec![]);
        assert_eq!(items.imports[0].value, "../common/ca-certs.kdl");
        let p = &items.packages[0];
        assert_eq!(p.version.as_deref(), Some("1.0.0"));
        assert_eq!(
            p.build.value,
            Builder::Go { main: "./cmd/hello".into(), output: None, ldflags: None, tags: vec![] }
        );
        assert_eq!(p.env["GOFLAGS"], "-mod=vendor");
        let i = &items.images[0];
        assert_eq!(i.platforms.len(), 2);
        assert_eq!(i.cmd, ["--listen", ":8080"]);
        assert_eq!(i.expose[0].to_string(), "8080/tcp");
        assert_eq!(i.labels["org.opencontainers.image.title"], "hello");
    }

    #[test]
    fn property_value_span_excludes_key() {
        let text = "package \"p\" version=1 {\n build \"script\" { run \"true\" }\n}\n";
        let (_, issues) = decode(text);
        assert_eq!(issues.len(), 1);
        let s = issues[0].span;
        assert_eq!(&text[s.offset..s.offset + s.len], "1");
    }

    #[test]
    fn collects_several_problems() {
        let (_, issues) =
            decode("pakage \"a\"\nimage \"i\" { contents 1; platforms \"linux/x86_64\" }\n");
        let codes: Vec<_> = issues.iter().map(|i| i.problem.code()).collect();
        assert_eq!(
            codes,
            ["recipe::unknown_node", "recipe::wrong_type", "recipe::invalid_platform"]
        );
    }
}
