//! Recipe errors as miette diagnostics.
//!
//! Decoding and checking never stop at the first problem: each one becomes an
//! [`Issue`] (a typed [`Problem`], the span it is about, a label and a help
//! line), and [`RecipeError::Invalid`] carries all of them, rendered with the
//! file name, `line:column` and the underlined span.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use miette::{Diagnostic, LabeledSpan, NamedSource, SourceSpan};

use super::model::{SourceMap, Span};

/// What is wrong, independent of where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("syntax error: {0}")]
    Syntax(String),
    #[error("unknown node `{name}` in {context}")]
    UnknownNode { name: String, context: String },
    #[error("unknown option `{name}` for {context}")]
    UnknownOption { name: String, context: String },
    #[error("{what} must be {expected}, not {found}")]
    WrongType { what: String, expected: &'static str, found: &'static str },
    #[error("missing {what}")]
    Missing { what: String },
    #[error("too many values for `{node}`")]
    TooManyValues { node: String },
    #[error("`{node}` takes no block")]
    UnexpectedBlock { node: String },
    #[error("`{node}` is given twice in {context}")]
    DuplicateNode { node: String, context: String },
    #[error("package `{0}` is defined twice")]
    DuplicatePackage(String),
    #[error("image `{0}` is defined twice")]
    DuplicateImage(String),
    #[error("unknown package `{0}`")]
    UnknownPackage(String),
    #[error("dependency cycle: {0}")]
    DependencyCycle(String),
    #[error("invalid platform `{text}`: {reason}")]
    InvalidPlatform { text: String, reason: String },
    #[error("unknown builder `{0}`")]
    UnknownBuilder(String),
    #[error("invalid {what} `{value}`: {reason}")]
    InvalidValue { what: &'static str, value: String, reason: String },
    #[error("`{a}` and `{b}` cannot be used together")]
    Conflict { a: String, b: String },
    #[error("cannot read import `{path}`: {reason}")]
    ImportNotFound { path: String, reason: String },
    #[error("import cycle: {0}")]
    ImportCycle(String),
    #[error("source path `{path}` does not exist")]
    SourcePathMissing { path: String },
}

impl Problem {
    /// A stable, greppable code for the problem kind.
    pub fn code(&self) -> &'static str {
        match self {
            Problem::Syntax(_) => "recipe::syntax",
            Problem::UnknownNode { .. } => "recipe::unknown_node",
            Problem::UnknownOption { .. } => "recipe::unknown_option",
            Problem::WrongType { .. } => "recipe::wrong_type",
            Problem::Missing { .. } => "recipe::missing",
            Problem::TooManyValues { .. } => "recipe::too_many_values",
            Problem::UnexpectedBlock { .. } => "recipe::unexpected_block",
            Problem::DuplicateNode { .. } => "recipe::duplicate_node",
            Problem::DuplicatePackage(_) => "recipe::duplicate_package",
            Problem::DuplicateImage(_) => "recipe::duplicate_image",
            Problem::UnknownPackage(_) => "recipe::unknown_package",
            Problem::DependencyCycle(_) => "recipe::dependency_cycle",
            Problem::InvalidPlatform { .. } => "recipe::invalid_platform",
            Problem::UnknownBuilder(_) => "recipe::unknown_builder",
            Problem::InvalidValue { .. } => "recipe::invalid_value",
            Problem::Conflict { .. } => "recipe::conflict",
            Problem::ImportNotFound { .. } => "recipe::import_not_found",
            Problem::ImportCycle(_) => "recipe::import_cycle",
            Problem::SourcePathMissing { .. } => "recipe::source_path_missing",
        }
    }
}

/// One problem at one place, before rendering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub problem: Problem,
    pub span: Span,
    pub label: String,
    pub help: Option<String>,
}

impl Issue {
    pub fn new(problem: Problem, span: Span, label: impl Into<String>) -> Self {
        Issue { problem, span, label: label.into(), help: None }
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// A rendered recipe problem: the issue plus its file's name and text.
#[derive(Debug)]
pub struct RecipeDiagnostic {
    issue: Issue,
    source: NamedSource<Arc<String>>,
}

impl RecipeDiagnostic {
    pub fn problem(&self) -> &Problem {
        &self.issue.problem
    }
}

impl fmt::Display for RecipeDiagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.issue.problem, f)
    }
}

impl std::error::Error for RecipeDiagnostic {}

impl Diagnostic for RecipeDiagnostic {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(self.issue.problem.code()))
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.issue.help.as_ref().map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        Some(&self.source)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let span = SourceSpan::new(self.issue.span.offset.into(), self.issue.span.len);
        Some(Box::new(std::iter::once(LabeledSpan::new_with_span(
            Some(self.issue.label.clone()),
            span,
        ))))
    }
}

/// Why a recipe could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// The root recipe file could not be read; there is no text to point into.
    #[error("cannot read recipe `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The recipe was read but has problems; every one found is listed.
    #[error("{}", summary(.0))]
    Invalid(Vec<RecipeDiagnostic>),
}

fn summary(diagnostics: &[RecipeDiagnostic]) -> String {
    match diagnostics {
        [one] => one.to_string(),
        many => format!("the recipe has {} errors", many.len()),
    }
}

impl RecipeError {
    pub(crate) fn invalid(sources: &SourceMap, issues: Vec<Issue>) -> Self {
        let diagnostics = issues
            .into_iter()
            .map(|issue| {
                let file = sources.get(issue.span.file);
                let name = file.path.display().to_string();
                RecipeDiagnostic { issue, source: NamedSource::new(name, file.text.clone()) }
            })
            .collect();
        RecipeError::Invalid(diagnostics)
    }

    /// The individual problems, empty for a read error.
    pub fn diagnostics(&self) -> &[RecipeDiagnostic] {
        match self {
            RecipeError::Read { .. } => &[],
            RecipeError::Invalid(d) => d,
        }
    }
}

impl Diagnostic for RecipeError {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        match self {
            RecipeError::Read { .. } => Some(Box::new("recipe::read")),
            RecipeError::Invalid(d) if d.len() == 1 => d[0].code(),
            RecipeError::Invalid(_) => None,
        }
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        match self {
            RecipeError::Read { .. } => Some(Box::new(
                "RECIPE is a .kdl file or a directory holding pkg.kdl (default ./pkg.kdl)",
            )),
            RecipeError::Invalid(d) if d.len() == 1 => d[0].help(),
            RecipeError::Invalid(_) => None,
        }
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        match self {
            RecipeError::Invalid(d) if d.len() == 1 => d[0].source_code(),
            _ => None,
        }
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        match self {
            RecipeError::Invalid(d) if d.len() == 1 => d[0].labels(),
            _ => None,
        }
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        match self {
            RecipeError::Invalid(d) if d.len() > 1 => {
                Some(Box::new(d.iter().map(|d| d as &dyn Diagnostic)))
            }
            _ => None,
        }
    }
}

/// The candidate closest to `name`, if it is close enough to be a likely typo.
pub fn nearest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(name, c), c))
        .filter(|&(d, c)| d > 0 && d <= (name.len().max(c.len()) / 3).max(1))
        .min()
        .map(|(_, c)| c)
}

/// "did you mean `x`?" when a candidate is close.
pub fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    nearest(name, candidates).map(|n| format!("did you mean `{n}`?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        let names = ["build", "build-depends", "depends", "description"];
        assert_eq!(nearest("bulid", names), Some("build"));
        assert_eq!(nearest("depend", names), Some("depends"));
        assert_eq!(nearest("zzzzzz", names), None);
        assert_eq!(nearest("build", names), None);
    }
}
