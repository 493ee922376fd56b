"""Engines that run the same ServerApp and ClientApp: in-process, Flower's Ray simulation."""
