"""What awqkit knows of a model: where its decoder blocks are, which linears share an input and
where their scales fold, experts as linears, the block walk, a model streamed from its shards."""
