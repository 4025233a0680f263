"""How much to trust the unlabeled tiles: confidence threshold, loss weight, EMA momentum."""

SPACE = {
    "ssl.confidence_threshold": {"uniform": [0.7, 0.99]},
    "ssl.unlabeled_weight": {"loguniform": [0.25, 4.0]},
    "ssl.ema_momentum": {"choice": [0.99, 0.996, 0.999]},
}
