"""Training: launch (driver), the loop run by every Ray Train worker, and its parts."""
