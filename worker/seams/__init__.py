"""Seams to the outside: Redis (store), S3 (storage), the seller (marketplace); only they catch those errors."""
