"""Pure torch models of relalign: image encoders, the single-stream transformer, heads, IAIS/ISD."""
