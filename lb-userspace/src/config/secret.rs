//! Shared secrets in the config: inline (`key`) or in a file (`key_file`, relative to
//! the config's directory), at least 16 characters.

use std::{
    ops::Range,
    path::{Path, PathBuf},
};

use toml::Spanned;

use super::error::{ConfigError, Ctx};

/// The secret from the fields named `fields` (e.g. `("cluster.key", "cluster.key_file")`);
/// `None` if neither is set.
pub(super) fn read(
    ctx: &Ctx,
    (key_field, file_field): (&str, &str),
    key: Option<Spanned<String>>,
    key_file: Option<PathBuf>,
    span: Range<usize>,
    path: &Path,
) -> Result<Option<Vec<u8>>, ConfigError> {
    match (key, key_file) {
        (None, None) => Ok(None),
        (Some(k), None) => {
            if k.get_ref().len() < 16 {
                return Err(ctx.err(k.span(), format!("{key_field}: use at least 16 characters")));
            }
            Ok(Some(k.into_inner().into_bytes()))
        }
        (None, Some(f)) => {
            let f = if f.is_relative() {
                path.parent().unwrap_or(Path::new(".")).join(f)
            } else {
                f
            };
            let k = std::fs::read(&f).map_err(|e| {
                ctx.err(
                    span.clone(),
                    format!("{file_field}: cannot read {}: {e}", f.display()),
                )
            })?;
            let k = String::from_utf8_lossy(&k).trim().as_bytes().to_vec();
            if k.len() < 16 {
                return Err(ctx.err(
                    span,
                    format!(
                        "{file_field}: {} holds fewer than 16 characters",
                        f.display()
                    ),
                ));
            }
            Ok(Some(k))
        }
        (Some(_), Some(_)) => Err(ctx.err(
            span,
            format!("{key_field}, {file_field}: set one of them, not both"),
        )),
    }
}
