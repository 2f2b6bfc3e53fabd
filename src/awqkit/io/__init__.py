"""Files: the safetensors reader, the shard writer, a run's resume state, publishing a folder."""
