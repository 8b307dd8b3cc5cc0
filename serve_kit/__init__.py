"""serve-kit: take a trained model to production, verified at every step."""

__version__ = "0.1.0"
