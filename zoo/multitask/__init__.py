"""Multi-task learning: one network, several heads, one task per head."""
