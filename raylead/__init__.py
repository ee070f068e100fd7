"""raylead: audit face generators and synthetic face datasets for identity leakage, on Ray."""

__version__ = "0.1.0"
