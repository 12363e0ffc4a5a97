"""hrtem-book: HRTEM simulation, U-Net transfer learning, study sweeps and an executable book."""

__version__ = "0.1.0"
