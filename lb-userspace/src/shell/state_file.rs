//! lbd's files under `state_dir`: written so that a crash leaves either the old file
//! or the new one, never a part.

use std::path::Path;

use anyhow::{Context, Result};

/// Replaces `path` with `data` so that a crash leaves the old file or the new one,
/// never a part: write a temporary file, flush it to disk, rename it over.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} into place", tmp.display()))
}
