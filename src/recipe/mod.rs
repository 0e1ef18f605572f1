//! Recipes: KDL files describing packages and images.
//!
//! [`load()`] reads a recipe and its imports and returns a checked [`Recipe`] or a
//! [`RecipeError`] listing every problem as a miette diagnostic. The model
//! ([`model`]) is independent of KDL; [`decode`] is the KDL adapter.

mod ast;
mod decode;
mod diagnostic;
mod fastkdl;
mod load;
mod model;

pub use diagnostic::{Problem, RecipeDiagnostic, RecipeError, did_you_mean};
pub use load::{load, load_str, normalize, recipe_file};
pub use model::{
    Builder, Compression, FileId, Image, Install, Package, Port, Protocol, Recipe, Source,
    SourceFile, SourceMap, Span, Spanned,
};

impl Recipe {
    /// Resolves a package's `source path=` to a path on disk.
    pub fn source_path(&self, package: &Package) -> Option<std::path::PathBuf> {
        let source = package.source.as_ref()?;
        let Source::Path { path, .. } = &source.value else { return None };
        let base = self.sources.get(source.span.file).path.parent()?;
        Some(normalize(&base.join(path)))
    }
}
