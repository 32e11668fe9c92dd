"""irlive producer: sources, filters, chunking, enqueueing, and the `irlive` command line."""
