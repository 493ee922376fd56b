"""Strategies fedmed offers; the Flower classes behind them are chosen in fedmed.flower.strategy."""

STRATEGY_NAMES = ("fedavg", "fedprox", "fedadam", "fedyogi")
