"""The fleet layer: a routing policy (pure Python), an HTTP router over tokenmill backends, and the
data-parallel client that puts N engine processes behind one API server."""
