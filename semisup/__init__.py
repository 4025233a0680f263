"""semisup: semi-supervised Segment Anything for aerial imagery on Ray."""
