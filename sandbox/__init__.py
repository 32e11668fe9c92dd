"""A local stand-in for the paid marketplace, and the local stack launcher."""
