"""What every layer may use: errors, units, paths, GGUF header reading, process-tree helpers."""
