"""hrtem-book: simulation, training, sweeps and figures of an executable HRTEM transfer-learning paper."""

__version__ = "0.1.0"
