"""How a weight becomes integers and back: the grid, the scale search, rounding, clipping, folding,
and one block's scale groups end to end. Pure tensor math: no I/O, no model knowledge."""
