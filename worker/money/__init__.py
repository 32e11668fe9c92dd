"""Money: the token ledger, budgets (run and day), purchasing, the pool keeper; nothing else writes a money key."""
