"""Non-learned reference methods (the official Tmax > 9 s baseline)."""
