//! Documents compiled in by name (hardware profiles, model shapes, step configs), or else read
//! from a file: one lookup for all three, so their errors read alike.

use std::borrow::Cow;
use std::path::Path;

use crate::error::FabricError;

/// A table of built-in documents: `(name, text)`.
pub(crate) type Builtins = &'static [(&'static str, &'static str)];

/// The names of `builtins`, comma-separated (for errors).
fn known(builtins: Builtins) -> String {
    builtins
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The built-in document `name`; an unknown name is an error listing the known ones.
pub(crate) fn builtin_text(
    kind: &'static str,
    builtins: Builtins,
    name: &str,
) -> Result<&'static str, FabricError> {
    builtins
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| *text)
        .ok_or_else(|| FabricError::UnknownName {
            kind,
            name: name.to_string(),
            known: known(builtins),
        })
}

/// The built-in document `name_or_path`, or else the text of the file at that path (a path that
/// does not exist is an unknown name, listing the built-in ones).
pub(crate) fn builtin_or_file(
    kind: &'static str,
    builtins: Builtins,
    name_or_path: &str,
) -> Result<Cow<'static, str>, FabricError> {
    if let Ok(text) = builtin_text(kind, builtins, name_or_path) {
        return Ok(Cow::Borrowed(text));
    }
    let path = Path::new(name_or_path);
    if !path.exists() {
        return Err(FabricError::UnknownName {
            kind,
            name: name_or_path.to_string(),
            known: known(builtins),
        });
    }
    std::fs::read_to_string(path)
        .map(Cow::Owned)
        .map_err(|source| FabricError::Io {
            path: path.to_path_buf(),
            source,
        })
}
