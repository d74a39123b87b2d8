"""Small shared utilities (atomic I/O, seeding, logging helpers)."""
