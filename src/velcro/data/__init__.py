"""Task data: image folders, task presets, splits, bundled digits."""
