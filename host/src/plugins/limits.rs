//! Whether a plugin can run at all within its pipeline's limits, decided when it
//! is loaded instead of by every message failing.

use anyhow::{Result, bail};

use super::LoadedPlugin;

/// Bytes in a WebAssembly page. warren's engine does not enable the
/// custom-page-sizes proposal, so every memory counts in these pages.
const WASM_PAGE: u64 = 64 << 10;

/// Refuse a plugin whose linear memory starts larger than the pipeline's
/// `limits.memory_mib` (`memory_bytes`): creating its instance asks for that
/// memory first, so every message would fail with "exceeded its memory limit"
/// before the plugin ran a single instruction.
///
/// The check reads the sizes the component declares, which costs nothing; a
/// trial instance would also run the component's start code, on a pool slot,
/// for the same answer. A component that instantiates imported core modules
/// cannot be sized this way, but warren provides none, so such a component
/// never gets this far.
pub fn check_fits(plugin: &LoadedPlugin, memory_bytes: usize) -> Result<()> {
    check_fits_as(plugin, memory_bytes, "limits.memory_mib")
}

/// [`check_fits`] for a limit set elsewhere (`setting` names it in the error,
/// e.g. `--memory-mib`).
pub fn check_fits_as(plugin: &LoadedPlugin, memory_bytes: usize, setting: &str) -> Result<()> {
    let Some(pages) = plugin
        .component()
        .resources_required()
        .and_then(|r| r.max_initial_memory_size)
    else {
        return Ok(());
    };
    let needs = pages.saturating_mul(WASM_PAGE);
    let limit = u64::try_from(memory_bytes).unwrap_or(u64::MAX);
    if needs > limit {
        bail!(
            "{setting} = {} is too small for plugin {}: its linear memory starts at {} \
             ({pages} pages), so every message would fail with \"exceeded its memory \
             limit\"; set at least {}",
            limit >> 20,
            plugin.path().display(),
            mib(needs),
            needs.div_ceil(1 << 20)
        );
    }
    Ok(())
}

/// Bytes as MiB with one decimal, rounded up so that a size just above a limit
/// never reads as equal to it ("1.1 MiB" for 17 pages, not "1.0").
fn mib(bytes: u64) -> String {
    let tenths = bytes.saturating_mul(10).div_ceil(1 << 20);
    format!("{}.{} MiB", tenths / 10, tenths % 10)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_as_mib() {
        assert_eq!(super::mib(17 * super::WASM_PAGE), "1.1 MiB");
        assert_eq!(super::mib(145 * super::WASM_PAGE), "9.1 MiB");
        assert_eq!(super::mib(3 << 20), "3.0 MiB");
    }
}
