"""Named Ray Tune search spaces."""
