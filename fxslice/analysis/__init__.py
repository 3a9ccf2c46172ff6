"""Analyses any method may use, above the core: matchers for norms and linears, the residual stream, what
inserted nodes are for (`roles`), edits of matched linears (`weights`), FLOP counts and summaries."""
