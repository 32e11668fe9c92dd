"""Background jobs and operations: watchdog, recovery, leader-locked periodic jobs, durability checks, redaction."""
