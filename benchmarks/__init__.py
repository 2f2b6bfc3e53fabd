"""awqkit's benchmarks: one script per experiment, run from the repository root as
``python -m benchmarks.<script>`` (the ``.sh`` wrappers first build the peers' environments).

``harness`` measures a command as its own process (wall, CPU, peak RSS), takes medians and prints
tables; perplexities and paired CIs come from ``awqkit eval``. ``llmcompressor_awq`` and
``gguf_score`` run inside the peers' own environments, by path, and import nothing from here.
"""
