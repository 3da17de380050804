"""One file per training method; each gives the engine datasets, collation and a loss."""
